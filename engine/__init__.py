"""moepipe engine: `from engine import LLM, SamplingParams`. Names are imported on first use, so
`python -m engine` starts (and answers Ctrl-C) before torch is loaded.

The data path (S stages, one process each; pipes carry pickled messages, the hop is torch.distributed
point-to-point: NCCL on CUDA, gloo on CPU):

  cli/, server/  ->  LLM (llm.py: prompts checked, streams)  ->  EngineClient (client.py)
                                                                    | pipe ("add", "abort", "stats", ...)
                                                                    v
  rank 0    runtime/worker.py serve_requests -> PipelineEngine.step (runtime/pipeline.py):
            Scheduler.schedule (scheduler.py, block_manager.py) picks chunks -> build_plan
            (step_plan.py, sampling_plan.py) -> StageWorker.forward (stage_worker.py): layers [0, k)
            -> fwd hop (p2p.py): header, plan, hidden -> rank 1
  rank i    StageWorker.serve: recv header, plan, hidden -> its layers -> fwd hop to rank i+1
  rank S-1  its layers, head, StageWorker.sample (stage_sampling.py) -> ret hop: sampled ids -> rank 0
  rank 0    ids -> Scheduler.complete -> ("events", ...) on the pipe -> the client's router thread
            -> LLM -> each request's RequestStream (request_stream.py) or its on_event callback.

Folders: runtime/ runs in the stage processes, tools/ measure and check (auto split, plan, parity,
chat template), cli/ and server/ are the front ends, structured/ holds grammar-constrained output."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": ".llm", "EngineClosed": ".client", "StageDied": ".client",
    "RequestStream": ".request_stream", "TokenEvent": ".request_stream",
    "EngineOptions": ".options",
    "RequestOutput": ".params", "SamplingParams": ".params",
    "RequestRefused": ".runtime.scheduler",
    "StructuredOutputsParams": ".structured.params",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
