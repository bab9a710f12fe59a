"""moepipe engine: `from engine import LLM, SamplingParams`."""
from .llm import LLM, EngineClosed, RequestStream, StageDied, TokenEvent
from .options import EngineOptions
from .params import RequestOutput, SamplingParams
from .scheduler import RequestRefused

__all__ = ["LLM", "EngineOptions", "SamplingParams", "RequestOutput", "RequestRefused", "RequestStream", "TokenEvent",
           "StageDied", "EngineClosed"]
