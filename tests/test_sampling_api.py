"""The sampling API end to end on the tiny CPU model, 1 and 2 stages: penalties (repetition against
transformers' greedy generate), logit_bias, min_tokens, logprobs and prompt_logprobs against
torch.log_softmax of transformers' logits on the same checkpoint (raw and processed), n, stop
strings, and bad requests refused without taking the engine down."""
import math

import pytest
import torch

from engine import LLM, SamplingParams
from loader.presets import preset_config
from loader.writer import write_checkpoint

EOS = 2
PROMPTS = [[5, 6, 7, 8, 9], [100, 3, 44, 200, 17, 9, 9, 31, 260, 7, 12], [300]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_sampling")
    write_checkpoint(d, preset_config("tiny"), seed=3)
    return d


@pytest.fixture(scope="module")
def hf(ckpt):
    from hf_ref import load_hf
    return load_hf(ckpt)


@pytest.fixture(scope="module", params=[1, 2])
def llm(request, ckpt):
    with LLM(str(ckpt), stages=request.param, verbose=False) as e:
        yield e


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position of ids [T] -> [T, V] (float64)."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)


def greedy(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=kw.pop("max_tokens", 16), temperature=0, ignore_eos=True, **kw)


def test_presence_penalty_never_repeats_and_bias_forces(llm):
    plain = [o.token_ids for o in llm.generate(PROMPTS, greedy(max_tokens=24))]
    assert any(len(set(t)) < len(t) for t in plain)  # greedy alone repeats itself on this model
    pen = llm.generate(PROMPTS, greedy(max_tokens=24, presence_penalty=2.0, frequency_penalty=2.0))
    assert all(len(set(o.token_ids)) == len(o.token_ids) for o in pen)
    # beside plain requests, the plain ones stay bit-identical
    mixed = llm.generate(PROMPTS + PROMPTS[:1], [greedy(max_tokens=24)] * 3 + [greedy(max_tokens=24, logit_bias={77: 100})])
    assert [o.token_ids for o in mixed[:3]] == plain and mixed[3].token_ids == [77] * 24
    sampled = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=6, temperature=1.0, seed=1, logit_bias={400: 100.0}))
    assert sampled[0].token_ids == [400] * 6
    banned = plain[0][0]
    assert llm.generate(PROMPTS[:1], greedy(max_tokens=8, logit_bias={banned: -100}))[0].token_ids[0] != banned


def test_repetition_penalty_equals_transformers(llm, hf):
    for p in PROMPTS[:2]:
        want = hf.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                           repetition_penalty=1.8, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        got = llm.generate([p], greedy(max_tokens=12, repetition_penalty=1.8))[0].token_ids
        assert got == want
        assert got != llm.generate([p], greedy(max_tokens=12))[0].token_ids


def test_min_tokens_holds_back_a_forced_eos(llm):
    force = {EOS: 100.0}
    out = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=10, temperature=0, logit_bias=force))[0]
    assert out.token_ids == [EOS] and out.finish_reason == "stop"
    out = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=10, temperature=0, logit_bias=force, min_tokens=4))[0]
    assert len(out.token_ids) == 5 and EOS not in out.token_ids[:4] and out.token_ids[4] == EOS
    assert out.finish_reason == "stop"


def test_logprobs_and_prompt_logprobs_equal_log_softmax_of_transformers(llm, hf):
    sp = greedy(max_tokens=6, logprobs=3, prompt_logprobs=2)
    outs = llm.generate(PROMPTS, sp)
    for p, o in zip(PROMPTS, outs):
        lp = hf_logprobs(hf, p + o.token_ids)
        assert o.prompt_logprobs[0] is None and len(o.prompt_logprobs) == len(p)
        for j in range(1, len(p)):
            d = o.prompt_logprobs[j]
            want = float(lp[j - 1, p[j]])
            assert math.isclose(d[p[j]].logprob, want, abs_tol=1e-4)
            assert d[p[j]].rank == 1 + int((lp[j - 1] > want + 1e-6).sum())
            top = lp[j - 1].topk(2)
            for t, v in zip(top.indices.tolist(), top.values.tolist()):
                assert math.isclose(d[t].logprob, v, abs_tol=1e-4)
        assert len(o.outputs[0].logprobs) == len(o.token_ids)
        total = 0.0
        for i, (tok, d) in enumerate(zip(o.token_ids, o.outputs[0].logprobs)):
            row = lp[len(p) + i - 1]
            assert math.isclose(d[tok].logprob, float(row[tok]), abs_tol=1e-4) and d[tok].rank == 1  # greedy
            assert len(d) == 3 and set(d) == set(row.topk(3).indices.tolist())
            total += d[tok].logprob
        assert math.isclose(o.outputs[0].cumulative_logprob, total, abs_tol=1e-6)
    plain = llm.generate(PROMPTS, greedy(max_tokens=6))
    assert [o.token_ids for o in plain] == [o.token_ids for o in outs]
    assert plain[0].outputs[0].logprobs is None and plain[0].prompt_logprobs is None
    zero = llm.generate(PROMPTS[:1], greedy(max_tokens=2, logprobs=0))[0].outputs[0].logprobs
    assert [list(d) for d in zero] == [[t] for t in outs[0].token_ids[:2]]  # 0: the sampled token alone


def test_prompt_logprobs_of_a_prompt_longer_than_a_micro_batch_holds(llm, hf):
    """A 2,600-token prompt asking for prompt_logprobs is prefilled in chunks of at most
    PROMPT_LOGPROB_ROWS (1,024) tokens (the logits of its rows are held in fp32); every position's
    logprob still equals log_softmax of transformers' logits, and the answer is the plain one."""
    from engine.runtime.scheduler import PROMPT_LOGPROB_ROWS
    g = torch.Generator().manual_seed(8)
    p = torch.randint(3, 500, (2 * PROMPT_LOGPROB_ROWS + 552,), generator=g).tolist()
    o = llm.generate([p], greedy(max_tokens=2, prompt_logprobs=0))[0]
    lp = hf_logprobs(hf, p)
    got = torch.tensor([o.prompt_logprobs[j][p[j]].logprob for j in range(1, len(p))], dtype=torch.float64)
    want = lp[torch.arange(len(p) - 1), torch.tensor(p[1:])]
    assert (got - want).abs().max() < 1e-4
    assert o.token_ids == llm.generate([p], greedy(max_tokens=2))[0].token_ids


def test_processed_logprobs_are_of_the_sampling_distribution(llm, hf):
    """processed_logprobs: log_softmax of logits / temperature over the top-k kept; raw: of the model's
    logits; the sampled token is always there, with its rank."""
    p = PROMPTS[1]
    T, K = 0.5, 5
    base = dict(max_tokens=5, temperature=T, top_k=K, seed=7, ignore_eos=True, logprobs=2)
    proc = llm.generate([p], SamplingParams(**base, logprobs_mode="processed_logprobs"))[0]
    raw = llm.generate([p], SamplingParams(**base))[0]
    assert proc.token_ids == raw.token_ids
    with torch.no_grad():
        logits = hf(torch.tensor([p + proc.token_ids])).logits[0].double()
    for i, tok in enumerate(proc.token_ids):
        x = logits[len(p) + i - 1]
        kept = x >= x.topk(K).values[-1]
        want_proc = torch.log_softmax(torch.where(kept, x / T, float("-inf")), -1)
        want_raw = torch.log_softmax(x, -1)
        assert math.isclose(proc.outputs[0].logprobs[i][tok].logprob, float(want_proc[tok]), abs_tol=1e-4)
        assert math.isclose(raw.outputs[0].logprobs[i][tok].logprob, float(want_raw[tok]), abs_tol=1e-4)
        assert raw.outputs[0].logprobs[i][tok].rank == 1 + int((want_raw > want_raw[tok] + 1e-6).sum())


def test_n_samples_seeded_as_separate_requests(llm):
    sp = SamplingParams(max_tokens=6, temperature=1.0, seed=40, ignore_eos=True, n=3)
    out = llm.generate(PROMPTS[:2], sp)
    assert [len(o.outputs) for o in out] == [3, 3]
    for o, p in zip(out, PROMPTS):
        assert [c.index for c in o.outputs] == [0, 1, 2]
        assert o.token_ids == o.outputs[0].token_ids and o.finish_reason == o.outputs[0].finish_reason
        for i, c in enumerate(o.outputs):
            alone = llm.generate([p], SamplingParams(max_tokens=6, temperature=1.0, seed=40 + i, ignore_eos=True))
            assert c.token_ids == alone[0].token_ids
        assert len({tuple(c.token_ids) for c in o.outputs}) == 3
    with pytest.raises(ValueError, match="n > 1"):
        llm.submit(PROMPTS[0], sp)


def test_stop_strings_cut_the_text_and_end_the_sequence(llm):
    free = llm.generate(["Hello world"], greedy(max_tokens=20))[0]
    text = free.text
    stop = next(text[i:i + 3] for i in range(4, len(text) - 3) if text[i:i + 3].strip() and text[:i].find(text[i:i + 3]) < 0)
    cut = text.index(stop)
    out = llm.generate(["Hello world"], greedy(max_tokens=20, stop=[stop, "\x00never"]))[0]
    assert out.text == text[:cut] and out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert len(out.token_ids) < len(free.token_ids) and out.token_ids == free.token_ids[:len(out.token_ids)]
    inc = llm.generate(["Hello world"], greedy(max_tokens=20, stop=[stop], include_stop_str_in_output=True))[0]
    assert inc.text == text[:cut + len(stop)]
    ev = list(llm.submit("Hello world", greedy(max_tokens=20, stop=[stop])))
    assert ev[-1].finish_reason == "stop" and ev[-1].stop_reason == stop and ev[-1].text == text[:cut]
    assert llm.generate(["Hello world"], greedy(max_tokens=20))[0].token_ids == free.token_ids  # still serving


def test_bad_sampling_requests_refused_engine_keeps_serving(llm):
    with pytest.raises(ValueError, match="logit_bias token id 512 is not in the vocabulary"):
        llm.generate(PROMPTS[:1], greedy(logit_bias={512: 1.0}))
    with pytest.raises(ValueError, match="logit_bias"):
        llm.submit(PROMPTS[0], greedy(logit_bias={10**9: 1.0}))
    # a stop token id past the vocabulary with min_tokens: never masked, never crashes
    out = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=3, temperature=0, stop_token_ids=[10**6], min_tokens=2))
    assert out[0].finish_reason == "length"


@pytest.mark.gpu
def test_cuda_penalties_logprobs_and_no_late_compiles(ckpt, hf):
    """On CUDA (fused sampler, decode graphs, 2 stages when there are 2 GPUs): penalties never repeat,
    logprobs and prompt logprobs equal transformers', processed logprobs come from the kernel's kept
    set, and no request compiles a Triton kernel."""
    stages = min(2, torch.cuda.device_count())
    with LLM(str(ckpt), stages=stages, device="cuda", dtype="float32", verbose=False) as e:
        pen = e.generate(PROMPTS, greedy(max_tokens=24, presence_penalty=2.0, frequency_penalty=2.0))
        assert all(len(set(o.token_ids)) == len(o.token_ids) for o in pen)
        o = e.generate(PROMPTS[1:2], greedy(max_tokens=6, logprobs=3, prompt_logprobs=2))[0]
        lp = hf_logprobs(hf, PROMPTS[1] + o.token_ids)
        for j in range(1, len(PROMPTS[1])):
            assert math.isclose(o.prompt_logprobs[j][PROMPTS[1][j]].logprob, float(lp[j - 1, PROMPTS[1][j]]),
                                abs_tol=1e-3)
        for i, (tok, d) in enumerate(zip(o.token_ids, o.outputs[0].logprobs)):
            assert math.isclose(d[tok].logprob, float(lp[len(PROMPTS[1]) + i - 1, tok]), abs_tol=1e-3)
        proc = e.generate(PROMPTS[1:2], SamplingParams(max_tokens=8, temperature=0.7, top_p=0.8, seed=3, logprobs=1,
                                                       ignore_eos=True, logprobs_mode="processed_logprobs"))[0]
        for tok, d in zip(proc.token_ids, proc.outputs[0].logprobs):
            assert d[tok].logprob > math.log(1e-6) and d[tok].logprob <= 0
        late = {s["rank"]: s["late_kernels"] for s in e.stats()["stages"] if s["late_compiles"]}
        assert not late, f"Triton kernels compiled inside requests: {late}"
