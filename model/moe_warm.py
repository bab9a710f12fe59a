"""The MoE's kernel variants by pair count, for the warm-up (model/warmup.py): which launches of
model/fused_moe_triton and model/moe_scan_triton a pair count reaches, and token counts that
reach them all."""
from __future__ import annotations

import triton

from .fused_moe_triton import grouped_tiles
from .moe_scan_triton import scan_fits


def launch_key(P: int, num_experts: int, small_max_pairs: int, scan_max_pairs: int = 0) -> tuple:
    """What of P pairs decides which MoE kernel variants compile: the GEMV path's tile set
    (small_tiles: up to 16 pairs or more); the scan path's tiles and id-vector width
    (model/moe_scan_triton takes P unspecialized); the grouped path's tiles and the class Triton
    gives P (== 1, a multiple of 16, other). The other int arguments are the model's own sizes."""
    from .attention_prefill_triton import stride_class
    if P <= small_max_pairs:
        return "small", P <= 16
    if scan_fits(P, num_experts, scan_max_pairs):
        return "scan", grouped_tiles(P, num_experts), max(16, triton.next_power_of_2(P))
    return "grouped", grouped_tiles(P, num_experts), stride_class(P)


def warm_token_counts(num_experts: int, top_k: int, small_max_pairs: int, max_tokens: int,
                      scan_max_pairs: int = 0) -> list[int]:
    """Token counts whose MoE launches between them compile every variant the engine can reach:
    the first count of each launch_key. The align's kernels take P unspecialized: its runs kernel
    compiles once per BM, its count and place kernels once in all, which the first count of each
    key reaches."""
    found: dict[tuple, int] = {}
    for n in range(1, max_tokens + 1):
        found.setdefault(launch_key(n * top_k, num_experts, small_max_pairs, scan_max_pairs), n)
    return sorted(found.values())
