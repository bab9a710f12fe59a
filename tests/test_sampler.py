"""The vectorised sampler against naive torch maths: many draws on a tiny vocabulary match the
frequencies of the truncated softmax (so ignoring top_k, top_p or min_p fails), ties at a threshold
kept together, greedy rows mixed with sampled rows, a row's token independent of its neighbours and
of the batch, and the fused Triton kernels (interpreted without CUDA) against the torch path."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # the fused kernel's test runs interpreted; set before triton loads
    os.environ["TRITON_INTERPRET"] = "1"

from model.sampler import pack_rows, sample  # noqa: E402

V = 10
N = 20000


def truncated_softmax(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Naive reference, ties kept together: a loop over the distinct values, largest first."""
    x = logits.float() / temperature
    p = torch.softmax(x.double(), -1)
    keep = p >= min_p * p.max()
    if 0 < top_k < len(x):
        keep &= torch.tensor([int((x > v).sum()) < top_k for v in x.tolist()])
    q = torch.where(keep, p, 0.0)
    q = q / q.sum()
    mass = 0.0
    for n, v in enumerate(sorted(set(x[keep].tolist()), reverse=True)):
        group = keep & (x == v)
        if n and top_p < 1 and mass >= top_p:
            keep &= ~group
        mass += float(q[group].sum())
    out = torch.where(keep, p, 0.0)
    return out / out.sum()


def draw(logits: torch.Tensor, temperature, top_k, top_p, min_p) -> torch.Tensor:
    rows, flags = pack_rows([(temperature, top_k, top_p, min_p, 777 + i, i % 7) for i in range(N)])
    toks = sample(logits.expand(N, V).contiguous(), torch.from_numpy(rows), flags)
    return torch.bincount(toks, minlength=V).double() / N


CASES = [(1.0, 0, 1.0, 0.0), (0.7, 3, 1.0, 0.0), (1.0, 0, 0.6, 0.0), (1.3, 0, 1.0, 0.2), (0.9, 5, 0.8, 0.05)]
# logits with exact ties: the 2nd value (1.0) is held by 3 tokens, the top-p boundary falls inside them
TIED = torch.tensor([2.0, 1.0, 0.5, 1.0, -1.0, 1.0, 0.0, 0.5, -0.5, 2.0])
TIE_CASES = [(1.0, 3, 1.0, 0.0), (1.0, 0, 0.7, 0.0), (0.8, 4, 0.9, 0.0), (1.0, 0, 1.0, 0.3)]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p,tied",
                         [c + (False,) for c in CASES] + [c + (True,) for c in TIE_CASES])
def test_frequencies_match_truncated_softmax(temperature, top_k, top_p, min_p, tied):
    g = torch.Generator().manual_seed(3)
    logits = TIED if tied else torch.randn(V, generator=g) * 1.5
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


def test_fused_draw_equals_torch_draw():
    """The CUDA sampler's filtering kernel (interpreted without CUDA) with no filters (sample()'s path
    on CUDA for temperature alone) draws the torch path's token, the row key hashed from the packed
    row in the kernel; masked tokens never win; greedy rows take the given tokens."""
    pytest.importorskip("triton")
    from model import sampler_triton
    from model.sampler import gumbel_noise
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(5)
    R, V = 5, 2500
    x = torch.randn(R, V, generator=g)
    x[1, ::3] = float("-inf")  # filtered tokens never win
    lo, hi = (torch.randint(-2**31, 2**31 - 1, (R,), generator=g, dtype=torch.int32) for _ in range(2))
    step = torch.arange(R, dtype=torch.int32) * 7
    want = torch.argmax(x + gumbel_noise(lo, hi, step, V), -1)
    assert want[1].item() % 3 != 0
    rows = torch.zeros(R, 8, dtype=torch.int32)
    rows[:, 0] = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0]).view(torch.int32)
    rows[:, 4], rows[:, 5], rows[:, 6] = lo, hi, step
    greedy = torch.arange(R) + 100
    got = sampler_triton.filtered_gumbel_argmax(x.to(dev), rows.to(dev), greedy_R=greedy.to(dev))[0]
    assert got.cpu().tolist() == torch.where(rows[:, 0] != 0, want, greedy).tolist()


def _kept_sets_agree(x: torch.Tensor, kept: torch.Tensor, want: torch.Tensor, top_k, top_p, min_p, rel=1e-5):
    """Rows [R] where the kernel's kept set equals the torch path's, or differs only by one tied group
    at the top-p boundary whose mass above is within rel of top_p * Z: the two sum the masses in
    different orders, so fp32 rounding may put such a group on either side."""
    from model.sampler import filter_logits
    ok = (kept == want).all(-1)
    for r in (~ok).nonzero().flatten().tolist():
        pre = filter_logits(x[r:r + 1], top_k[r:r + 1], torch.ones(1), min_p[r:r + 1])[0] > float("-inf")
        diff = x[r][kept[r] != want[r]]
        w = torch.where(pre, torch.exp(x[r].double() - x[r].max()), 0.0)
        above = w[x[r] > diff[0]].sum()
        ok[r] = bool((diff == diff[0]).all()) and abs(above - top_p[r] * w.sum()) <= rel * w.sum()
    return ok


def _both_paths(logits: torch.Tensor, spec: list, dev: str):
    """(x, rows, fields, kernel tokens, kernel kept [R, V], torch tokens, torch kept) for rows
    spec [(temperature, top_k, top_p, min_p, seed, step)], all on the CPU; x on dev meanwhile."""
    from model import sampler
    from model.sampler_triton import filtered_gumbel_argmax
    rows = torch.from_numpy(sampler.pack_rows(spec)[0]).to(dev)
    logits = logits.to(dev)
    temp = rows[:, 0].view(torch.float32)
    x = logits / torch.where(temp > 0, temp, 1.0)[:, None]
    top_k, top_p, min_p = rows[:, 1], rows[:, 2].view(torch.float32), rows[:, 3].view(torch.float32)
    m = x.amax(-1)
    tok, thr = filtered_gumbel_argmax(x, rows, sampler.min_p_floor(x, min_p, m), m)
    kept = (x >= thr[:, None]) & (x > float("-inf"))
    f = sampler.filter_logits(x, top_k, top_p, min_p)
    want = sampler.gumbel_draw(f, rows)
    return (x.cpu(), (top_k.cpu(), top_p.cpu(), min_p.cpu()), tok.cpu(), kept.cpu(), want.cpu(),
            (f > float("-inf")).cpu())


def test_filtered_kernel_equals_torch_path():
    """The CUDA sampler's filtering kernel (interpreted without CUDA) keeps the torch reference's
    sets and draws its tokens, on bf16-rounded logits full of ties, for every kind of row."""
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(11)
    # (temperature, top_k, top_p, min_p): greedy, off, top-k, top-p, min-p, all three, k >= V,
    # tiny top-p, top-1, and a row mostly -inf with fewer finite tokens than k
    filt = [(0.0, 5, 0.5, 0.1), (1.0, 0, 1.0, 0.0), (0.8, 40, 1.0, 0.0), (0.8, 0, 0.9, 0.0), (1.2, 0, 1.0, 0.05),
            (0.8, 60, 0.8, 0.02), (1.0, 3000, 1.0, 0.0), (0.5, 0, 0.05, 0.0), (0.8, 1, 0.9, 0.0),
            (1.0, 2999, 0.95, 0.0)]
    spec = [f + (int(torch.randint(0, 2**62, (1,), generator=g)), 3 * i) for i, f in enumerate(filt)]
    R, V = len(spec), 3000
    logits = (torch.randn(R, V, generator=g) * 2).bfloat16().float()
    logits[9, :2000] = float("-inf")  # masked tokens
    x, (top_k, top_p, min_p), tok, kept, want, want_kept = _both_paths(logits, spec, dev)
    on = torch.tensor([f[0] > 0 for f in filt])
    assert _kept_sets_agree(x, kept, want_kept, top_k, top_p, min_p)[on].all()
    assert tok[on].tolist() == want[on].tolist()
    n = want_kept.sum(-1)
    assert n[1] == n[6] == V and 0 < n[3] < V and 0 < n[4] < V and 0 < n[5] <= 60 and n[7] >= 1
    v40 = x[2][want_kept[2]].min()
    assert n[2] >= 40 and (x[2] > v40).sum() < 40  # the 40th value's ties all kept
    assert n[9] <= 1000


def test_ties_at_a_threshold_are_kept_together():
    """The k-th value held by several tokens keeps them all; a top-p boundary inside a tied group
    keeps or drops the whole group; both paths agree."""
    pytest.importorskip("triton")
    probs = torch.tensor([0.3, 0.15, 0.05, 0.15, 0.15, 0.05, 0.1, 0.05])
    logits = torch.log(probs).float().expand(4, -1).contiguous()  # equal probabilities: equal logits
    spec = [(1.0, 2, 1.0, 0.0, 1, 0), (1.0, 6, 1.0, 0.0, 2, 0), (1.0, 0, 0.5, 0.0, 3, 0), (1.0, 0, 0.25, 0.0, 4, 0)]
    want = [[1, 1, 0, 1, 1, 0, 0, 0],  # v_2 = 0.15, held by 3 tokens
            [1, 1, 1, 1, 1, 1, 1, 1],  # v_6 = 0.05: every token ties with or beats it
            [1, 1, 0, 1, 1, 0, 0, 0],  # 0.3 above the 0.15s < 0.5: all three stay (0.75 in all)
            [1, 0, 0, 0, 0, 0, 0, 0]]  # 0.3 above them >= 0.25: all three go
    _, _, tok, kept, want_tok, want_kept = _both_paths(logits, spec, "cuda" if torch.cuda.is_available() else "cpu")
    assert want_kept.int().tolist() == want
    assert kept.int().tolist() == want
    assert tok.tolist() == want_tok.tolist()


@pytest.mark.gpu
def test_fused_sampler_matches_torch_path_real_vocab():
    """sample() on CUDA (the filtering kernel) against the torch path on the same device at the real
    vocabulary: 256 rows of bf16-rounded logits, temperature 0.8, top-p 0.9, some with top-k 50 or
    min-p 0.05. The kernel sums top-p masses in another order than the sorted cumsum, so a tied group
    whose mass above is within fp32 rounding (1e-5 relative) of top_p * Z may land on either side:
    only such rows may keep another set, and only they may draw another token."""
    from model import sampler
    R, V = 256, 151936
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(R, V, generator=g) * 2).bfloat16().float()
    spec = [(0.8, 50 if i % 8 == 1 else 0, 0.9, 0.05 if i % 8 == 2 else 0.0, 1000 + i, i) for i in range(R)]
    spec[3] = (0.0, 0, 1.0, 0.0, 0, 0)  # a greedy row
    rows, flags = sampler.pack_rows(spec)
    got = sampler.sample(logits.cuda(), torch.from_numpy(rows).cuda(), flags).cpu()
    assert sampler._FUSED_OK[0]
    x, (top_k, top_p, min_p), tok, kept, want, want_kept = _both_paths(logits, spec, "cuda")
    t = torch.tensor([s[0] if s[0] > 0 else 1.0 for s in spec]).cuda()
    lg = logits.cuda()  # sample()'s row max without a pass: the largest logit / t, bitwise x.amax(-1)
    assert torch.equal((lg.gather(-1, lg.argmax(-1, keepdim=True))[:, 0] / t).cpu(), x.amax(-1))
    want[3] = logits[3].argmax()
    same = (kept == want_kept).all(-1)
    same[3] = True
    assert (_kept_sets_agree(x, kept, want_kept, top_k, top_p, min_p) | same).all()
    assert (got == want)[same].all()
    assert (got != want).sum() <= (~same).sum()
    assert (got == tok)[torch.arange(R) != 3].all()
