"""Router and experts. Letters: N tokens, H hidden, E experts, k experts per token, I expert width.

Experts are held fused per layer: w13_E2IH = stack_e(cat(gate_e, up_e)) and w2_EHI = stack_e(down_e),
the transformers v5 in-memory layout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def route(x_NH: torch.Tensor, gate_EH: torch.Tensor, top_k: int, norm_topk_prob: bool
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF order: logits in dt, fp32 softmax over all E, top-k, fp32 renorm, weights cast to dt.
    Returns (router_logits_NE in dt, topk_w_Nk in dt, topk_ids_Nk int64)."""
    logits = F.linear(x_NH, gate_EH)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True)
    return logits, w.to(x_NH.dtype), ids


def _expert(x: torch.Tensor, w13_2IH: torch.Tensor, w2_HI: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, w13_2IH).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2_HI)


def experts_loop(x_NH: torch.Tensor, w13_E2IH: torch.Tensor, w2_EHI: torch.Tensor,
                 ids_Nk: torch.Tensor, w_Nk: torch.Tensor) -> torch.Tensor:
    """Reference: HF eager order (hit experts ascending, out*w in dt, index_add_ into a dt buffer)."""
    out = torch.zeros_like(x_NH)
    E = w13_E2IH.shape[0]
    mask_EkN = F.one_hot(ids_Nk, num_classes=E).permute(2, 1, 0)
    for e in torch.unique(ids_Nk).tolist():
        slot, tok = torch.where(mask_EkN[e])
        y = _expert(x_NH[tok], w13_E2IH[e], w2_EHI[e]) * w_Nk[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def experts_grouped(x_NH: torch.Tensor, w13_E2IH: torch.Tensor, w2_EHI: torch.Tensor,
                    ids_Nk: torch.Tensor, w_Nk: torch.Tensor) -> torch.Tensor:
    """Vectorised path: sort the N*k (token, expert) pairs by expert, run each expert's rows as one
    GEMM (torch._grouped_mm on CUDA bf16: no host sync, reads only hit experts), weight, then sum
    the k contributions of each token in fp32."""
    N, k = ids_Nk.shape
    E = w13_E2IH.shape[0]
    flat_ids = ids_Nk.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # rows grouped by expert
    xs = x_NH[order // k]  # [N*k, H]
    if _grouped_mm_ok(x_NH):
        # counts by scatter_add (bincount syncs with the host to size its output: no CUDA graphs)
        counts = torch.zeros(E, dtype=torch.int32, device=x_NH.device)
        counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        h = torch._grouped_mm(xs, w13_E2IH.transpose(1, 2), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        ys = torch._grouped_mm(F.silu(gate) * up, w2_EHI.transpose(1, 2), offs=offs)
    else:
        counts = torch.bincount(flat_ids, minlength=E).tolist()
        ys = torch.empty_like(xs)
        start = 0
        for e, c in enumerate(counts):
            if c:
                ys[start:start + c] = _expert(xs[start:start + c], w13_E2IH[e], w2_EHI[e])
                start += c
    # back to token order by a gather (not an index_put of fp32 rows, which scatters with atomics),
    # weight in dt as HF does, then one fp32 sum over the k contributions
    y_NkH = ys[torch.argsort(order)].view(N, k, -1) * w_Nk[..., None]
    return y_NkH.sum(dim=1, dtype=torch.float32).to(x_NH.dtype)


def dense_mlp(x_NH: torch.Tensor, gate_IH: torch.Tensor, up_IH: torch.Tensor, down_HI: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x_NH, gate_IH)) * F.linear(x_NH, up_IH), down_HI)
