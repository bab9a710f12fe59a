"""AttnBatch: the per-micro-batch metadata every layer needs (positions, KV slots, block tables)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class AttnBatch:
    positions: torch.Tensor  # [T] int64: absolute position of each token
    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset where its k/v go
    block_tables: torch.Tensor  # [B, M] int32, padded with 0
    query_start: torch.Tensor  # [B+1] int32: cu_seqlens of the flat token batch
    context_lens_t: torch.Tensor  # [B] int32: cached tokens after this step, chunk included
    query_lens: list[int]
    context_lens: list[int]
    logits_indices: torch.Tensor  # [R] int64: rows whose logits are wanted (last token of a sample)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    @property
    def max_context(self) -> int:
        return max(self.context_lens)

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
                   query_lens=list(query_lens), context_lens=list(context_lens),
                   logits_indices=dev[o[4]:])
