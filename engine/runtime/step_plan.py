"""The typed plan of one micro-batch. Stage 0 builds it once from the scheduler's chunks; it travels
down the pipeline as a fixed int64 header (host ints every stage needs before it can receive or
launch) plus one int32 tensor, and every stage fills its attention metadata, eager or CUDA graph,
through the one prepare path `fill_batch`.

int32 plan layout (T tokens, B sequences, R sampled rows, M block-table columns, P prompt-logprob
rows; the sampling extras' counts NB, NR, NP, NO are 0 unless some row asked for them):
  ids[T] positions[T] slots[T] query_start[B+1] context_lens[B] block_tables[B*M]
  logits_indices[R+P] (the R sampled rows, then the P prompt positions whose next token's logprob
  is asked) sampling rows[R*ROW] (model/sampler.py)
  bias[NB*3] (row, token, float32 bits: logit_bias and min_tokens' -inf on stop tokens)
  resets[NR] prompt_pairs[NP*2] output_pairs[NO*2] (penalty slots (re)started: slot; (slot, token))
  prompt_targets[P] (the token whose logprob each prompt row gives)
  mask_rows[NS] bitmask[NS*W] (structured output: the NS sampled rows under a grammar, and each
  one's allowed tokens, W = ceil(V/32) int32 words; NS = 0 unless some sampled row has a grammar)
(engine/runtime/sampling_plan.py builds the extras, engine/structured/rows.py the bitmask;
engine/runtime/stage_sampling.py applies them.)"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.batch import AttnBatch
from model.sampler import ROW, pack_rows

HEADER = 20
(H_KIND, H_MB, H_T, H_B, H_R, H_M, H_MAXQ, H_MAXCTX, H_FLAGS, H_AUX0, H_AUX1, H_AUX2,
 H_NB, H_NR, H_NP, H_NO, H_P, H_LPK, H_SLOTS, H_SPARE) = range(HEADER)
H_FED = H_AUX2  # batch plans: 1 when the ids are indices into returned ids (async scheduling)
H_NS, H_MASKW = H_SPARE, H_AUX0  # batch plans: structured rows NS, and W (their bitmask's words per row)
# H_KIND: BATCH, STATS or STOP (engine/runtime/channel.py); a control header's H_AUX0: its message's bytes
# H_LPK: 0, or 1 + k when a logprob table with top-k (model/sampler_logprobs.py) comes back with
# the ids; H_SLOTS: the penalty slots the last stage keeps (engine/runtime/sampling_plan.py)
_SEED_MIX = 0x9E3779B97F4A7C15


def plan_len(h: list[int]) -> int:
    """int32 elements of the plan of header h."""
    return offsets(h)["bitmask"][1]


def offsets(h: list[int]) -> dict[str, tuple[int, int]]:
    T, B, R, M, P = h[H_T], h[H_B], h[H_R], h[H_M], h[H_P]
    sizes = [("ids", T), ("positions", T), ("slots", T), ("query_start", B + 1), ("context_lens", B),
             ("block_tables", B * M), ("logits_indices", R + P), ("rows", R * ROW), ("bias", 3 * h[H_NB]),
             ("resets", h[H_NR]), ("prompt_pairs", 2 * h[H_NP]), ("output_pairs", 2 * h[H_NO]),
             ("prompt_targets", P), ("mask_rows", h[H_NS]), ("bitmask", h[H_NS] * h[H_MASKW])]
    out, o = {}, 0
    for name, n in sizes:
        out[name] = (o, o + n)
        o += n
    return out


def request_seed(params_seed: int | None, engine_seed: int, seq_id: int) -> int:
    """A request's sampling seed: its own, else one derived from the engine seed and its id."""
    if params_seed is not None:
        return params_seed & (2**64 - 1)
    return (engine_seed * _SEED_MIX + seq_id * 0xBF58476D1CE4E5B9 + 1) & (2**64 - 1)


def build_plan(kind: int, mb_id: int, chunks, block_size: int, engine_seed: int,
               fed: list[int] | None = None, extras=None, mask: tuple[np.ndarray, np.ndarray] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(header int64 [HEADER], plan int32) of scheduler chunks (engine/runtime/scheduler.py Chunk). A
    continuation micro-batch (every chunk one token still being sampled) gives `fed`: per chunk, the
    index of its id among the returned ids stage 0 gathers from; the plan's ids are then those
    indices and the header's H_FED is 1. extras (engine/runtime/sampling_plan.py SamplingExtras): the
    penalty, bias and logprob fields of the sampled rows; None: none. mask (engine/structured/rows.py):
    (int32 [NS] sampled rows, int32 [NS, W] their bitmask) or None."""
    B = len(chunks)
    qlens = np.fromiter((c.length for c in chunks), dtype=np.int64, count=B)
    ends = np.fromiter((c.end for c in chunks), dtype=np.int64, count=B)
    T = int(qlens.sum())
    nblk = -(-ends // block_size)
    M = max(1, int(nblk.max()))
    qs = np.zeros(B + 1, dtype=np.int64)
    qs[1:] = np.cumsum(qlens)
    starts = ends - qlens
    seq_of = np.repeat(np.arange(B), qlens)
    pos = np.arange(T, dtype=np.int64) - qs[:-1][seq_of] + starts[seq_of]
    tables = np.zeros((B, M), dtype=np.int64)
    ids: list[int] = []
    rows = []
    logits = []
    for b, c in enumerate(chunks):
        s = c.seq
        tables[b, :nblk[b]] = s.block_table[:nblk[b]]
        ids += s.token_ids[c.start:c.end] if fed is None else [fed[b]]
        if c.sample:
            p = s.params
            logits.append(qs[b + 1] - 1)
            more = extras.row_fields[len(rows)] if extras is not None else ()
            rows.append((p.temperature, p.top_k, p.top_p, p.min_p, request_seed(p.seed, engine_seed, s.seq_id),
                         len(s.output_ids) + getattr(c, "pending", 0)) + more)  # the step of the token it samples
    slots = tables[seq_of, pos // block_size] * block_size + pos % block_size
    packed, flags = pack_rows(rows)
    R = len(rows)
    plan = np.concatenate([np.asarray(ids, dtype=np.int64), pos, slots, qs, ends, tables.reshape(-1),
                           np.asarray(logits, dtype=np.int64)]).astype(np.int32)
    parts = [plan, packed.reshape(-1)]
    header = np.zeros(HEADER, dtype=np.int64)
    if extras is not None:
        parts[0] = np.concatenate([plan, np.asarray(extras.prompt_positions, dtype=np.int32)])
        parts += extras.sections()
        header[[H_NB, H_NR, H_NP, H_NO, H_P, H_LPK, H_SLOTS]] = extras.counts()
    if mask is not None:
        parts += [mask[0], mask[1].reshape(-1)]
        header[[H_NS, H_MASKW]] = mask[1].shape
    header[[H_KIND, H_MB, H_T, H_B, H_R, H_M, H_MAXQ, H_MAXCTX, H_FLAGS, H_FED]] = [
        kind, mb_id, T, B, R, M, int(qlens.max()), int(ends.max()), flags, int(fed is not None)]
    return header, np.concatenate(parts)


def warmup_plan(T: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The plan of one greedy sequence of T new tokens in blocks 0, 1, ... (memory sizing)."""
    from types import SimpleNamespace

    from ..params import SamplingParams
    seq = SimpleNamespace(block_table=list(range(-(-T // block_size))), token_ids=[0] * T, seq_id=0,
                          params=SamplingParams(temperature=0), output_ids=[])
    return build_plan(0, 0, [SimpleNamespace(seq=seq, start=0, end=T, length=T, sample=True)], block_size, 0)


def decode_plan(context_lens: list[int], tables: list[list[int]], block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The plan of one greedy decode token per sequence (benchmarks that drive a stage directly)."""
    from types import SimpleNamespace

    from ..params import SamplingParams
    sp = SamplingParams(temperature=0)
    chunks = [SimpleNamespace(seq=SimpleNamespace(block_table=t, token_ids=[0] * c, seq_id=0, params=sp, output_ids=[]),
                              start=c - 1, end=c, length=1, sample=True) for c, t in zip(context_lens, tables)]
    return build_plan(0, 0, chunks, block_size, 0)


@dataclass
class PlanView:
    """A received (or locally built) plan: host header ints plus the int32 plan on the device, and
    where this process built it (stage 0), the same int32 plan on the host: eager steps then read
    their query and context lengths from it instead of copying them back from the device (a sync)."""
    header: list[int]
    plan: torch.Tensor
    host: np.ndarray | None = None
    # ranks > 0: the plan's query_start and context_lens (int32 [2B + 1]) as stage 0 sent them on the
    # host link, for steps that are not decode-only (host_lens)
    lens: np.ndarray | None = None

    # header fields: T tokens, B sequences, R sampled rows, M block-table width, P prompt-logprob rows
    T = property(lambda self: self.header[H_T])
    B = property(lambda self: self.header[H_B])
    R = property(lambda self: self.header[H_R])
    M = property(lambda self: self.header[H_M])
    P = property(lambda self: self.header[H_P])
    flags = property(lambda self: self.header[H_FLAGS])

    @property
    def decode_only(self) -> bool:
        return self.header[H_MAXQ] == 1 and self.T == self.B and self.P == 0

    def part(self, name: str) -> torch.Tensor:
        a, b = offsets(self.header)[name]
        return self.plan[a:b]

    @property
    def rows(self) -> torch.Tensor:
        return self.part("rows").view(self.R, ROW)

    def host_lens(self) -> np.ndarray | None:
        """query_start [B + 1] then context_lens [B] (int32, one array) on the host: from the host
        plan (stage 0) or the copy stage 0 sent ahead (lens); None when neither is here."""
        if self.host is not None:
            at = offsets(self.header)
            return self.host[at["query_start"][0]:at["context_lens"][1]]
        return self.lens

    def causal_pairs(self) -> float | None:
        """Causal (query, key) pairs of the step from the host lengths (None without them): each
        row's q new tokens after c - q cached ones, q (c - q) + q (q + 1) / 2 (chunking.chunk_pairs)."""
        lens = self.host_lens()
        if lens is None:
            return None
        q = np.diff(lens[:self.B + 1]).astype(np.float64)
        c = lens[self.B + 1:].astype(np.float64)
        return float((q * (c - q) + q * (q + 1) / 2).sum())


@dataclass
class BatchBuffers:
    """Destination of fill_batch: the tensors an AttnBatch views (fresh per eager step, or a CUDA
    graph's static inputs of capacity B rows / M table columns)."""
    positions: torch.Tensor  # [B] int64
    slots: torch.Tensor  # [B] int64
    query_start: torch.Tensor  # [B+1] int32
    context_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, M] int32
    logits_indices: torch.Tensor  # [B] int64

    @classmethod
    def empty(cls, T: int, B: int, M: int, R: int, device) -> "BatchBuffers":
        i32, i64 = torch.int32, torch.int64
        return cls(torch.empty(T, dtype=i64, device=device), torch.empty(T, dtype=i64, device=device),
                   torch.empty(B + 1, dtype=i32, device=device), torch.empty(B, dtype=i32, device=device),
                   torch.empty(B, M, dtype=i32, device=device), torch.empty(R, dtype=i64, device=device))


def fill_batch(view: PlanView, buf: BatchBuffers, pad_slot: int = 0, pad_block: int = 0) -> None:
    """Copy the plan's metadata into buf (the one prepare path of eager and graph steps). Rows of
    buf past the plan's (graph padding) get one token at position 0 whose k/v go to pad_slot,
    reading block pad_block."""
    T, B, R, M = view.T, view.B, view.R + view.P, view.M
    buf.positions[:T].copy_(view.part("positions"))
    buf.slots[:T].copy_(view.part("slots"))
    buf.query_start[:B + 1].copy_(view.part("query_start"))
    buf.context_lens[:B].copy_(view.part("context_lens"))
    buf.block_tables[:B, :M].copy_(view.part("block_tables").view(B, M))
    buf.logits_indices[:R].copy_(view.part("logits_indices"))
    if buf.positions.shape[0] > T:  # graph padding (decode: one token per row, T == B)
        buf.positions[T:].zero_()
        buf.slots[T:].fill_(pad_slot)
        buf.context_lens[B:].fill_(1)
        buf.block_tables[B:, 0].fill_(pad_block)


def eager_batch(view: PlanView, device) -> AttnBatch:
    """The AttnBatch of an eager step; with the host lengths (PlanView.host_lens), its host lists of
    query and context lengths too (the attention kernels' choice and the SDPA prefill read them;
    without, AttnBatch reads them back from the device: a sync)."""
    buf = BatchBuffers.empty(view.T, view.B, view.M, view.R + view.P, device)
    fill_batch(view, buf)
    lens = {}
    host = view.host_lens()
    if host is not None:
        B = view.B
        lens = dict(query_lens=np.diff(host[:B + 1]).tolist(), context_lens=host[B + 1:].tolist())
    return AttnBatch(buf.positions, buf.slots, buf.block_tables, buf.query_start, buf.context_lens,
                     buf.logits_indices, max_query_len=view.header[H_MAXQ], max_context=view.header[H_MAXCTX], **lens)
