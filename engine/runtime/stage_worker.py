"""StageWorker: everything one pipeline rank does on its device: prepare the micro-batch's metadata
from its plan, run its Stage, time it, sample on the last stage, pass the result on (`run`, the step
every rank shares), and (ranks > 0) serve the hop's messages until Stop."""
from __future__ import annotations

import torch
import torch.distributed as dist

from model.stage import Stage

from .channel import HopChannel, Stats, Stop
from .clock import StageTimer
from .decode_graphs import DecodeGraphs
from .jit_watch import LateCompiles
from .stage_sampling import LastStageSampler
from .step_plan import H_MAXQ, H_MB, PlanView, eager_batch
from .trace import StageProfiler, forward_name


class StageWorker:
    def __init__(self, stage: Stage, rank: int, num_stages: int, block_size: int, groups: tuple | None = None):
        """groups: the (fwd, ret, ctrl) process groups of the hop (engine/runtime/channel.py) when
        num_stages > 1."""
        self.stage, self.rank, self.num_stages, self.block_size = stage, rank, num_stages, block_size
        self.device = stage.device
        self.channel = HopChannel(rank, num_stages, self.device, *groups) if num_stages > 1 else None
        self.timer = StageTimer(self.device)
        self.sample_timer = StageTimer(self.device)
        self.graphs: DecodeGraphs | None = None
        self.profiler = StageProfiler(stage, rank)
        self.tracer = self.profiler.tracer  # off until LLM.start_profile: one attribute test per slice
        self.late = LateCompiles(rank)  # installed once start-up is over (engine/runtime/launch.py)
        self.sampler = LastStageSampler(stage.cfg.vocab_size, self.device, stage.backend.penalties_fused) \
            if self.is_last else None

    @property
    def is_last(self) -> bool:
        return self.rank == self.num_stages - 1

    def forward(self, x: torch.Tensor, view: PlanView) -> torch.Tensor:
        """Run the stage on one micro-batch: a captured graph for pure decode, else eager; both
        prepared from the plan by step_plan.fill_batch."""
        t = self.timer.start()
        g = self.tracer.gpu_start()
        replay = self.graphs is not None and self.graphs.fits(view)
        if replay:
            # the last stage samples from the logits in this stream before the next replay is queued
            # (run): no copy of them; a hidden state sent on goes out as a copy
            out = self.graphs.run(x, view, copy=not self.is_last)
        else:
            out = self.stage(x, eager_batch(view, self.device))
        # the step-cost calibration (on_step) sees eager steps only: the steps max_step_ms bounds
        # carry prefill and run eager, while a replay skips the launch cost the fit holds
        calibrate = self.timer.on_step is not None and not replay
        self.timer.stop(t, view.T, view.causal_pairs() if calibrate else None)
        if g is not None:
            self.tracer.gpu_end(g, forward_name(view.header[H_MAXQ]),
                                {"mb": view.header[H_MB], "tokens": view.T, "rows": view.B})
        return out

    def sample(self, logits: torch.Tensor, view: PlanView) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(sampled ids [R], logprob table [R + P, W] or None): engine/runtime/stage_sampling.py."""
        t = self.sample_timer.start()
        g = self.tracer.gpu_start()
        out = self.sampler(logits, view)
        self.sample_timer.stop(t, view.R)
        if g is not None:
            self.tracer.gpu_end(g, "sample", {"mb": view.header[H_MB], "rows": view.R})
        return out

    def stats(self, reset: bool, per_step: bool = False) -> dict:
        out = {"rank": self.rank, "layers": [self.stage.start, self.stage.end],
               **self.timer.collect(reset, per_step)}
        if self.is_last:
            out["sample_ms"] = self.sample_timer.collect(reset)["busy_ms"]
        kv = self.stage.kv_cache
        out.update(self.late.stats())
        out["kv_gib"] = kv.numel() * kv.element_size() / 2**30 if kv is not None else 0.0
        if self.device.type == "cuda":
            out["peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            if reset:
                torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import resource
            out["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS
        return out

    def run(self, x: torch.Tensor, view: PlanView) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The step every rank runs on a micro-batch: forward, then pass the hidden states to the
        next rank, or (the last stage) sample. Returns (ids, logprob table or None) on a single
        stage; a last stage behind rank 0 sends them back to it instead; otherwise None."""
        out = self.forward(x, view)
        if not self.is_last:
            self._timed_send(self.channel.send_hidden, [out], view, self.rank + 1)
            return None
        if not self.sampler.has_work(view):
            return None
        ids, table = self.sample(out, view)
        if self.rank == 0:
            return ids, table
        self._timed_send(self.channel.send_return, [[ids] + ([table] if table is not None else [])], view, 0)
        return None

    def _timed_send(self, send, args: list, view: PlanView, to: int) -> None:
        s = self.tracer.host_start()
        send(*args)
        if s is not None:
            self.tracer.host_end(s, "send", {"mb": view.header[H_MB], "to": to})

    def serve(self) -> None:
        """Ranks > 0: take the hop's messages from the previous rank until Stop; run each
        micro-batch (its header and plan relayed ahead of the forward, as stage 0 sends them)."""
        ch = self.channel
        while True:
            w = self.tracer.host_start()
            msg = ch.recv_batch()
            if isinstance(msg, Stop):
                if not self.is_last:
                    ch.send_ctrl(msg)
                ch.flush()
                return
            if isinstance(msg, Stats):
                self.add_stats(msg)
                ch.send_ctrl(msg)  # the last stage's goes back to rank 0
                continue
            if not self.is_last:
                ch.send_batch(msg)
            x = ch.recv_hidden(msg, self.stage.cfg.hidden_size, self.stage.dtype)
            if w is not None:
                self.tracer.host_end(w, "wait", {"mb": msg.header[H_MB]})
            self.run(x, msg)

    def add_stats(self, msg: Stats) -> None:
        """Run the request's profiler command on this stage and append this stage's stats."""
        done = self.profiler.apply(msg.profile)  # LLM.start_profile / stop_profile
        msg.stages.append({**self.stats(msg.reset, msg.per_step), **done})

    # ---- KV pool -----------------------------------------------------------------------------
    def size_kv_pool(self, kv_cache_gib: float | None, gpu_memory_utilization: float, warmup_tokens: int) -> int:
        """Blocks this stage can hold: an explicit budget, or on CUDA the free memory after a
        warm-up forward of `warmup_tokens` (activation peak kept in reserve) times the user fraction."""
        per_block = self.stage.kv_bytes_per_block(self.block_size)
        if kv_cache_gib is not None:
            return int(kv_cache_gib * 2**30 // per_block)
        if self.device.type != "cuda":
            return int(0.25 * 2**30 // per_block)  # CPU default: 256 MiB
        torch.cuda.reset_peak_memory_stats(self.device)
        self._warmup(warmup_tokens)
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        current = torch.cuda.memory_allocated(self.device)
        budget = total * gpu_memory_utilization - (total - free) - (peak - current)
        return max(0, int(budget // per_block))

    def _warmup(self, T: int) -> None:
        from .step_plan import warmup_plan
        nblocks = -(-T // self.block_size)
        self.stage.allocate_kv(nblocks, self.block_size)
        header, plan = warmup_plan(T, self.block_size)
        view = PlanView(header.tolist(), torch.from_numpy(plan).to(self.device))
        if self.stage.has_embed:
            x = torch.randint(0, self.stage.cfg.vocab_size, (T,), device=self.device)
        else:
            x = torch.randn(T, self.stage.cfg.hidden_size, device=self.device, dtype=self.stage.dtype) * 0.1
        out = self.forward(x, view)
        if self.is_last:
            self.sample(out, view)
        self.stage.kv_cache = None
        self.timer.collect(reset=True)
        self.sample_timer.collect(reset=True)

    def warm_sampler(self, vocab_size: int) -> None:
        """Compile the sampler's kernels at each row-count class and tile choice (few rows and
        >= 128 rows take different tiles: model/sampler_triton.py), unfiltered and with top-k +
        top-p + min-p, with the sampling rows 16-byte aligned and not (they are a view into the
        int32 plan at any offset; Triton specializes on a pointer's alignment), so that no sampled
        request pays Triton's JIT. Bias and logprobs are torch ops (no kernel to compile), and so are
        penalties unless the backend fuses them (then their kernel is compiled here too, at both
        alignments); the processed-logprobs path reads the thresholds of the same kernels."""
        from model.sampler import ROW, pack_rows, sample
        from model.sampler_penalties import PenaltyState
        g = torch.Generator(device=self.device).manual_seed(0)
        penalties = PenaltyState(1, vocab_size, self.device, fused=True) if self.stage.backend.penalties_fused else None
        for R in (1, 5, 128, 256):
            logits = torch.randn(R, vocab_size, generator=g, device=self.device)
            for spec in ((1.0, 0, 1.0, 0.0, 0, 0), (1.0, 20, 0.9, 0.05, 0, 0)):  # greedy has no kernel
                rows, flags = pack_rows([spec + (0, 0.1, 0.1, 1.1)] * R if penalties else [spec] * R)
                buf = torch.zeros(R * ROW + 1, dtype=torch.int32, device=self.device)
                for shift in (0, 1):  # aligned, then 4 bytes off
                    view = buf[shift:shift + R * ROW].view(R, ROW)
                    view.copy_(torch.from_numpy(rows))
                    sample(logits if penalties is None else penalties.apply(logits, view), view, flags)

    def allocate(self, num_blocks: int) -> None:
        """The pool plus one scratch block (id num_blocks) that padded graph rows write into."""
        self.stage.allocate_kv(num_blocks + 1, self.block_size)
        self.scratch_block = num_blocks

    def capture_graphs(self, max_model_len: int, max_batch: int) -> None:
        self.graphs = DecodeGraphs(self.stage, self.block_size, max_model_len, max_batch, self.scratch_block)
        self.timer.collect(reset=True)


def agree_min(value: int, device: torch.device) -> int:
    """The minimum of `value` over every rank (the pool is as large as the tightest stage allows)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
