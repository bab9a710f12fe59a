"""The pipeline engine end to end on CPU (gloo, float32): greedy tokens equal across stage counts
and equal to transformers' greedy generate, seeded sampling, stop ids, max_tokens, errors."""
import pytest
import torch

from engine import LLM, SamplingParams
from loader.presets import preset_config
from loader.writer import write_checkpoint

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=["tiny", "user-mini"])
def ckpt(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    write_checkpoint(d, preset_config(request.param), seed=11)
    return d


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in (3, 21, 70, 9)]


def hf_greedy(path, prompts, n):
    from hf_ref import load_hf
    model = load_hf(path)
    outs = []
    for p in prompts:
        out = model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        outs.append(out[0, len(p):].tolist())
    return outs


def test_greedy_equal_across_stages_and_to_transformers(ckpt, prompts):
    ref = hf_greedy(ckpt, prompts, GREEDY.max_tokens)
    for stages in (1, 2, 3):
        with LLM(str(ckpt), stages=stages, verbose=False) as llm:
            outs = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == ref, f"stages={stages}"
        assert all(o.finish_reason == "length" for o in outs)


@pytest.fixture(scope="module")
def llm2(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny2")
    write_checkpoint(d, preset_config("tiny"), seed=3)
    with LLM(str(d), stages=2, verbose=False) as llm:
        yield llm


def test_seeded_sampling_reproducible_and_seed_matters(llm2, prompts):
    sp = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    a = llm2.generate(prompts[:2], sp)
    b = llm2.generate(prompts[:2], sp)
    c = llm2.generate(prompts[:2], SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_stop_token_and_max_tokens(llm2, prompts):
    free = llm2.generate([prompts[1]], GREEDY)[0]
    stop = free.token_ids[4]
    first = free.token_ids.index(stop)
    out = llm2.generate([prompts[1]], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop]))[0]
    assert out.token_ids == free.token_ids[:first + 1] and out.finish_reason == "stop"
    out = llm2.generate([prompts[1]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == free.token_ids[:3] and out.finish_reason == "length"


def test_text_prompts_and_text_output(llm2):
    outs = llm2.generate(["Hello world", "The fox"], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert all(isinstance(o.text, str) and len(o.token_ids) == 5 for o in outs)
    assert outs[0].text == llm2.tokenizer.decode(outs[0].token_ids)


def test_bad_requests_raise_before_any_work(llm2):
    with pytest.raises(ValueError, match="empty prompt"):
        llm2.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="exceeds the model's context of 8192"):
        llm2.generate([[5] * 8190], GREEDY)
    with pytest.raises(ValueError, match=r"token ids must be integers in \[0, 512\)"):
        llm2.generate([[5, 9999]], GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    assert llm2.generate([[5, 6]], GREEDY)[0].finish_reason == "length"  # still serving


def test_bad_engine_arguments(tmp_path):
    write_checkpoint(tmp_path, preset_config("tiny"))
    with pytest.raises(ValueError, match="exceeds the model's 4 layers"):
        LLM(str(tmp_path), stages=5)
    with pytest.raises(ValueError, match="device 'tpu'"):
        LLM(str(tmp_path), device="tpu")
    with pytest.raises(ValueError, match="no such model folder"):
        LLM(str(tmp_path / "nope"))
