"""moepipe engine: `from engine import LLM, SamplingParams`. Names are imported on first use, so
`python -m engine` starts (and answers Ctrl-C) before torch is loaded.

The data path (S stages, one process each; pipes carry pickled messages; the hop, runtime/channel.py,
is torch.distributed point-to-point: tensors on NCCL (CUDA) or gloo (CPU), headers and control
messages on a host-memory gloo group):

  cli/, server/  ->  LLM (llm.py: prompts checked, streams)  ->  EngineClient (client.py)
                                                                    | pipe ("add", "abort", "stats", ...)
                                                                    v
  rank 0    runtime/worker.py serve_requests -> PipelineEngine.step (runtime/pipeline.py):
            Scheduler.schedule (scheduler.py, block_manager.py) picks chunks -> build_plan
            (step_plan.py, sampling_plan.py) -> HopChannel.send_batch: header, plan -> rank 1;
            StageWorker.run (stage_worker.py): layers [0, k) -> send_hidden -> rank 1
  rank i    StageWorker.serve: recv_batch (header from host memory, plan), relayed on ahead;
            recv_hidden -> StageWorker.run: its layers -> send_hidden -> rank i+1
  rank S-1  StageWorker.run: its layers, head, sample (stage_sampling.py) -> send_return: ids -> rank 0
  rank 0    ids -> Scheduler.complete -> ("events", ...) on the pipe -> the client's router thread
            -> LLM -> each request's RequestStream (request_stream.py) or its on_event callback.
  Stats and Stop are typed control messages (send_ctrl / recv_ctrl) that follow the same path
  behind the micro-batches in flight; the last stage sends Stats back to rank 0.

Folders: runtime/ runs in the stage processes, tools/ measure and check (auto split, plan, parity,
chat template), cli/ and server/ are the front ends, structured/ holds grammar-constrained output."""
from __future__ import annotations

from .lazy import lazy_getattr

_EXPORTS = {
    "LLM": ".llm", "EngineClosed": ".client", "StageDied": ".client",
    "RequestStream": ".request_stream", "TokenEvent": ".request_stream",
    "EngineOptions": ".options",
    "RequestOutput": ".params", "SamplingParams": ".params",
    "RequestRefused": ".runtime.scheduler",
    "StructuredOutputsParams": ".structured.params",
}
__all__ = list(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
