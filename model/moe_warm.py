"""The MoE's kernel variants by token count, for the warm-up (model/warmup.py): which launches of
model/fused_moe_triton and model/moe_rows_triton a token count reaches, and token counts that
reach them all."""
from __future__ import annotations

import triton

from .fused_moe_triton import grouped_tiles
from .moe_rows_triton import ranked_fit, rows_fit, rows_tiles


def launch_key(N: int, num_experts: int, top_k: int, small_max_pairs: int, rows_max_pairs: int = 0,
               ranked_max_pairs: int = 0) -> tuple:
    """What of N tokens decides which MoE kernel variants compile: the GEMV path's tile set
    (small_tiles: up to 16 pairs or more); the token-row form's tiles (model/moe_rows_triton takes N
    unspecialized); its ranked form's tiles and id-vector width; the grouped path's tiles and the
    class Triton gives the pair count P (== 1, a multiple of 16, other). The other int arguments are
    the model's own sizes."""
    from .attention_prefill_triton import stride_class
    P = N * top_k
    if P <= small_max_pairs:
        return "small", P <= 16
    if rows_fit(N, top_k, rows_max_pairs):
        return "rows", rows_tiles(N, num_experts, top_k)
    if ranked_fit(N, top_k, num_experts, ranked_max_pairs):
        return "ranked", grouped_tiles(P, num_experts), max(16, triton.next_power_of_2(P))
    return "grouped", grouped_tiles(P, num_experts), stride_class(P)


def warm_token_counts(num_experts: int, top_k: int, small_max_pairs: int, max_tokens: int,
                      rows_max_pairs: int = 0, ranked_max_pairs: int = 0) -> list[int]:
    """Token counts whose MoE launches between them compile every variant the engine can reach:
    the first count of each launch_key. The align's kernels take P unspecialized: its runs kernel
    compiles once per BM, its count and place kernels once in all, which the first count of each
    key reaches."""
    found: dict[tuple, int] = {}
    for n in range(1, max_tokens + 1):
        found.setdefault(launch_key(n, num_experts, top_k, small_max_pairs, rows_max_pairs, ranked_max_pairs), n)
    return sorted(found.values())
