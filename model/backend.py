"""The one place that chooses kernels. A Backend is picked once when a Stage is built, from its
device and the options, and handed to every layer. Tracing (parity) uses `backend.reference()`:
the torch maths for MoE, norms and rope, with the same attention kernel."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from .attention import attention_ref
from .batch import AttnBatch

# (token, expert) pairs (tokens x top-k) up to which the fused MoE runs its per-pair GEMV path,
# which streams only the chosen experts' rows; above, the pairs are grouped by expert and run as a
# grouped GEMM, whose tiles pay off once experts hold several rows each (bench/bench_decode_layer.py
# times both paths at each count).
MOE_SMALL_MAX_PAIRS = 64
# Above it and up to this many pairs, where one row tile holds every token (model/moe_rows_triton.
# MAX_ROWS), the grouped GEMMs find each expert's tokens themselves instead of after an align's
# four launches. 0: always the align (bench/bench_decode_ablate.py --ab moe_rows_max_pairs=0 is the A/B).
MOE_ROWS_MAX_PAIRS = 512
# Past the token-row form and up to this many pairs, its ranked form (any batch: each program ranks
# its expert's pairs into 16-row tiles) instead of the align + grouped GEMMs. 0 (off) until its A/B
# (bench/bench_decode_ablate.py --batches 24,32,64 --ab moe_ranked_max_pairs=512) has run on a GPU.
MOE_RANKED_MAX_PAIRS = 0
# Micro-batches of up to this many tokens run the dense projections (fused qkv, o_proj, router) as
# the PDL-launched Triton GEMV (model/linear_triton.py) instead of cuBLAS: at one token it streams
# the weights with no split-K second kernel; from two tokens on cuBLAS's tiles reuse each weight
# load (bench/bench_linear_small.py times both).
LINEAR_SMALL_MAX_TOKENS = 1
# Grouped-GEMM launches with a row tile (BM) of at least this many rows order their grid N-major: a
# block's N tiles run side by side and read its gathered A rows once from HBM (blocks side by side
# instead share an N tile of an expert's weights, and a block's A rows are read again for each of
# its N tiles: I / BN and H / BN, 6 and 16 at the 30b shape). 0: never. bench/bench_breakdown.py
# --prefill 8192 --moe-n-major-min-bm 0|128 is the A/B.
MOE_N_MAJOR_MIN_BM = 128
# Penalties (repetition, frequency, presence) on the last stage's CUDA device as one Triton launch
# (model/penalties_triton.py) instead of ~15 torch passes over [rows, vocab] (bench/
# bench_breakdown.py --penalties-fused times it against the torch passes).
PENALTIES_FUSED = True


def reference_attend(q, k_cache, v_cache, batch: AttnBatch, scale: float) -> torch.Tensor:
    return attention_ref(q, k_cache, v_cache, batch.block_tables, batch.query_lens, batch.context_lens, scale)


def sdpa_attend(q, k_cache, v_cache, batch: AttnBatch, scale: float) -> torch.Tensor:
    """Decode-only micro-batches: the Triton split-K decode kernel; prefill: fused SDPA."""
    from .attention_sdpa import prefill_sdpa
    from .attention_triton import paged_decode
    if batch.max_query_len == 1:
        return paged_decode(q, k_cache, v_cache, batch.block_tables, batch.context_lens_t, scale, batch.max_context)
    return prefill_sdpa(q, k_cache, v_cache, batch, scale, paged_decode)


def hopper_prefill(q: torch.Tensor) -> bool:
    """Chunks on sm_90 in bf16/fp16 take attention_prefill_fa3 (TMA loads where the block size
    holds a whole key tile, warp specialisation, and KV splits when the grid underfills the SMs:
    attention_prefill_fa3.choose_kv_splits states that rule); other cards and fp32 keep the FA2-style
    kernel of attention_prefill_triton."""
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and torch.cuda.get_device_capability(q.device)[0] == 9)


def fa_attend(q, k_cache, v_cache, batch: AttnBatch, scale: float) -> torch.Tensor:
    """Decode: the Triton split-K kernel; prefill: paged flash attention straight from the pool."""
    from .attention_paged import prefill_attend
    return prefill_attend(q, k_cache, v_cache, batch, scale, hopper=hopper_prefill(q))


def split_attend(q, k_cache, v_cache, batch: AttnBatch, scale: float) -> torch.Tensor:
    """Prefill: attention_split through cuDNN's fused kernel (CUDA, bf16/fp16), else its torch maths
    (CPU, fp32); decode rows: the Triton split-K kernel on CUDA, the reference maths on CPU."""
    from .attention_split import prefill_split
    if q.is_cuda:
        from .attention_triton import paged_decode as decode
    else:
        def decode(q_BND, kc, vc, tables, ctx_t, sc, max_context):
            ctxs = ctx_t.tolist()
            return attention_ref(q_BND, kc, vc, tables, [1] * len(ctxs), ctxs, sc)
    if batch.max_query_len == 1:
        return decode(q, k_cache, v_cache, batch.block_tables, batch.context_lens_t, scale, batch.max_context)
    vendor = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
    return prefill_split(q, k_cache, v_cache, batch, scale, decode, "cudnn" if vendor else "math")


def auto_attend(q, k_cache, v_cache, batch: AttnBatch, scale: float) -> torch.Tensor:
    """The CUDA default. Micro-batches whose chunks all start at position 0 (fresh prompts, with
    decode rows) take SDPA, whose causal flash kernel is faster there; any chunk with a cached
    prefix sends the batch to the paged flash kernels, which read the prefix straight from the pool
    (bench/bench_attention.py times them all). Not 'split': its kernel is faster on long chunks, but
    cuDNN builds an execution plan for every new (queries, prefix) shape, i.e. inside requests."""
    if all(ql == ctx or ql == 1 for ql, ctx in zip(batch.query_lens, batch.context_lens)):
        return sdpa_attend(q, k_cache, v_cache, batch, scale)
    return fa_attend(q, k_cache, v_cache, batch, scale)


ATTENTION: dict[str, Callable] = {"ref": reference_attend, "sdpa": sdpa_attend, "fa": fa_attend,
                                  "split": split_attend, "auto": auto_attend}
MOE_PATHS = ("loop", "torch", "triton")  # per-expert loop, sort + grouped GEMM in torch, fused Triton


@dataclass(frozen=True)
class Backend:
    attention: str  # a key of ATTENTION
    moe: str  # one of MOE_PATHS
    fused_norms: bool  # Triton add+RMSNorm, q/k-norm+rope+KV write
    moe_small_max_pairs: int = MOE_SMALL_MAX_PAIRS
    moe_rows_max_pairs: int = 0  # grouped MoE up to this many pairs without an align (0: never)
    moe_ranked_max_pairs: int = 0  # its ranked form past one row tile, up to this many pairs (0: never)
    linear_small_max: int = 0  # tokens up to which linear() runs the Triton GEMV (0: always torch)
    moe_n_major_min_bm: int = 0  # grouped MoE row tiles from which a block's N tiles launch together (0: never)
    penalties_fused: bool = False  # the last stage's penalties in one Triton launch (CUDA)

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
    attention: 'ref' (torch, any device), 'split' (any device: attention_split, cuDNN on CUDA),
    'sdpa' (Triton decode + SDPA prefill), 'fa' (Triton decode + paged flash prefill) or 'auto'
    (fresh prompts 'sdpa', chunks with a prefix 'fa'). moe: 'loop', 'torch' or 'triton'. fused: the Triton norm kernels."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    attention = attention or ("auto" if cuda else "ref")
    if attention not in ATTENTION:
        raise ValueError(f"attention backend {attention!r}: expected one of {', '.join(ATTENTION)}")
    if attention not in ("ref", "split") and not cuda:
        raise ValueError(f"attention backend {attention!r} needs a CUDA device")
    moe = moe or ("triton" if cuda else "torch")
    if moe not in MOE_PATHS:
        raise ValueError(f"moe path {moe!r}: expected one of {', '.join(MOE_PATHS)}")
    if moe == "triton" and not cuda:
        raise ValueError("moe path 'triton' needs a CUDA device")
    fused = cuda if fused is None else fused
    if fused and not cuda:
        raise ValueError("fused norm kernels need a CUDA device")
    return Backend(attention, moe, fused, linear_small_max=LINEAR_SMALL_MAX_TOKENS if fused else 0,
                   moe_n_major_min_bm=MOE_N_MAJOR_MIN_BM, moe_rows_max_pairs=MOE_ROWS_MAX_PAIRS,
                   moe_ranked_max_pairs=MOE_RANKED_MAX_PAIRS,
                   penalties_fused=cuda and PENALTIES_FUSED)
