"""Logprobs of chosen tokens on the device: each row's log_softmax, the chosen token's logprob and
rank (1 + the number of tokens with a strictly greater logprob) and the top-k, packed in one fp32
table that travels back to stage 0 in one message. Token ids and ranks are exact in fp32 below
2^24 (every vocabulary here). Letters: N rows, V vocabulary, K top entries."""
from __future__ import annotations

import torch

_BLOCK_ROWS = 256  # rows of [rows, V] temporaries made at a time (prompt logprobs can have many)


def width(k: int) -> int:
    """Columns of a table with top-k: logprob, rank, k logprobs, k ids."""
    return 2 + 2 * k


def logprob_table(logits_NV: torch.Tensor, chosen_N: torch.Tensor, k: int) -> torch.Tensor:
    """fp32 [N, 2 + 2k]: per row [logprob of chosen, its rank, top-k logprobs (descending), their
    ids], from log_softmax(logits) (fp32; -inf logits stay -inf)."""
    N, V = logits_NV.shape
    assert V < 2**24, "token ids travel as float32"
    out = torch.empty(N, width(k), dtype=torch.float32, device=logits_NV.device)
    for a in range(0, N, _BLOCK_ROWS):
        b = min(a + _BLOCK_ROWS, N)
        lp = torch.log_softmax(logits_NV[a:b].float(), dim=-1)
        c = lp.gather(1, chosen_N[a:b, None].to(torch.int64))
        out[a:b, 0] = c[:, 0]
        out[a:b, 1] = (lp > c).sum(-1).to(torch.float32) + 1
        if k:
            top = lp.topk(k, dim=-1)
            out[a:b, 2:2 + k] = top.values
            out[a:b, 2 + k:] = top.indices.to(torch.float32)
    return out


def unpack_row(row: list[float], k: int) -> tuple[float, int, list[int], list[float]]:
    """One table row (host floats) as (logprob, rank, top ids, top logprobs), the top cut to k."""
    K = (len(row) - 2) // 2
    return row[0], int(row[1]), [int(t) for t in row[2 + K:2 + K + k]], row[2:2 + k]
