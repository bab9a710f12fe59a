"""moepipe engine: `from engine import LLM, SamplingParams`."""
from .llm import LLM, StageDied
from .params import RequestOutput, SamplingParams
from .scheduler import RequestRefused

__all__ = ["LLM", "SamplingParams", "RequestOutput", "RequestRefused", "StageDied"]
