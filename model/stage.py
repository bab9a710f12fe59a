"""Stage: the layers [start, end) of one pipeline rank, plus the embedding on the first stage and
final norm + lm_head on the last. One stage with every layer is the whole model."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention_ref
from .batch import AttnBatch
from .config import ModelConfig
from .layers import DecoderLayer, Trace, Weight
from .norm import norm
from .rope import Rope


def reference_attend(q, k_cache, v_cache, batch: AttnBatch, scale: float) -> torch.Tensor:
    return attention_ref(q, k_cache, v_cache, batch.block_tables, batch.query_lens, batch.context_lens, scale)


def triton_attend(q, k_cache, v_cache, batch: AttnBatch, scale: float) -> torch.Tensor:
    from .attention_triton import paged_attention
    return paged_attention(q, k_cache, v_cache, batch.block_tables, batch.query_start, batch.context_lens_t,
                           scale, batch.max_query_len, batch.max_context)


def sdpa_attend(q, k_cache, v_cache, batch: AttnBatch, scale: float) -> torch.Tensor:
    """Decode-only micro-batches: the Triton split-K decode kernel; prefill: fused SDPA."""
    from .attention_sdpa import prefill_sdpa
    from .attention_triton import paged_decode
    if batch.max_query_len == 1:
        return paged_decode(q, k_cache, v_cache, batch.block_tables, batch.context_lens_t, scale, batch.max_context)
    return prefill_sdpa(q, k_cache, v_cache, batch, scale, paged_decode)


_BACKENDS = {"ref": reference_attend, "triton": triton_attend, "sdpa": sdpa_attend}


def pick_attention(device: torch.device, name: str | None = None) -> Callable:
    """'ref' (torch, any device), 'triton' (all Triton) or 'sdpa' (Triton decode + SDPA prefill,
    the CUDA default)."""
    name = name or ("sdpa" if device.type == "cuda" else "ref")
    if name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r}: expected one of {', '.join(_BACKENDS)}")
    if name != "ref" and device.type != "cuda":
        raise ValueError(f"attention backend {name!r} needs a CUDA device")
    return _BACKENDS[name]


class Stage(nn.Module):
    def __init__(self, cfg: ModelConfig, start: int, end: int, has_embed: bool, has_head: bool,
                 device: torch.device | str, dtype: torch.dtype, attention: str | None = None):
        super().__init__()
        device = torch.device(device)
        self.cfg, self.start, self.end = cfg, start, end
        self.has_embed, self.has_head = has_embed, has_head
        self.device, self.dtype = device, dtype
        if has_embed:
            self.embed_tokens = Weight(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i, device, dtype) for i in range(start, end)})
        if has_head:
            self.norm = Weight(cfg.hidden_size, device=device, dtype=dtype)
            self.lm_head = Weight(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.rope = Rope(cfg.rope, cfg.head_dim, dtype, device)
        self.attend = pick_attention(device, attention)
        self.kv_cache: torch.Tensor | None = None  # [layers, 2, P, S, K, D]

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    def allocate_kv(self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None) -> None:
        c = self.cfg
        self.kv_cache = None
        self.kv_cache = torch.zeros(self.num_layers, 2, num_blocks, block_size, c.num_key_value_heads,
                                    c.head_dim, device=self.device, dtype=dtype or self.dtype)

    def kv_bytes_per_block(self, block_size: int, dtype: torch.dtype | None = None) -> int:
        return self.num_layers * block_size * self.cfg.kv_bytes_per_token_per_layer(dtype or self.dtype)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, batch: AttnBatch, trace: Trace = None) -> torch.Tensor:
        """x: token ids [T] on the first stage, hidden [T, H] elsewhere. Returns hidden [T, H], or on
        the last stage fp32 logits [R, V] of the rows batch.logits_indices."""
        assert self.kv_cache is not None, "allocate_kv() before forward()"
        h = F.embedding(x, self.embed_tokens.weight) if self.has_embed else x.to(self.dtype)
        if trace is not None and self.has_embed:
            trace["embed"] = h
        cos, sin = self.rope(batch.positions)
        for j, layer in enumerate(self.layers.values()):
            h = layer(h, cos, sin, batch, (self.kv_cache[j, 0], self.kv_cache[j, 1]), self.attend, trace)
        if not self.has_head:
            return h
        h = norm(h[batch.logits_indices], self.norm.weight, self.cfg.rms_norm_eps)
        logits = F.linear(h, self.lm_head.weight)
        if trace is not None:
            trace["final_norm"], trace["logits"] = h, logits
        return logits.float()
