"""The one place that chooses kernels. A Backend is picked once when a Stage is built, from its
device and the options, and handed to every layer. Tracing (parity) uses `backend.reference()`:
the torch maths for MoE, norms and rope, with the same attention kernel."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from .attention import attention_ref
from .batch import AttnBatch

# (token, expert) pairs (tokens x top-k) up to which the fused MoE runs its per-pair GEMV path;
# above, the pairs are grouped by expert. Measured on H100 (bench/bench_decode_layer.py,
# bench/results/decode_layer_H100_2026-11-28_v2.json): qwen3-30b-a3b 8 tokens x 8 = 64 pairs GEMV
# 211 us vs grouped 237 us, 16 x 8 = 128 pairs 338 vs 328 us; the user's shape (top-16) 8 x 16
# = 128 pairs 1331 vs 1197 us; qwen3-235b-a22b 8 x 8 = 64 pairs 799 vs 802 us.
MOE_SMALL_MAX_PAIRS = 64
# Tokens from which torch._grouped_mm (cuBLAS) would replace the Triton grouped kernel: never, since
# with the (128, 128) tile the Triton kernel won at every count measured, 2048 to 16384 tokens
# (H100, 30b shape; model.fused_moe_triton.grouped_tiles has the figures).
MOE_TORCH_MIN_TOKENS = 1 << 30
# Micro-batches of up to this many tokens run the dense projections (fused qkv, o_proj, router) as
# the PDL-launched Triton GEMV (model/linear_triton.py) instead of cuBLAS.
# H200 (bench/results/linear_small_H200_2026-11-28.json): at 1 token the GEMV matches cuBLAS on
# qkv and o_proj and takes the router from 5.4 to 2.0 us; at 2 tokens and more cuBLAS wins.
LINEAR_SMALL_MAX_TOKENS = 1


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


def fa_attend(q, k_cache, v_cache, batch: AttnBatch, scale: float) -> torch.Tensor:
    """Decode: the Triton split-K kernel; prefill: paged flash attention straight from the pool."""
    from .attention_prefill_triton import prefill_attend
    return prefill_attend(q, k_cache, v_cache, batch, scale)


def auto_attend(q, k_cache, v_cache, batch: AttnBatch, scale: float) -> torch.Tensor:
    """The CUDA default. Micro-batches whose chunks all start at position 0 (fresh prompts, with
    decode rows) take SDPA, whose causal flash kernel wins there; any chunk with a cached prefix
    sends the batch to the paged flash kernel, which wins there and copies no prefix. H100, 32/4
    heads, TFLOP/s SDPA vs paged flash (bench/results/attention_kernels_H100_2026-11-28*.json):
    4k fresh 451 vs 353; 4k at 32k 354 vs 404; 4k at 86k 361 vs 428."""
    if all(ql == ctx or ql == 1 for ql, ctx in zip(batch.query_lens, batch.context_lens)):
        return sdpa_attend(q, k_cache, v_cache, batch, scale)
    return fa_attend(q, k_cache, v_cache, batch, scale)


ATTENTION: dict[str, Callable] = {"ref": reference_attend, "triton": triton_attend, "sdpa": sdpa_attend,
                                  "fa": fa_attend, "auto": auto_attend}
MOE_PATHS = ("loop", "torch", "triton")  # per-expert loop, sort + grouped GEMM in torch, fused Triton


@dataclass(frozen=True)
class Backend:
    attention: str  # a key of ATTENTION
    moe: str  # one of MOE_PATHS
    fused_norms: bool  # Triton add+RMSNorm, q/k-norm+rope+KV write
    moe_small_max_pairs: int = MOE_SMALL_MAX_PAIRS
    moe_torch_min: int = MOE_TORCH_MIN_TOKENS
    linear_small_max: int = 0  # tokens up to which linear() runs the Triton GEMV (0: always torch)

    def linear(self, x_TK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        """x @ w^T: the small-token Triton GEMV up to linear_small_max tokens, else torch."""
        if 0 < x_TK.shape[0] <= self.linear_small_max:
            from .linear_triton import linear_small
            return linear_small(x_TK, w_NK)
        return torch.nn.functional.linear(x_TK, w_NK)

    @property
    def attend(self) -> Callable:
        return ATTENTION[self.attention]

    def reference(self) -> "Backend":
        """The torch maths (for traces and parity), keeping the attention kernel."""
        return replace(self, moe="torch" if self.moe == "triton" else self.moe, fused_norms=False, linear_small_max=0)


def pick_backend(device: torch.device | str, attention: str | None = None, moe: str | None = None,
                 fused: bool | None = None) -> Backend:
    """CUDA: 'auto' attention, Triton MoE and fused norms; CPU: the torch reference paths.
    attention: 'ref' (torch, any device), 'triton' (all Triton), 'sdpa' (Triton decode + SDPA
    prefill), 'fa' (Triton decode + paged flash prefill) or 'auto' (fresh prompts 'sdpa', chunks
    with a prefix 'fa'). moe: 'loop', 'torch' or 'triton'. fused: the Triton norm kernels."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    attention = attention or ("auto" if cuda else "ref")
    if attention not in ATTENTION:
        raise ValueError(f"attention backend {attention!r}: expected one of {', '.join(ATTENTION)}")
    if attention != "ref" and not cuda:
        raise ValueError(f"attention backend {attention!r} needs a CUDA device")
    moe = moe or ("triton" if cuda else "torch")
    if moe not in MOE_PATHS:
        raise ValueError(f"moe path {moe!r}: expected one of {', '.join(MOE_PATHS)}")
    if moe == "triton" and not cuda:
        raise ValueError("moe path 'triton' needs a CUDA device")
    fused = cuda if fused is None else fused
    if fused and not cuda:
        raise ValueError("fused norm kernels need a CUDA device")
    return Backend(attention, moe, fused, linear_small_max=LINEAR_SMALL_MAX_TOKENS if fused else 0)


def pick_attention(device: torch.device | str, name: str | None = None) -> Callable:
    """The attention function alone (benchmarks)."""
    return pick_backend(device, name).attend
