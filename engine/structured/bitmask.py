"""Applying a token bitmask to a batch of logits in one vectorised op (no per-row loop): a 0 bit
makes the logit -inf; a row of all ones (a request without structure) is left as it is."""
from __future__ import annotations

import torch

def allowed_mask(bitmask_RW: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [R, V]: token t of row r is allowed iff bit t % 32 of word t // 32 is set."""
    bits_RW32 = (bitmask_RW.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32, device=bitmask_RW.device)) & 1
    return bits_RW32.reshape(bitmask_RW.shape[0], -1)[:, :vocab_size].bool()


def apply_token_bitmask(logits_RV: torch.Tensor, bitmask_RW: torch.Tensor) -> torch.Tensor:
    """In place: logits_RV[r, t] = -inf where the bit is 0; returns logits_RV.

    bitmask_RW: int32 [R, ceil(V / 32)] (xgrammar's layout), on the logits' device or on CPU (then
    copied). On CUDA, xgrammar's kernel does it when xgrammar is installed."""
    R, V = logits_RV.shape
    if bitmask_RW.dtype != torch.int32 or bitmask_RW.shape != (R, (V + 31) // 32):
        raise ValueError(f"bitmask must be int32 [{R}, {(V + 31) // 32}] for logits [{R}, {V}], "
                         f"got {bitmask_RW.dtype} {list(bitmask_RW.shape)}")
    bitmask_RW = bitmask_RW.to(logits_RV.device, non_blocking=True)
    if logits_RV.is_cuda:
        try:
            from xgrammar import apply_token_bitmask_inplace
        except ImportError:
            pass
        else:
            apply_token_bitmask_inplace(logits_RV, bitmask_RW)
            return logits_RV
    return logits_RV.masked_fill_(~allowed_mask(bitmask_RW, V), float("-inf"))
