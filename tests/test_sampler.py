"""The vectorised sampler against naive torch maths: many draws on a tiny vocabulary match the
frequencies of the truncated softmax (so ignoring top_k, top_p or min_p fails), greedy rows mixed
with sampled rows, and a row's token independent of its neighbours and of the batch."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # the fused kernel's test runs interpreted; set before triton loads
    os.environ["TRITON_INTERPRET"] = "1"

from model.sampler import pack_rows, sample  # noqa: E402

V = 10
N = 20000


def truncated_softmax(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Naive reference: temperature, top-k, then top-p on the renormalised rest, min-p vs the top token."""
    p = torch.softmax(logits.double() / temperature, -1)
    keep = torch.ones_like(p, dtype=torch.bool)
    order = torch.argsort(p, descending=True)
    if top_k:
        keep[order[top_k:]] = False
    q = torch.where(keep, p, 0.0)
    q = q / q.sum()
    mass = 0.0
    for i in order.tolist():
        if not keep[i]:
            continue
        if mass >= top_p:
            keep[i] = False
        mass += float(q[i])
    keep &= p >= min_p * p.max()
    out = torch.where(keep, p, 0.0)
    return out / out.sum()


def draw(logits: torch.Tensor, temperature, top_k, top_p, min_p) -> torch.Tensor:
    rows, flags = pack_rows([(temperature, top_k, top_p, min_p, 777 + i, i % 7) for i in range(N)])
    toks = sample(logits.expand(N, V).contiguous(), torch.from_numpy(rows), flags)
    return torch.bincount(toks, minlength=V).double() / N


CASES = [(1.0, 0, 1.0, 0.0), (0.7, 3, 1.0, 0.0), (1.0, 0, 0.6, 0.0), (1.3, 0, 1.0, 0.2), (0.9, 5, 0.8, 0.05)]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", CASES)
def test_frequencies_match_truncated_softmax(temperature, top_k, top_p, min_p):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(V, generator=g) * 1.5
    want = truncated_softmax(logits, temperature, top_k, top_p, min_p)
    got = draw(logits, temperature, top_k, top_p, min_p)
    assert torch.all(got[want == 0] == 0), (got, want)
    # 4.5 standard errors of a binomial frequency
    tol = 4.5 * torch.sqrt(want * (1 - want) / N) + 1e-9
    assert torch.all((got - want).abs() <= tol), (got, want)
    # and the filter mattered: the untruncated distribution is far from what was drawn
    if (top_k, top_p, min_p) != (0, 1.0, 0.0):
        full = torch.softmax(logits.double() / temperature, -1)
        assert (got - full).abs().max() > 0.02


def test_greedy_rows_mixed_with_sampled_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    rows, flags = pack_rows([(0.0 if i % 2 == 0 else 1.0, 0, 1.0, 0.0, i, 0) for i in range(6)])
    out = sample(logits, torch.from_numpy(rows), flags)
    assert out[0::2].tolist() == logits[0::2].argmax(-1).tolist()
    rows, flags = pack_rows([(0.0, 5, 0.5, 0.1, i, 0) for i in range(6)])  # filters are ignored at temperature 0
    assert sample(logits, torch.from_numpy(rows), flags).tolist() == logits.argmax(-1).tolist()


def test_row_depends_only_on_its_logits_seed_and_step():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 300, generator=g)
    spec = [(0.9, 20 * (i % 3), 0.95, 0.0, 1000 + i, i) for i in range(16)]
    rows, flags = pack_rows(spec)
    full = sample(logits, torch.from_numpy(rows), flags)
    perm = torch.randperm(16, generator=g)
    rows_p, flags_p = pack_rows([spec[i] for i in perm.tolist()])
    assert sample(logits[perm], torch.from_numpy(rows_p), flags_p).tolist() == full[perm].tolist()
    for i in (0, 5, 15):  # alone, with no neighbours
        r, f = pack_rows([spec[i]])
        assert sample(logits[i:i + 1], torch.from_numpy(r), f).item() == full[i].item()
    other, f = pack_rows([(s[0], s[1], s[2], s[3], s[4] + 1, s[5]) for s in spec])  # another seed
    assert sample(logits, torch.from_numpy(other), f).tolist() != full.tolist()


def test_fused_gumbel_argmax_equals_torch_draw():
    """The CUDA sampler's fused Triton pass (interpreted without CUDA) draws the torch path's token."""
    pytest.importorskip("triton")
    from model import sampler_triton
    from model.sampler import gumbel_noise, row_keys
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(5)
    R, V = 5, 2500
    x = torch.randn(R, V, generator=g)
    x[1, ::3] = float("-inf")  # filtered tokens never win
    lo, hi = (torch.randint(-2**31, 2**31 - 1, (R,), generator=g, dtype=torch.int32) for _ in range(2))
    step = torch.arange(R, dtype=torch.int32) * 7
    want = torch.argmax(x + gumbel_noise(lo, hi, step, V), -1)
    got = sampler_triton.gumbel_argmax(x.to(dev), row_keys(lo, hi, step).to(dev))
    assert got.cpu().tolist() == want.tolist()
    assert got[1].item() % 3 != 0
