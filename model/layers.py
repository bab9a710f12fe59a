"""Decoder layer of Qwen3-MoE: pre-norm attention (q/k norm, rope, GQA, paged KV) and MoE or dense
MLP. Parameter names and shapes come from the table in model/tensors.py: the checkpoint's names under
`model.layers.{i}.`, except q/k/v, held as one `self_attn.qkv_proj.weight`, and the experts, held fused
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`). Modules hold weights; the maths are the
functions of norm.py, rope.py, attention.py and moe.py, or the kernels the Backend chose."""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import write_kv
from .backend import Backend
from .batch import AttnBatch
from .config import ModelConfig
from .moe import dense_mlp, experts_grouped, experts_loop, route
from .norm import add_norm, norm, rms_norm
from .rope import apply_rope
from .tensors import param_shape

Trace = dict | None


def _param(shape: tuple[int, ...], device, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=False)


class Weight(nn.Module):
    """A module holding one `.weight`, so names read `q_proj.weight` as in the checkpoint."""

    def __init__(self, cfg: ModelConfig, param: str, device, dtype):
        super().__init__()
        self.weight = _param(param_shape(cfg, param), device, dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, device, dtype):
        super().__init__()
        D = cfg.head_dim
        self.nh, self.nkv, self.hd, self.eps = cfg.num_attention_heads, cfg.num_key_value_heads, D, cfg.rms_norm_eps
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = D ** -0.5  # YaRN does not change it
        self.qkv_proj = Weight(cfg, "self_attn.qkv_proj.weight", device, dtype)  # [q | k | v] rows
        self.o_proj = Weight(cfg, "self_attn.o_proj.weight", device, dtype)
        self.q_norm = Weight(cfg, "self_attn.q_norm.weight", device, dtype)
        self.k_norm = Weight(cfg, "self_attn.k_norm.weight", device, dtype)

    def forward(self, x_TH, cos, sin, batch: AttnBatch, kv: tuple[torch.Tensor, torch.Tensor],
                be: Backend, trace: Trace, i: int) -> torch.Tensor:
        T = x_TH.shape[0]
        qkv = be.linear(x_TH, self.qkv_proj.weight)  # [T, q_size + 2 kv_size]
        if be.fused_norms:
            from .fused_triton import qkv_norm_rope_write
            q = qkv_norm_rope_write(qkv, self.q_norm.weight, self.k_norm.weight, cos, sin, self.eps, self.nh,
                                    self.nkv, kv[0], kv[1], batch.slot_mapping)
        else:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q, k, v = q.view(T, self.nh, self.hd), k.view(T, self.nkv, self.hd), v.view(T, self.nkv, self.hd)
            q = rms_norm(q, self.q_norm.weight, self.eps)
            k = rms_norm(k, self.k_norm.weight, self.eps)
            if trace is not None:  # the parity tests look at q and k between the norm and the rope
                trace[f"{i}.q_norm"], trace[f"{i}.k_norm"] = q, k
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if trace is not None:
                trace[f"{i}.q_rope"], trace[f"{i}.k_rope"] = q, k
            write_kv(kv[0], kv[1], k, v, batch.slot_mapping)
        o = be.attend(q, kv[0], kv[1], batch, self.scale)
        return be.linear(o.reshape(T, self.nh * self.hd), self.o_proj.weight)


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig, device, dtype):
        super().__init__()
        self.gate_up_proj = _param(param_shape(cfg, "mlp.experts.gate_up_proj"), device, dtype)  # [E, 2I, H]
        self.down_proj = _param(param_shape(cfg, "mlp.experts.down_proj"), device, dtype)  # [E, H, I]


class SparseMoe(nn.Module):
    def __init__(self, cfg: ModelConfig, device, dtype):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = Weight(cfg, "mlp.gate.weight", device, dtype)
        self.experts = Experts(cfg, device, dtype)

    def forward(self, x_TH: torch.Tensor, be: Backend, trace: Trace, i: int) -> torch.Tensor:
        w13, w2 = self.experts.gate_up_proj, self.experts.down_proj
        if be.moe == "triton":
            from .moe_dispatch import fused_moe
            return fused_moe(x_TH, self.gate.weight, w13, w2, self.top_k, self.norm_topk_prob, be.moe_small_max_pairs,
                             be.linear, be.moe_n_major_min_bm, be.moe_rows_max_pairs,
                             be.moe_ranked_max_pairs)
        logits, w, ids = route(x_TH, self.gate.weight, self.top_k, self.norm_topk_prob)
        if trace is not None:
            trace[f"{i}.router_logits"], trace[f"{i}.topk_w"], trace[f"{i}.topk_ids"] = logits, w, ids
        run = experts_grouped if be.moe == "torch" else experts_loop
        return run(x_TH, w13, w2, ids, w)


class DenseMlp(nn.Module):
    def __init__(self, cfg: ModelConfig, device, dtype):
        super().__init__()
        self.gate_proj = Weight(cfg, "mlp.gate_proj.weight", device, dtype)
        self.up_proj = Weight(cfg, "mlp.up_proj.weight", device, dtype)
        self.down_proj = Weight(cfg, "mlp.down_proj.weight", device, dtype)

    def forward(self, x_TH: torch.Tensor, be: Backend, trace: Trace, i: int) -> torch.Tensor:
        return dense_mlp(x_TH, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, device, dtype):
        super().__init__()
        self.index, self.eps = index, cfg.rms_norm_eps
        self.input_layernorm = Weight(cfg, "input_layernorm.weight", device, dtype)
        self.post_attention_layernorm = Weight(cfg, "post_attention_layernorm.weight", device, dtype)
        self.self_attn = Attention(cfg, device, dtype)
        self.mlp = SparseMoe(cfg, device, dtype) if cfg.is_sparse(index) else DenseMlp(cfg, device, dtype)

    def forward(self, h_TH, pending, cos, sin, batch, kv, be: Backend, trace: Trace = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (h, pending): the layer's output is h + pending (pending None: h is the output).
        With fused norms the last residual add is left to the next layer's add+norm kernel."""
        i, fused = self.index, be.fused_norms
        if pending is None:
            a = norm(h_TH, self.input_layernorm.weight, self.eps, fused)
        else:
            a, h_TH = add_norm(pending, h_TH, self.input_layernorm.weight, self.eps, fused)
        attn = self.self_attn(a, cos, sin, batch, kv, be, trace, i)
        m, h = add_norm(attn, h_TH, self.post_attention_layernorm.weight, self.eps, fused)
        mlp = self.mlp(m, be, trace, i)
        if trace is None and fused:
            return h, mlp
        out = h + mlp
        if trace is not None:
            trace.update({f"{i}.input_norm": a, f"{i}.attn_out": attn, f"{i}.post_norm": m,
                          f"{i}.mlp_out": mlp, f"{i}.out": out})
        return out, None
