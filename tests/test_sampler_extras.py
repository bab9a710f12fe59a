"""The sampler's extras against naive per-row torch maths on seeded random logits: logit_bias and
min_tokens' sparse additions, presence / frequency / repetition penalties (vLLM's formulas and
order), the per-slot counts updated after a draw, logprob tables against torch.log_softmax,
processed logprobs of the kept set, stage 0's slot planner, and SamplingParams validation."""
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from engine.params import SamplingParams  # noqa: E402
from engine.runtime.sampling_plan import SamplingPlanner  # noqa: E402
from engine.runtime.sequence import Sequence, Status  # noqa: E402
from model.sampler import F_PENALTY, filter_logits, pack_rows, sample, sample_with  # noqa: E402
from model.sampler_logprobs import logprob_table, unpack_row  # noqa: E402
from model.sampler_penalties import PenaltyState, add_sparse  # noqa: E402

V = 40


def naive_penalised(logits, prompt_tokens, output_tokens, presence, frequency, repetition, bias):
    """One row, vLLM's maths written out token by token."""
    x = [float(v) for v in logits]
    for t, b in bias.items():
        x[t] += b
    for t in range(len(x)):
        if t in prompt_tokens or t in output_tokens:
            x[t] = x[t] / repetition if x[t] > 0 else x[t] * repetition
        c = output_tokens.count(t)
        x[t] -= frequency * c + presence * (c > 0)
    return torch.tensor(x)


@pytest.mark.parametrize("fused", [False, True])
def test_penalties_and_bias_match_naive_maths(fused):
    """The torch maths, and the one-launch Triton kernel (model/penalties_triton.py; interpreted on CPU)."""
    g = torch.Generator().manual_seed(0)
    R = 6
    logits = torch.randn(R, V, generator=g) * 3
    # (slot, presence, frequency, repetition, bias); row 2 has no slot (no penalties) but a bias, row 5 nothing
    spec = [(0, 1.5, 0.0, 1.0, {}), (1, 0.0, 0.7, 1.0, {3: 2.5}), (-1, 0.0, 0.0, 1.0, {0: -100.0, 7: 5.0}),
            (2, -0.5, 0.3, 1.8, {}), (3, 0.0, 0.0, 0.6, {1: 1.0}), (-1, 0.0, 0.0, 1.0, {})]
    prompts = {0: [1, 2, 3], 1: [4], 2: [5, 6, 6, 7], 3: [8, 9, 1]}
    outputs = {s: torch.randint(0, V, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
               for s in range(4)}
    state = PenaltyState(5, V, torch.device("cpu"), fused=fused)
    state.counts_SV[4, 2] = 9  # a stale slot: its reset must clear it
    resets = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)
    pp = torch.tensor([(s, t) for s, ts in prompts.items() for t in ts], dtype=torch.int32)
    op = torch.tensor([(s, t) for s, ts in outputs.items() for t in ts], dtype=torch.int32)
    state.init(resets, pp, op)
    assert state.counts_SV[4].sum() == 0
    rows = torch.from_numpy(pack_rows([(0.0, 0, 1.0, 0.0, 1, 0, s, p, f, r) for s, p, f, r, _ in spec])[0])
    entries = [(i, t, b) for i, (*_, bias) in enumerate(spec) for t, b in bias.items()]
    e = np.zeros((len(entries), 3), dtype=np.int32)
    e[:, :2] = [(i, t) for i, t, _ in entries]
    e[:, 2] = np.asarray([b for *_, b in entries], dtype=np.float32).view(np.int32)
    got = state.apply(add_sparse(logits, torch.from_numpy(e)), rows)
    for i, (s, p, f, r, bias) in enumerate(spec):
        want = naive_penalised(logits[i], prompts.get(s, []) if r != 1 else [], outputs.get(s, []), p, f, r, bias)
        torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-5)
    assert torch.equal(got[5], logits[5])  # a row without penalties or bias: bit-identical
    assert (got - logits).abs().amax(-1)[:5].min() > 0.1  # and every other row changed
    # greedy draws from the penalised logits; the drawn token is counted in its row's slot only
    ids = sample(got, rows, pack_rows([(0.0, 0, 1.0, 0.0, 1, 0, s, p, f, r) for s, p, f, r, _ in spec])[1])
    assert ids.tolist() == got.argmax(-1).tolist()
    before = state.counts_SV.clone()
    state.record(rows, ids)
    diff = state.counts_SV - before
    for i, (s, *_) in enumerate(spec):
        if s >= 0:
            assert diff[s, ids[i]] == 1
    assert diff.sum() == sum(1 for s, *_ in spec if s >= 0)


def test_fused_penalties_equal_the_torch_maths_bit_for_bit():
    """The one-launch kernel against PenaltyState's torch maths on a vocabulary of several partial
    tiles (3,000 = 2,048 + 952), -inf logits, repeated counts, rows without a slot (p = f = 0,
    r = 1, as stage 0 plans them: unchanged) and one without a slot but with penalties (both read
    slot 0): equal to the bit, -inf included."""
    from model.penalties_triton import BV
    g = torch.Generator().manual_seed(4)
    R, Vb = 6, BV + 952
    logits = (torch.randn(R, Vb, generator=g) * 2).bfloat16().float()
    logits[1, :5] = float("-inf")
    spec = [(0.8, 0, 1.0, 0.0, i, i, i % 4 - 1) + ((0.5, 0.2, 1.3) if i % 4 else (0.0, 0.0, 1.0)) for i in range(R)]
    spec[4] = spec[4][:7] + (0.3, 0.1, 1.2)
    rows = torch.from_numpy(pack_rows(spec)[0])
    state = PenaltyState(4, Vb, torch.device("cpu"))
    out = torch.randint(0, Vb, (400, 2), generator=g, dtype=torch.int32)
    out[:, 0] %= 4
    prompt = torch.randint(0, Vb, (100, 2), generator=g, dtype=torch.int32)
    prompt[:, 0] %= 4
    state.init(torch.arange(4, dtype=torch.int32), prompt, out)
    want = state.apply(logits, rows)
    state.fused = True
    got = state.apply(logits, rows)
    assert torch.equal(got, want) and (got != logits).any(-1)[[1, 2, 3, 4, 5]].all()
    assert torch.equal(got[0], logits[0])


def test_pack_rows_flags():
    assert pack_rows([(0.0, 0, 1.0, 0.0, 1, 0)])[1] == 0
    _, f = pack_rows([(0.0, 0, 1.0, 0.0, 1, 0), (0.0, 0, 1.0, 0.0, 1, 0, 3, 0.5, 0.0, 1.0)])
    assert f & F_PENALTY
    _, f = pack_rows([(0.0, 0, 1.0, 0.0, 1, 0, -1, 0.0, 0.0, 1.0, 2, 1)])
    assert f == 8 | 16  # logprobs, processed


def test_logprob_table_matches_log_softmax():
    g = torch.Generator().manual_seed(1)
    N, k = 7, 4
    logits = torch.randn(N, V, generator=g) * 2
    logits[3, :30] = float("-inf")  # masked tokens (processed logprobs)
    chosen = torch.randint(0, V, (N,), generator=g)
    chosen[3] = 33
    table = logprob_table(logits, chosen, k)
    for i in range(N):
        lp = torch.log_softmax(logits[i].double(), -1)
        c = int(chosen[i])
        got, rank, ids, lps = unpack_row(table[i].tolist(), k)
        assert math.isclose(got, float(lp[c]), abs_tol=1e-5)
        assert rank == 1 + int((lp > lp[c]).sum())
        order = sorted(range(V), key=lambda t: -float(lp[t]))[:k]
        assert [float(lp[t]) for t in ids] == pytest.approx([float(lp[t]) for t in order], abs=1e-6)
        assert lps == pytest.approx([float(lp[t]) for t in order], abs=1e-5)
    assert unpack_row(table[0].tolist(), 1)[2:] == (unpack_row(table[0].tolist(), k)[2][:1],
                                                     unpack_row(table[0].tolist(), k)[3][:1])


def test_processed_logits_are_the_filtered_distribution():
    """sample_with(processed=True): sampled rows' logits / temperature with -inf outside the kept set,
    greedy rows as given; the drawn tokens are sample()'s."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, V, generator=g) * 2
    spec = [(0.5, 5, 1.0, 0.0, 1, 0), (0.0, 5, 0.5, 0.0, 2, 0), (1.3, 0, 0.8, 0.0, 3, 0), (1.0, 0, 1.0, 0.0, 4, 0)]
    rows, flags = pack_rows(spec)
    rows = torch.from_numpy(rows)
    ids, x = sample_with(logits, rows, flags, processed=True)
    assert ids.tolist() == sample(logits, rows, flags).tolist()
    t = torch.tensor([0.5, 1.0, 1.3, 1.0])
    want = filter_logits(logits / t[:, None], rows[:, 1], rows[:, 2].view(torch.float32), rows[:, 3].view(torch.float32))
    want[1] = logits[1]  # greedy: unfiltered
    assert torch.equal(x, want)
    assert (x[0] > float("-inf")).sum() == 5 and (x[3] > float("-inf")).all()


def _seq(sid, prompt, outputs, params):
    s = Sequence(sid, prompt, params, (2,))
    s.token_ids += outputs
    s.status = Status.RUNNING
    return s


def test_planner_slots_reinit_after_preemption_and_release():
    pen = SamplingParams(presence_penalty=1.0, repetition_penalty=1.2, min_tokens=3, logit_bias={7: 1.0, 9: -2.0})
    a, b = _seq(0, [4, 5, 4], [], pen), _seq(1, [6], [8, 8], SamplingParams(frequency_penalty=0.5))
    plain = _seq(2, [3], [], SamplingParams())
    pl = SamplingPlanner(num_slots=2, vocab_size=V)
    chunk = lambda s: SimpleNamespace(seq=s, start=0, length=len(s), sample=True, pending=0, end=len(s))  # noqa: E731
    assert pl.prepare([chunk(plain)]) is None  # nothing asked: no extras at all
    ex = pl.prepare([chunk(a), chunk(plain), chunk(b)])
    assert ex.resets == [0, 1] and sorted(ex.prompt_pairs) == [(0, 4), (0, 5)]  # b has no repetition penalty
    assert ex.output_pairs == [(1, 8), (1, 8)]
    assert [f[0] for f in ex.row_fields] == [0, -1, 1]
    assert sorted(ex.bias) == [(0, 2, float("-inf")), (0, 7, 1.0), (0, 9, -2.0)]  # min_tokens masks eos 2
    ex = pl.prepare([chunk(a)])
    assert ex.resets == [] and ex.row_fields[0][0] == 0  # slot kept, no re-fill
    a.token_ids += [11, 12, 13]
    a.num_preemptions += 1  # preempted and back: re-filled from every token known
    ex = pl.prepare([chunk(a)])
    assert ex.resets == [0] and ex.output_pairs == [(0, 11), (0, 12), (0, 13)]
    assert all(t != 2 for _, t, _ in ex.bias)  # 3 outputs: min_tokens reached
    c = _seq(3, [1], [], pen)
    b.status = Status.WAITING  # preempted: its slot may be taken back when none is free
    assert pl.prepare([chunk(c)]).resets == [1]
    pl.release(0)
    d = _seq(4, [1], [], pen)
    assert pl.prepare([chunk(d)]).resets == [0]


def test_planner_prompt_logprob_rows_cover_each_prompt_token_once():
    s = _seq(0, list(range(10, 20)), [], SamplingParams(prompt_logprobs=2))
    pl = SamplingPlanner(num_slots=1, vocab_size=V)
    mk = lambda st, n, other: SimpleNamespace(seq=s, start=st, length=n, end=st + n,  # noqa: E731
                                              sample=st + n == 10, pending=0)
    got = []
    for st, n in ((0, 4), (4, 5), (9, 1), (0, 10)):  # the last: recomputed after a preemption
        ex = pl.prepare([mk(st, n, None)])
        got += list(zip(ex.prompt_positions, ex.prompt_targets))
        assert ex.k == (2 if ex.prompt_positions else -1)
    assert [t for _, t in got] == list(range(11, 20))
    assert [p for p, _ in got] == [0, 1, 2, 3, 0, 1, 2, 3, 4]  # position j - 1 in its chunk gives token j


BAD = [("presence_penalty", 2.5), ("frequency_penalty", -2.01), ("presence_penalty", float("nan")),
       ("repetition_penalty", 0), ("repetition_penalty", -1.0), ("logit_bias", {5: 101}), ("logit_bias", {-1: 1}),
       ("logit_bias", [1, 2]), ("logit_bias", {"x": 1}), ("min_tokens", -1), ("min_tokens", 100),
       ("logprobs", 21), ("logprobs", -1), ("logprobs", True), ("prompt_logprobs", 1.5), ("n", 0),
       ("n", True), ("stop", [""]), ("stop", 5), ("logprobs_mode", "raw"), ("top_k", 2**63)]


@pytest.mark.parametrize("name,value", BAD)
def test_bad_sampling_params_name_the_field(name, value):
    with pytest.raises(ValueError, match=f"SamplingParams: {name}"):
        SamplingParams(**{name: value})


def test_sampling_params_normalise_and_samples():
    sp = SamplingParams(logit_bias={"5": 1, 7: -100}, stop="END", n=3, seed=2**64 - 1)
    assert sp.logit_bias == {5: 1.0, 7: -100.0} and sp.stop == ("END",)
    assert [p.seed for p in sp.samples()] == [2**64 - 1, 0, 1] and all(p.n == 1 for p in sp.samples())
    assert [p.seed for p in SamplingParams(n=2).samples()] == [None, None]
    with pytest.raises(ValueError, match="logit_bias token id 40 is not in the vocabulary"):
        SamplingParams(logit_bias={40: 1.0}).check_vocab(V)


@pytest.mark.gpu
def test_cuda_processed_logits_and_penalties_match_cpu():
    """On CUDA the fused kernel's kept set (its thresholds) gives the processed logits; penalties and
    logprob tables equal the CPU maths."""
    g = torch.Generator().manual_seed(4)
    R, Vr = 64, 151936
    logits = (torch.randn(R, Vr, generator=g) * 2).bfloat16().float()
    spec = [(0.8, 50 if i % 2 else 0, 0.9 if i % 3 else 1.0, 0.0, i, i, i % 4 - 1, 0.5, 0.2, 1.3, 5, 1)
            for i in range(R)]
    rows, flags = pack_rows(spec)
    ids, x = sample_with(logits.cuda(), torch.from_numpy(rows).cuda(), flags, processed=True)
    kept = x > float("-inf")
    assert kept[torch.arange(R), ids].all()
    t = torch.tensor([s[0] for s in spec])[:, None]
    torch.testing.assert_close(x[kept].cpu(), (logits / t)[kept.cpu()])
    cpu_kept = filter_logits(logits / t, torch.from_numpy(rows)[:, 1], torch.from_numpy(rows)[:, 2].view(torch.float32),
                             torch.zeros(R)) > float("-inf")
    assert (kept.cpu() == cpu_kept).all(-1).float().mean() > 0.9  # top-p boundary ties may differ (fp32 order)
    state_c, state_g = PenaltyState(4, Vr, torch.device("cpu")), PenaltyState(4, Vr, torch.device("cuda"))
    out = torch.randint(0, Vr, (200, 2), generator=g, dtype=torch.int32)
    out[:, 0] %= 4
    for s in (state_c, state_g):
        s.init(torch.arange(4, dtype=torch.int32).to(s.counts_SV.device), out[:0].to(s.counts_SV.device),
               out.to(s.counts_SV.device))
    r = torch.from_numpy(rows)
    torch.testing.assert_close(state_g.apply(logits.cuda(), r.cuda()).cpu(), state_c.apply(logits, r))
    state_g.fused = True  # the one-launch kernel on the device: the same fp32 steps, to the bit
    assert torch.equal(state_g.apply(logits.cuda(), r.cuda()).cpu(), state_c.apply(logits, r))
    got, want = logprob_table(logits.cuda(), ids, 5).cpu(), logprob_table(logits, ids.cpu(), 5)
    torch.testing.assert_close(got[:, :7], want[:, :7], rtol=1e-5, atol=1e-4)  # chosen, rank, top-5 logprobs
    # the logits are bf16 values, so exact ties are common and topk may order tied ids either way:
    # each returned id must carry the logprob listed beside it
    lp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(lp.gather(1, got[:, 7:].long()), want[:, 2:7], rtol=1e-5, atol=1e-4)
