"""Stage: the layers [start, end) of one pipeline rank, plus the embedding on the first stage and
final norm + lm_head on the last. One stage with every layer is the whole model."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backend import Backend, pick_backend
from .batch import AttnBatch
from .config import ModelConfig
from .layers import DecoderLayer, Trace, Weight
from .norm import norm
from .rope import Rope


class Stage(nn.Module):
    def __init__(self, cfg: ModelConfig, start: int, end: int, has_embed: bool, has_head: bool,
                 device: torch.device | str, dtype: torch.dtype, attention: str | None = None,
                 backend: Backend | None = None):
        super().__init__()
        device = torch.device(device)
        self.cfg, self.start, self.end = cfg, start, end
        self.has_embed, self.has_head = has_embed, has_head
        self.device, self.dtype = device, dtype
        if has_embed:
            self.embed_tokens = Weight(cfg, "embed_tokens.weight", device, dtype)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i, device, dtype) for i in range(start, end)})
        if has_head:
            self.norm = Weight(cfg, "norm.weight", device, dtype)
            self.lm_head = Weight(cfg, "lm_head.weight", device, dtype)
        self.rope = Rope(cfg.rope, cfg.head_dim, dtype, device)
        self.backend = backend or pick_backend(device, attention)
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
        the last stage fp32 logits [R, V] of the rows batch.logits_indices. With a trace dict the
        torch reference maths run (self.backend.reference()) and record every sub-layer."""
        assert self.kv_cache is not None, "allocate_kv() before forward()"
        h = F.embedding(x, self.embed_tokens.weight) if self.has_embed else x.to(self.dtype)
        if trace is not None and self.has_embed:
            trace["embed"] = h
        be = self.backend if trace is None else self.backend.reference()
        cos, sin = self.rope(batch.positions)
        pending = None
        for j, layer in enumerate(self.layers.values()):
            h, pending = layer(h, pending, cos, sin, batch, (self.kv_cache[j, 0], self.kv_cache[j, 1]), be, trace)
        if pending is not None:
            h = h + pending
        if not self.has_head:
            return h
        h = norm(h[batch.logits_indices], self.norm.weight, self.cfg.rms_norm_eps, be.fused_norms)
        logits = F.linear(h, self.lm_head.weight)
        if trace is not None:
            trace["final_norm"], trace["logits"] = h, logits
        return logits.float()
