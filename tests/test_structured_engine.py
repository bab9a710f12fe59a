"""Structured output through the real engine on the tiny CPU model, 1 and 2 stages: 20 JSON schemas
whose every output parses and validates, regex and choice, mixed batches where plain rows stay
bit-identical, matchers freed on finish and abort, preemption under a tiny KV pool, reasoning-aware
grammars (free until `</think>`), no async continuation of structured sequences, and bad schemas
refused before any stage sees them."""
import json
import re

import pytest

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from engine import LLM, SamplingParams, StructuredOutputsParams
from engine.tools.chat_template import ChatTemplate
from engine.structured.requests import starts_in_reasoning
from loader.presets import preset_config
from loader.writer import write_checkpoint
from tests.structured_util import SCHEMAS, closer_ids

EOS = 2
PROMPTS = [[5, 6, 7, 8, 9], [100, 3, 44, 200, 17, 9, 9, 31, 260, 7, 12], [300]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_structured")
    write_checkpoint(d, preset_config("tiny"), seed=3)
    return d


@pytest.fixture(scope="module", params=[1, 2])
def llm(request, ckpt):
    with LLM(str(ckpt), stages=request.param, verbose=False) as e:
        yield e


@pytest.fixture(scope="module")
def bonus(ckpt) -> dict[int, float]:
    """logit_bias that ends the random model's strings and arrays (tokens with a closer, and EOS)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    return {**{i: 3.0 for i in closer_ids(tok, preset_config("tiny")["vocab_size"])}, EOS: 3.0}


def structured(max_tokens: int = 600, seed: int = 0, bias: dict | None = None, **kind) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, logit_bias=bias,
                          structured_outputs=StructuredOutputsParams(**kind))


def matchers_left(llm) -> int:
    return llm.stats()["scheduler"]["grammar_matchers"]


def test_every_json_output_validates_against_its_schema(llm, bonus):
    names = list(SCHEMAS)
    assert len(names) >= 20
    # one batch: every row its own grammar (and two rows of the same one, other seeds)
    params = [structured(seed=i, bias=bonus, json=SCHEMAS[n]) for i, n in enumerate(names)]
    params += [structured(seed=100, bias=bonus, json=SCHEMAS["nested"])]
    outs = llm.generate([PROMPTS[i % 3] for i in range(len(params))], params)
    for (n, o) in zip(names + ["nested"], outs):
        assert o.finish_reason == "stop" and o.token_ids[-1] == EOS, (n, o.text)
        jsonschema.validate(json.loads(o.text), SCHEMAS[n])
    unconstrained = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=60, temperature=1.0, seed=0, logit_bias=bonus))
    with pytest.raises(ValueError):  # the same sampler without the grammar writes no JSON
        json.loads(unconstrained[0].text)
    assert matchers_left(llm) == 0  # every finished sequence released its matcher


def test_regex_choice_and_json_object(llm, bonus):
    rx = r"[a-z]{3}-\d{2}(\.[A-Z])?"
    outs = llm.generate(PROMPTS, [structured(seed=1, regex=rx), structured(seed=2, choice=["yes", "no", "maybe"]),
                                  structured(seed=3, bias=bonus, json_object=True)])
    assert re.fullmatch(rx, outs[0].text) and outs[0].finish_reason == "stop"
    assert outs[1].text in ("yes", "no", "maybe")
    assert isinstance(json.loads(outs[2].text), dict)
    # n samples share the grammar; each is its own sequence with its own matcher
    many = llm.generate(PROMPTS[:1], SamplingParams(n=4, max_tokens=20, temperature=1.0, seed=5,
                                                    structured_outputs=StructuredOutputsParams(regex=r"\d{4}")))
    assert all(re.fullmatch(r"\d{4}", c.text) for c in many[0].outputs)
    assert len({c.text for c in many[0].outputs}) > 1
    # as a dict of the fields, as the API payload gives it; compact JSON without whitespace
    compact = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=400, temperature=1.0, seed=7, logit_bias=bonus,
                                                       structured_outputs={"json": SCHEMAS["flat"],
                                                                           "disable_any_whitespace": True}))
    assert not re.search(r"\s", compact[0].text.replace(" ", "")) and json.loads(compact[0].text)


def test_plain_rows_are_bit_identical_beside_structured_ones(llm, bonus):
    plain = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
             SamplingParams(max_tokens=24, temperature=1.0, seed=11, ignore_eos=True, top_k=50, logprobs=2)]
    alone = llm.generate(PROMPTS[:2], plain)
    grammar = [structured(seed=4, bias=bonus, json=SCHEMAS["array_of_obj"]), structured(seed=5, regex="[0-9]{30}")]
    mixed = llm.generate([PROMPTS[2], PROMPTS[0], PROMPTS[2], PROMPTS[1]], [grammar[0], plain[0], grammar[1], plain[1]])
    assert [mixed[1].token_ids, mixed[3].token_ids] == [o.token_ids for o in alone]
    # the forward's batch differs (other rows, other micro-batch splits), so logprobs agree to
    # rounding; the sampler leaves unmasked rows bit-identical (test_mask_touches_only_its_rows)
    for got, want in zip(mixed[3].outputs[0].logprobs, alone[1].outputs[0].logprobs):
        assert got.keys() == want.keys()
        assert all(abs(got[t].logprob - want[t].logprob) < 1e-4 for t in got)
    assert re.fullmatch("[0-9]{30}", mixed[2].text)
    jsonschema.validate(json.loads(mixed[0].text), SCHEMAS["array_of_obj"])


def test_abort_midway_frees_matchers(llm):
    streams = [llm.submit(PROMPTS[i % 3], structured(max_tokens=500, seed=i, regex="[a-z]{400}")) for i in range(12)]
    for s in streams[:6]:
        next(iter(s))  # at least one token out: the grammar is under way
    llm.abort([s.request_id for s in streams])
    assert matchers_left(llm) == 0
    sched = llm.stats()["scheduler"]
    assert sched["running"] == sched["waiting"] == 0
    # a stop string ends a structured request in the engine too (the LLM aborts it there)
    out = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=200, temperature=1.0, seed=3, stop=["b"],
                                                   structured_outputs=StructuredOutputsParams(regex="[ab]{150}")))
    assert "b" not in out[0].text and len(out[0].token_ids) < 150
    assert matchers_left(llm) == 0


def test_structured_sequences_are_not_continued_before_their_token(llm):
    llm.stats(reset=True)
    outs = llm.generate(PROMPTS, [structured(max_tokens=40, seed=i, regex="[a-z ]{30}") for i in range(3)])
    assert all(re.fullmatch("[a-z ]{30}", o.text) for o in outs)
    assert llm.stats(reset=True)["scheduler"]["continuations"] == 0
    llm.generate(PROMPTS, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    if llm.options.stages == 1:  # one stage keeps two in flight: plain decodes are continued
        assert llm.stats()["scheduler"]["continuations"] > 0


def test_reasoning_aware_grammar_is_free_until_think_end(llm, ckpt, bonus):
    think_end = llm.tokenizer.token_to_id("</think>")
    bias = {**bonus, think_end: 100.0}  # the model would end its reasoning at once, and again later
    p = structured(seed=6, bias=bias, json=SCHEMAS["int_bounds"])  # no strings: `</think>` fits none
    thinking = llm.submit(PROMPTS[0], p, reasoning=True)
    ids = [ev.token_id for ev in thinking]
    assert ids[0] == think_end and think_end not in ids[1:]  # reasoning ends, then the grammar holds
    jsonschema.validate(json.loads(llm.tokenizer.decode(ids[1:])), SCHEMAS["int_bounds"])
    direct = llm.generate(PROMPTS[:1], p)[0]  # without reasoning the grammar holds from the first token
    assert think_end not in direct.token_ids
    jsonschema.validate(json.loads(direct.text), SCHEMAS["int_bounds"])
    # chat(): thinking on by default with Qwen3's template, off with enable_thinking False
    msgs = [{"role": "user", "content": "hi"}]
    on = llm.chat(msgs, p)[0]
    off = llm.chat(msgs, p, chat_template_kwargs={"enable_thinking": False})[0]
    assert on.token_ids[0] == think_end and think_end not in off.token_ids
    jsonschema.validate(json.loads(off.text), SCHEMAS["int_bounds"])


def test_starts_in_reasoning_reads_the_rendered_prompt(ckpt):
    ct = ChatTemplate.from_folder(ckpt)
    src = ct.pick(None)
    msgs = [{"role": "user", "content": "hi"}]
    assert starts_in_reasoning(src, ct.render(msgs), None)
    assert starts_in_reasoning(src, ct.render(msgs, chat_template_kwargs={"enable_thinking": True}), {})
    kw = {"enable_thinking": False}
    assert not starts_in_reasoning(src, ct.render(msgs, chat_template_kwargs=kw), kw)
    assert starts_in_reasoning("no switch", "<|im_start|>assistant\n<think>\n", None)  # a template that opens it
    assert not starts_in_reasoning("no switch", "<|im_start|>assistant\n", None)


def test_preemption_under_a_tiny_pool_keeps_outputs_valid(ckpt, bonus):
    per_token = 4 * 2 * 2 * 32 * 4  # layers x (k, v) x kv heads x head_dim x fp32, the whole model
    gib = 24 * 16 * per_token / 2 / 2**30  # 24 blocks of 16 per stage: 384 tokens for 8 requests
    params = [structured(max_tokens=120, seed=i, bias=bonus, json=SCHEMAS[n])
              for i, n in enumerate(["array_of_str", "nested", "anyOf", "additional_props"] * 2)]
    # no two prompts share a first block: shared prefixes would be computed once and held once
    # (the prefix cache), and the pool would no longer run short
    prompts = [[3 + (37 * i + j) % 400 for j in range(40 + i)] for i in range(len(params))]
    with LLM(str(ckpt), stages=2, verbose=False, block_size=16, kv_cache_gib=gib) as llm:
        assert llm.info["num_blocks"] == 24
        squeezed = llm.generate(prompts, params)
        sched = llm.stats()["scheduler"]
        assert sched["preemptions"] > 0 and sched["grammar_matchers"] == 0
        alone = [llm.generate([pr], p)[0] for pr, p in zip(prompts, params)]
    assert [o.token_ids for o in squeezed] == [o.token_ids for o in alone]
    for o, p in zip(squeezed, params):
        if o.finish_reason == "stop":
            jsonschema.validate(json.loads(o.text), p.structured_outputs.json)
        else:  # cut by max_tokens: the prefix is still one the grammar accepts
            assert o.finish_reason == "length" and len(o.token_ids) == 120


@pytest.mark.parametrize("kind, match", [
    ({"json": {"type": "object", "properties": {"a": {"type": "strng"}}}}, r"structured_outputs\.json: cannot compile"),
    ({"regex": "(unclosed"}, r"structured_outputs\.regex: cannot compile"),
    ({"grammar": "root ::= missing_rule"}, r"structured_outputs\.grammar: cannot compile"),
])
def test_bad_grammar_refused_before_any_stage(llm, kind, match):
    before = llm.stats()["scheduler"]["prompt_tokens"]
    with pytest.raises(ValueError, match=match):
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(**kind)))
    with pytest.raises(ValueError, match=match):
        llm.submit(PROMPTS[0], SamplingParams(max_tokens=4, structured_outputs=kind))
    assert llm.stats()["scheduler"]["prompt_tokens"] == before  # stage 0 never saw them
    with pytest.raises(ValueError, match="structured_outputs must be StructuredOutputsParams"):
        SamplingParams(structured_outputs="json")
    with pytest.raises(ValueError, match="unknown key"):
        SamplingParams(structured_outputs={"jsn": {}})
    ok = llm.generate(PROMPTS[:1], structured(seed=0, choice=["a", "b"]))  # the engine is unharmed
    assert ok[0].text in ("a", "b")


def test_mask_touches_only_its_rows():
    """The last stage's sampler on one plan, with and without a bitmask on row 1: rows 0 and 2
    (greedy, and sampled with logprobs and a penalty) are bit-identical; row 1 draws an allowed token."""
    import numpy as np
    import torch

    from engine.runtime.sampling_plan import SamplingPlanner
    from engine.runtime.scheduler import Chunk
    from engine.runtime.sequence import Sequence
    from engine.runtime.stage_sampling import LastStageSampler
    from engine.runtime.step_plan import PlanView, build_plan
    from engine.structured import allocate_bitmask
    V = 100
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1),
              SamplingParams(temperature=0.8, seed=2, logprobs=3, presence_penalty=0.5)]
    chunks = []
    for i, p in enumerate(params):
        s = Sequence(i, [3, 4, 5 + i], p, (EOS,))
        s.block_table = [i]
        chunks.append(Chunk(s, 0, 3, True))
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0)) * 3
    allowed = [7, 41, 99]
    bitmask = allocate_bitmask(1, V).zero_()
    for t in allowed:
        bitmask[0, t // 32] |= 1 << (t % 32)

    def run(mask):
        extras = SamplingPlanner(4, V).prepare(chunks)
        header, plan = build_plan(0, 1, chunks, 16, 0, None, extras, mask)
        view = PlanView(header.tolist(), torch.from_numpy(plan))
        return LastStageSampler(V, torch.device("cpu"))(logits.clone(), view)

    ids, table = run(None)
    ids_m, table_m = run((np.asarray([1], dtype=np.int32), bitmask.numpy()))
    assert ids_m[1].item() in allowed and ids[1].item() not in allowed
    assert torch.equal(ids[[0, 2]], ids_m[[0, 2]]) and torch.equal(table[[0, 2]], table_m[[0, 2]])


@pytest.mark.gpu
def test_cuda_structured_outputs_validate_beside_plain_rows(ckpt, bonus):
    """On CUDA (bf16, xgrammar's mask kernel, the fused sampler): every JSON output validates, on 1
    stage and on 2 GPUs when there are two, beside a plain row (bf16 matmuls are not batch-invariant,
    so its tokens are not compared; the CPU tests and test_mask_touches_only_its_rows do that)."""
    import torch
    names = list(SCHEMAS)[:8]
    plain = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    for stages in (1, 2)[:torch.cuda.device_count()]:
        with LLM(str(ckpt), stages=stages, device="cuda", dtype="bfloat16", verbose=False) as llm:
            params = [structured(seed=i, bias=bonus, json=SCHEMAS[n]) for i, n in enumerate(names)] + [plain]
            outs = llm.generate([PROMPTS[i % 3] for i in range(len(names))] + PROMPTS[:1], params)
            for n, o in zip(names, outs):
                assert o.finish_reason == "stop", (n, o.text)
                jsonschema.validate(json.loads(o.text), SCHEMAS[n])
            assert len(outs[-1].token_ids) == 16
            assert llm.stats()["scheduler"]["grammar_matchers"] == 0
