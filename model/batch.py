"""AttnBatch: the per-micro-batch metadata every layer needs (positions, KV slots, block tables)."""
from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np
import torch


class SingleRows(NamedTuple):
    """The single-query rows of a micro-batch (decodes riding with prefill chunks): their token rows
    [S] int64, and their sequences' block tables [S, M] int32 and context lengths [S] int32
    (contiguous, as the decode kernel takes them), and the largest of those lengths (host int)."""
    rows: torch.Tensor
    block_tables: torch.Tensor
    context_lens_t: torch.Tensor
    max_context: int


class AttnBatch:
    """positions [T] int64, slot_mapping [T] int64 (block_id * block_size + offset where k/v go),
    block_tables [B, M] int32, query_start [B+1] int32 (cu_seqlens of the flat token batch),
    context_lens_t [B] int32 (cached tokens after this step, chunk included), logits_indices [R]
    int64 (rows whose logits are wanted). max_query_len / max_context are host ints (upper bounds
    that size kernel grids). The host lists query_lens / context_lens are read from the tensors
    on first use when not given (only the torch reference and the SDPA prefill need them)."""

    def __init__(self, positions: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                 query_start: torch.Tensor, context_lens_t: torch.Tensor, logits_indices: torch.Tensor,
                 query_lens: list[int] | None = None, context_lens: list[int] | None = None,
                 max_query_len: int | None = None, max_context: int | None = None):
        self.positions, self.slot_mapping, self.block_tables = positions, slot_mapping, block_tables
        self.query_start, self.context_lens_t, self.logits_indices = query_start, context_lens_t, logits_indices
        self._query_lens, self._context_lens = query_lens, context_lens
        self._single: SingleRows | None | bool = False  # False: not built yet
        self.max_query_len = max_query_len if max_query_len is not None else max(self.query_lens)
        self.max_context = max_context if max_context is not None else max(self.context_lens)

    @property
    def query_lens(self) -> list[int]:
        if self._query_lens is None:
            self._query_lens = torch.diff(self.query_start).tolist()
        return self._query_lens

    @property
    def context_lens(self) -> list[int]:
        if self._context_lens is None:
            self._context_lens = self.context_lens_t.tolist()
        return self._context_lens

    def single_rows(self) -> SingleRows | None:
        """The micro-batch's single-query rows (None: it has none), built on the first layer's call
        and shared by every layer: the indices go to the device in one non-blocking copy from pinned
        memory. (A blocking host-to-device copy synchronizes the stream: one per layer left the GPU
        idle while the host launched the rest of the layer.)"""
        if self._single is False:
            qlens, ctxs = self.query_lens, self.context_lens
            seqs = [b for b, ql in enumerate(qlens) if ql == 1]
            if not seqs:
                self._single = None
            else:
                starts = list(itertools.accumulate(qlens, initial=0))
                idx = torch.tensor([starts[b] for b in seqs] + seqs, dtype=torch.int64)
                dev = self.block_tables.device
                if dev.type == "cuda":
                    idx = idx.pin_memory().to(dev, non_blocking=True)
                rows, seq_t = idx[:len(seqs)], idx[len(seqs):]
                self._single = SingleRows(rows, self.block_tables[seq_t].contiguous(),
                                          self.context_lens_t[seq_t].contiguous(), max(ctxs[b] for b in seqs))
        return self._single

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @classmethod
    def build(cls, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
              block_size: int, sample_rows: list[bool], device: torch.device | str) -> "AttnBatch":
        """Sequence b contributes query_lens[b] tokens ending at context_lens[b]; its logits row
        (its last token) is kept when sample_rows[b]."""
        B = len(query_lens)
        M = max(1, max(len(t) for t in block_tables))
        tables = np.zeros((B, M), dtype=np.int32)
        for b, t in enumerate(block_tables):
            tables[b, :len(t)] = t
        qs = np.zeros(B + 1, dtype=np.int64)
        qs[1:] = np.cumsum(query_lens)
        pos = np.concatenate([np.arange(c - q, c, dtype=np.int64) for q, c in zip(query_lens, context_lens)])
        seq_of = np.repeat(np.arange(B), query_lens)
        slots = tables[seq_of, pos // block_size].astype(np.int64) * block_size + pos % block_size
        rows = [int(qs[b + 1] - 1) for b in range(B) if sample_rows[b]]
        host = torch.from_numpy(np.concatenate([pos, slots, qs, np.asarray(context_lens, np.int64),
                                                np.asarray(rows, np.int64)]))
        dev = host.to(device, non_blocking=True)
        T = len(pos)
        o = np.cumsum([0, T, T, B + 1, B])
        return cls(positions=dev[o[0]:o[1]], slot_mapping=dev[o[1]:o[2]],
                   block_tables=torch.from_numpy(tables).to(device, non_blocking=True),
                   query_start=dev[o[2]:o[3]].to(torch.int32), context_lens_t=dev[o[3]:o[4]].to(torch.int32),
                   logits_indices=dev[o[4]:], query_lens=list(query_lens), context_lens=list(context_lens))
