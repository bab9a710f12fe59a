"""LLM: the importable engine. Starts one process per pipeline stage (NCCL on CUDA, gloo on CPU),
keeps them for repeated generate calls, and ends them on close() or when one dies."""
from __future__ import annotations

import queue
import socket
import time
from typing import Iterator, Sequence as Seq

import torch
import torch.multiprocessing as mp

from model.config import ModelConfig, parse_dtype

from .launch import EngineArgs, spawned_main
from .model_files import load_tokenizer, resolve_model, stop_token_ids
from .params import RequestOutput, SamplingParams
from .scheduler import check_request

Prompt = str | list[int]
DEAD_PEER_POLL_S = 0.5


class StageDied(RuntimeError):
    """A stage process ended while the engine needed it."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LLM:
    def __init__(self, model: str, stages: int = 1, device: str | None = None, dtype: str | torch.dtype | None = None,
                 layers: list[int] | None = None, block_size: int = 16, kv_cache_gib: float | None = None,
                 gpu_memory_utilization: float = 0.9, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 max_model_len: int | None = None, attention: str | None = None, seed: int = 0,
                 revision: str | None = None, verbose: bool = True, enforce_eager: bool = False,
                 load_timeout_s: float = 3600):
        self._procs: list = []
        folder, hub_repo = resolve_model(model, revision)
        self.config = ModelConfig.from_file(folder)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device not in ("cuda", "cpu"):
            raise ValueError(f"device {device!r}: expected 'cuda' or 'cpu'")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise ValueError(f"stages must be an integer >= 1, got {stages!r}")
        if stages > self.config.num_hidden_layers:
            raise ValueError(f"stages={stages} exceeds the model's {self.config.num_hidden_layers} layers")
        if device == "cuda" and stages > torch.cuda.device_count():
            raise ValueError(f"stages={stages} needs {stages} GPUs, only {torch.cuda.device_count()} visible")
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        if max_model_len is not None and not 0 < max_model_len <= self.config.max_position_embeddings:
            raise ValueError(f"max_model_len={max_model_len} must be in [1, {self.config.max_position_embeddings}] "
                             f"(max_position_embeddings of {self.config.source})")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        dt = parse_dtype(dtype) or (torch.bfloat16 if device == "cuda" else torch.float32)
        if layers is not None:
            from loader.partition import partition
            partition(self.config.num_hidden_layers, stages, layers)  # validates
        self.tokenizer = load_tokenizer(folder)
        self.stop_ids = stop_token_ids(folder)
        self.args = EngineArgs(str(folder), stages, device, str(dt).removeprefix("torch."), layers, block_size,
                               kv_cache_gib, gpu_memory_utilization, max_num_seqs, max_num_batched_tokens,
                               max_model_len, attention, seed, hub_repo, revision, self.stop_ids, verbose,
                               enforce_eager)
        self._next_id = 0
        self._start(load_timeout_s)

    # ---- processes ---------------------------------------------------------------------------
    def _start(self, timeout_s: float) -> None:
        ctx = mp.get_context("spawn")
        self._req_q, self._out_q, self._status_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
        port = _free_port()
        for rank in range(self.args.stages):
            p = ctx.Process(target=spawned_main, name=f"moepipe-stage{rank}", daemon=True,
                            args=(rank, self.args, port, self._req_q, self._out_q, self._status_q))
            p.start()
            self._procs.append(p)
        infos, deadline = {}, time.monotonic() + timeout_s
        try:
            while len(infos) < self.args.stages:
                msg = self._status(timeout=DEAD_PEER_POLL_S)
                if msg is not None:
                    infos[msg[1]] = msg[2]
                elif time.monotonic() > deadline:
                    raise TimeoutError(f"stages did not finish loading within {timeout_s:.0f} s")
        except BaseException:
            self.close()
            raise
        self.info = infos[0]
        self.stage_info = [infos[r] for r in range(self.args.stages)]
        self.max_model_len = self.info["max_model_len"]

    def _status(self, timeout: float):
        """Next 'ready' message; raises StageDied on an 'error' message or a dead process."""
        try:
            msg = self._status_q.get(timeout=timeout)
        except queue.Empty:
            self._check_alive()
            return None
        if msg[0] == "error":
            self.close()
            raise StageDied(f"stage {msg[1]} failed: {msg[2]}")
        return msg

    def _check_alive(self) -> None:
        """Raise StageDied naming the stage that died first-hand: one ended by a signal or without
        reporting beats one that reported an error (often just its peer's broken link)."""
        if all(p.is_alive() for p in self._procs):
            return
        time.sleep(0.3)  # let a peer's broken-link failure land, then pick the culprit
        said = {}
        while True:
            try:
                msg = self._status_q.get(timeout=0.2)
            except queue.Empty:
                break
            if msg[0] == "error":
                said[msg[1]] = msg[2]
        dead = [(r, p) for r, p in enumerate(self._procs) if not p.is_alive()]
        rank, p = min(dead, key=lambda rp: (rp[0] in said, (rp[1].exitcode or 0) >= 0, rp[0]))
        why = f": {said[rank]}" if rank in said else ""
        code = p.exitcode
        self.close()
        raise StageDied(f"stage {rank} (pid {p.pid}) died with exit code {code}{why}")

    def close(self) -> None:
        procs, self._procs = self._procs, []
        if not procs:
            return
        if all(p.is_alive() for p in procs):
            self._req_q.put(("shutdown",))
            for p in procs:
                p.join(timeout=10)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---- requests ----------------------------------------------------------------------------
    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json: give prompts as lists of token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if not all(isinstance(t, int) and 0 <= t < self.config.vocab_size for t in ids):
                raise ValueError(f"prompt token ids must be integers in [0, {self.config.vocab_size})")
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        return ids

    def _prepare(self, prompts, params) -> tuple[list[list[int]], list[SamplingParams]]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        params = params if params is not None else SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        ids = [self._encode(p) for p in prompts]
        for i, (x, sp) in enumerate(zip(ids, plist)):
            try:
                check_request(len(x), sp.max_tokens, self.max_model_len, self.info["num_blocks"], self.info["block_size"])
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        return ids, plist

    def stream(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None
               ) -> Iterator[tuple[int, int, str | None]]:
        """Yield (prompt index, new token id, finish reason or None) as tokens arrive."""
        ids, plist = self._prepare(prompts, params)
        return self._stream(ids, plist)

    def _stream(self, ids: list[list[int]], plist: list[SamplingParams]) -> Iterator[tuple[int, int, str | None]]:
        if not self._procs:
            raise RuntimeError("the engine is closed")
        base = self._next_id
        self._next_id += len(ids)
        self._req_q.put(("add", [(base + i, x, sp) for i, (x, sp) in enumerate(zip(ids, plist))]))
        remaining = len(ids)
        while remaining:
            msg = self._recv()
            if msg[0] == "refused":
                raise ValueError(f"prompt {msg[1] - base}: {msg[2]}")
            for rid, tok, reason in msg[1]:
                yield rid - base, tok, reason
                remaining -= reason is not None

    def _recv(self):
        """Next message from rank 0; a stage that failed exits, so _check_alive reports it (and
        reads its error message itself, to name the stage that failed first-hand)."""
        while True:
            try:
                return self._out_q.get(timeout=DEAD_PEER_POLL_S)
            except queue.Empty:
                self._check_alive()

    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        ids, plist = self._prepare(prompts, params)
        outs = [RequestOutput(i, x) for i, x in enumerate(ids)]
        for i, tok, reason in self._stream(ids, plist):
            outs[i].token_ids.append(tok)
            outs[i].finish_reason = reason
        if self.tokenizer is not None:
            for o in outs:
                o.text = self.tokenizer.decode(o.token_ids)
        return outs

    def stats(self, reset: bool = False) -> list[dict]:
        """Per stage: busy ms, steps and tokens since the last reset (call between generates)."""
        self._req_q.put(("stats", reset))
        msg = self._recv()
        return msg[1]
