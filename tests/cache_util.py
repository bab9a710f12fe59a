"""A random paged KV cache for attention tests: sequences own scattered, shuffled blocks."""
import torch


def scattered_cache(ctxs: list[int], S: int, K: int, D: int, spare: int = 4, device="cpu",
                    dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """k and v caches [P, S, K, D] of random values and one block table per context length."""
    P = sum(-(-c // S) for c in ctxs) + spare
    kc = torch.randn(P, S, K, D, device=device, dtype=dtype)
    vc = torch.randn(P, S, K, D, device=device, dtype=dtype)
    perm, tables = torch.randperm(P).tolist(), []
    for c in ctxs:
        n = -(-c // S)
        tables.append(perm[:n])
        perm = perm[n:]
    return kc, vc, tables
