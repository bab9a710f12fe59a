"""engine.structured: params validation, compile errors and cache, the bitmask against naive maths and
against the matcher's own accept_token, and 20 JSON schemas whose sampled outputs always validate."""
import json
import re
import sys

import pytest
import torch

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from engine.structured import (GrammarCompiler, StructuredMatcher, StructuredOutputsParams, allocate_bitmask,
                               allowed_mask, apply_token_bitmask)
from tests.structured_util import (DEEP, INT, MODEL_VOCAB, SCHEMAS, STOP_ID, STR, TOKENIZER_VOCAB, RandomModel,  # noqa: F401
                                   compiler, generate, tok, tok_path, write_tiny_tokenizer)  # (fixtures)



def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


# ---- params --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one.*got none"),
    ({"regex": "a", "choice": ["a"]}, "got regex, choice"),
    ({"json": "{nope"}, "json is not valid JSON"),
    ({"json": 3}, "JSON schema object"),
    ({"json": "[1]"}, "JSON schema object"),
    ({"choice": []}, "non-empty list"),
    ({"choice": ["a", 1]}, r"choice\[1\]"),
    ({"choice": ["a", ""]}, r"choice\[1\]"),
    ({"regex": ""}, "regex must be a non-empty string"),
    ({"grammar": 5}, "grammar must be a non-empty string"),
    ({"json_object": False}, "got none"),
    ({"json_object": "yes"}, "json_object must be true"),
    ({"structural_tag": "[]"}, "structural_tag must be a JSON object"),
    ({"regex": "a" * (1 << 20 + 1)}, "over the limit"),
    ({"regex": "a", "disable_any_whitespace": 1}, "disable_any_whitespace must be a bool"),
    ({"json": '{"items": ' * 65 + "{}" + "}" * 65}, "nested deeper than 64"),
    ({"json": '{"items": ' * 5000 + "{}" + "}" * 5000}, "nested deeper than 64"),
    ({"json": DEEP}, "nested deeper than 64"),
    ({"structural_tag": "[" * 5000 + "]" * 5000}, "structural_tag is nested deeper"),
])
def test_params_rejected_with_the_key_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StructuredOutputsParams(**kwargs)


def test_params_from_dict_and_cache_key():
    with pytest.raises(ValueError, match="unknown key.*guided_json"):
        StructuredOutputsParams.from_dict({"guided_json": {}})
    a = StructuredOutputsParams.from_dict({"json": {"type": "object", "properties": {"a": INT, "b": STR}}})
    b = StructuredOutputsParams(json='{"properties": {"b": {"type": "string"}, "a": {"type": "integer"}}, '
                                     '"type": "object"}')
    assert a.json == b.json and a.kind == "json" and a.cache_key() == b.cache_key()
    assert a.cache_key() != StructuredOutputsParams(json=a.json, disable_any_whitespace=True).cache_key()


# ---- lazy import and compile errors --------------------------------------------------------------
def test_runs_without_xgrammar_until_structure_is_asked(tok_path, monkeypatch):
    """Importing the engine and the structured package never imports xgrammar; asking for a grammar
    without it is an ImportError naming the package."""
    import subprocess
    code = ("import sys; import engine.llm, engine.structured, engine.server.tool_parser, engine.server.reasoning; "
            "assert 'xgrammar' not in sys.modules, 'imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setitem(sys.modules, "xgrammar", None)
    with pytest.raises(ImportError, match="'xgrammar' package"):
        GrammarCompiler(tok_path, MODEL_VOCAB, [STOP_ID])


@pytest.mark.parametrize("kwargs, match", [
    ({"json": {"type": "strin"}}, 'json: cannot compile: Unsupported type "strin"'),
    ({"json": {"type": "integer", "minimum": 5, "maximum": 1}}, "minimum greater than maximum"),
    ({"json": {"properties": {"a": {"$ref": "#/$defs/missing"}}}}, "missing"),
    ({"regex": "a(b"}, "regex: cannot compile: .*parenthesis"),
    ({"grammar": "root ::= undefined_rule"}, 'grammar: cannot compile: .*"undefined_rule" is not defined'),
    ({"structural_tag": '{"type": "structural_tag", "format": {"type": "bogus"}}'}, "bogus"),
])
def test_uncompilable_is_a_value_error_naming_the_problem(compiler, kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        compiler.compile(StructuredOutputsParams(**kwargs))
    assert "/project/" not in str(e.value) and ".cc:" not in str(e.value)


@pytest.mark.parametrize("limits", [{"maxLength": 5}, {"minLength": 2, "maxLength": 5}, {"minLength": 1}])
def test_length_limited_strings_refuse_control_characters(compiler, limits):
    """Raw control characters are invalid inside JSON strings; xgrammar lets them into length-limited
    strings unless the limits are rewritten as a pattern."""
    schema = {"type": "object", "properties": {"s": {"type": "string", **limits}}}
    g = compiler.compile(StructuredOutputsParams(json=schema))
    for bad in ("\t", "\x04", "\x1f", "\x00"):
        assert not StructuredMatcher(g)._m.accept_string('{"s": "a' + bad + 'c"}'), repr(bad)
    assert StructuredMatcher(g)._m.accept_string('{"s": "aé日"}')


def test_compiled_grammars_are_cached_by_content(compiler):
    before = compiler.compiles
    schema = {"type": "object", "properties": {"p": INT, "q": STR}, "required": ["p"]}
    g1 = compiler.compile(StructuredOutputsParams(json=schema))
    g2 = compiler.compile(StructuredOutputsParams(json=json.dumps(dict(reversed(schema.items())))))
    assert g1 is g2 and compiler.compiles == before + 1
    compiler.compile(StructuredOutputsParams(json=schema, disable_any_whitespace=True))
    assert compiler.compiles == before + 2


def test_cache_is_bounded(tok_path):
    c = GrammarCompiler(tok_path, MODEL_VOCAB, [STOP_ID], cache_size=2)
    p = [StructuredOutputsParams(regex=r) for r in ("a+", "b+", "c+")]
    first = c.compile(p[0])
    c.compile(p[1]), c.compile(p[2])
    assert c.compile(p[0]) is not first and c.compiles == 4


# ---- the bitmask ---------------------------------------------------------------------------------
@pytest.mark.parametrize("V", [1, 31, 32, 33, 520])
def test_apply_token_bitmask_equals_naive_loop(V):
    g = torch.Generator().manual_seed(V)
    R, W = 5, (V + 31) // 32
    bitmask = torch.randint(-2**31, 2**31, (R, W), generator=g, dtype=torch.int64).to(torch.int32)
    bitmask[2] = -1  # a row without structure
    logits = torch.randn(R, V, generator=g)
    want = logits.clone()
    for r in range(R):
        for t in range(V):
            if not (int(bitmask[r, t // 32]) >> (t % 32)) & 1:
                want[r, t] = float("-inf")
    got = apply_token_bitmask(logits.clone(), bitmask)
    assert torch.equal(got, want)
    assert torch.equal(got[2], logits[2])


def test_apply_token_bitmask_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"int32 \[2, 2\]"):
        apply_token_bitmask(torch.zeros(2, 33), torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        apply_token_bitmask(torch.zeros(2, 33), torch.zeros(2, 2, dtype=torch.int64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_apply_token_bitmask_cuda_equals_cpu():
    g = torch.Generator().manual_seed(0)
    V = 151936
    bitmask = torch.randint(-2**31, 2**31, (64, (V + 31) // 32), generator=g, dtype=torch.int64).to(torch.int32)
    logits = torch.randn(64, V, generator=g)
    want = apply_token_bitmask(logits.clone(), bitmask)
    got = apply_token_bitmask(logits.cuda().bfloat16(), bitmask.cuda())
    assert torch.equal(torch.isinf(got.float().cpu()), torch.isinf(want))


REFERENCE_GRAMMARS = [
    {"json": SCHEMAS["anyOf"]},
    {"json": SCHEMAS["array_of_obj"], "disable_any_whitespace": True},
    {"regex": r"(ab|c)+[0-9]{2}"},
    {"choice": ["yes", "no", "maybe so"]},
    {"grammar": 'root ::= "(" item ("," item)* ")"\nitem ::= [a-z]+ | root'},
    {"json_object": True},
]


@pytest.mark.parametrize("spec", REFERENCE_GRAMMARS, ids=lambda s: next(iter(s)))
def test_mask_agrees_with_accept_token_for_every_token(compiler, tok, spec):
    """At every step of a sampled output, token t's bit is set iff a fork of the matcher accepts t:
    a sampled token is always allowed and an allowed token is never masked. Special and padding ids
    (past the tokenizer) are never allowed; the stop token only where the grammar may end."""
    compiled = compiler.compile(StructuredOutputsParams(**spec))
    m = StructuredMatcher(compiled)
    model = RandomModel(tok, seed=7)
    bitmask = allocate_bitmask(1, MODEL_VOCAB)
    for step in range(200):
        m.fill_bitmask(bitmask, 0)
        allowed = allowed_mask(bitmask, MODEL_VOCAB)[0].tolist()
        for t in range(MODEL_VOCAB):
            assert m._m.fork().accept_token(t) == allowed[t], (step, t)
        assert not any(allowed[TOKENIZER_VOCAB:]) and not allowed[0] and not allowed[1]
        token = model.sample(apply_token_bitmask(model.logits(), bitmask))[0]
        assert allowed[token] and m.accept(token)
        if m.is_terminated:
            break
    assert m.is_terminated


# ---- generation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_sampled_output_validates(compiler, tok, name):
    schema = SCHEMAS[name]
    jsonschema.Draft202012Validator.check_schema(schema)
    for seed, compact in [(0, False), (1, False), (2, True)]:
        m = StructuredMatcher(compiler.compile(StructuredOutputsParams(json=schema, disable_any_whitespace=compact)))
        text = decode(tok, generate(m, RandomModel(tok, seed)))
        jsonschema.validate(json.loads(text), schema)
        if compact:  # whitespace outside strings only as json.dumps puts it: ", " and ": "
            skeleton = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
            assert not re.search(r"\s", re.sub(r"[,:] ", "", skeleton)), text


def test_regex_choice_grammar_and_json_object_outputs(compiler, tok):
    for seed in range(3):
        def run(**kw) -> str:
            return decode(tok, generate(StructuredMatcher(compiler.compile(StructuredOutputsParams(**kw))),
                                        RandomModel(tok, seed)))
        assert re.fullmatch(r"[A-Z][a-z]{1,6} [0-9]{1,3}", run(regex=r"[A-Z][a-z]{1,6} [0-9]{1,3}"))
        assert run(choice=["alpha", 'be"ta', "gamma ray"]) in ("alpha", 'be"ta', "gamma ray")
        assert re.fullmatch(r"(x|yz)+;", run(grammar='root ::= ("x" | "yz")+ ";"'))
        assert isinstance(json.loads(run(json_object=True)), dict)


# ---- matcher state -------------------------------------------------------------------------------
def _masks(m: StructuredMatcher, tokens: list[int]) -> list[torch.Tensor]:
    out = []
    for t in tokens:
        b = allocate_bitmask(1, MODEL_VOCAB)
        m.fill_bitmask(b, 0)
        out.append(b)
        assert m.accept(t)
    return out


def test_rollback_and_reset_replay_the_same_masks(compiler, tok):
    compiled = compiler.compile(StructuredOutputsParams(json=SCHEMAS["nested"]))
    ids = generate(StructuredMatcher(compiled), RandomModel(tok, 3)) + [STOP_ID]
    m = StructuredMatcher(compiled)
    want = _masks(m, ids)
    assert m.is_terminated and m.num_accepted == len(ids)
    assert not m.accept(ids[0])  # nothing after the stop token
    m.rollback(5)  # e.g. a speculative step cut short by a stop string
    assert not m.is_terminated and m.num_accepted == len(ids) - 5
    assert all(torch.equal(a, b) for a, b in zip(_masks(m, ids[-5:]), want[-5:]))
    m.reset()
    assert all(torch.equal(a, b) for a, b in zip(_masks(m, ids), want))
    with pytest.raises(ValueError, match="rollback"):
        m.rollback(len(ids) + 1)


def test_refused_token_leaves_state_unchanged(compiler):
    m = StructuredMatcher(compiler.compile(StructuredOutputsParams(choice=["ab"])))
    b0 = allocate_bitmask(1, MODEL_VOCAB)
    m.fill_bitmask(b0, 0)
    refused = int((~allowed_mask(b0, MODEL_VOCAB)[0]).nonzero()[3])
    assert not m.accept(refused) and not m.accept(STOP_ID) and m.num_accepted == 0
    b1 = allocate_bitmask(1, MODEL_VOCAB)
    m.fill_bitmask(b1, 0)
    assert torch.equal(b0, b1)


def test_rows_of_one_batch_are_independent(compiler, tok):
    """Two requests with different grammars plus one without: each row only ever holds its own mask."""
    ms = [StructuredMatcher(compiler.compile(StructuredOutputsParams(json=SCHEMAS["flat"]))),
          StructuredMatcher(compiler.compile(StructuredOutputsParams(regex="[0-9]+!"))), None]
    model = RandomModel(tok, 11)
    outs: list[list[int]] = [[], [], []]
    for _ in range(300):
        bitmask = allocate_bitmask(3, MODEL_VOCAB)
        for r, m in enumerate(ms):
            if m is not None and not m.is_terminated:
                m.fill_bitmask(bitmask, r)
        assert (bitmask[2] == -1).all()
        tokens = model.sample(apply_token_bitmask(model.logits(3), bitmask))
        for r, m in enumerate(ms):
            if m is not None and not m.is_terminated:
                assert m.accept(tokens[r])
                if not m.is_terminated:
                    outs[r].append(tokens[r])
        if all(m is None or m.is_terminated for m in ms):
            break
    jsonschema.validate(json.loads(decode(tok, outs[0])), SCHEMAS["flat"])
    assert re.fullmatch("[0-9]+!", decode(tok, outs[1]))


def test_batched_fill_equals_one_row_at_a_time(compiler, tok):
    """fill_bitmasks (xgrammar's threads, reasoning rows all ones) writes what each matcher's own
    fill_bitmask writes, at every step of several grammars in different states."""
    from engine.structured.matcher import fill_bitmasks
    think = tok.token_to_id("</think>")
    specs = [dict(json=SCHEMAS["nested"]), dict(regex="[a-c]{3,9}"), dict(json=SCHEMAS["anyOf"]),
             dict(choice=["alpha", "beta"])]
    ms = [StructuredMatcher(compiler.compile(StructuredOutputsParams(**k)), think if i == 3 else None)
          for i, k in enumerate(specs)]
    model = RandomModel(tok, 5)
    for step in range(40):
        live = [m for m in ms if not m.is_terminated]
        if not live:
            break
        got, want = allocate_bitmask(len(live), MODEL_VOCAB), allocate_bitmask(len(live), MODEL_VOCAB)
        fill_bitmasks(live, got)
        for r, m in enumerate(live):
            m.fill_bitmask(want, r)
        assert torch.equal(got, want), step
        tokens = model.sample(apply_token_bitmask(model.logits(len(live)), want))
        for m, t in zip(live, tokens):
            assert m.accept(think if m.in_reasoning and step == 2 else t)
    assert not ms[3].in_reasoning  # the reasoning row went through both phases


def test_reasoning_aware_matcher_is_free_until_think_end(compiler, tok):
    think_end = tok.token_to_id("</think>")
    compiled = compiler.compile(StructuredOutputsParams(json=SCHEMAS["flat"]))
    m = StructuredMatcher(compiled, reasoning_end_id=think_end)
    b = allocate_bitmask(1, MODEL_VOCAB)
    for t in (5, 77, 300, STOP_ID - 1):  # anything goes while thinking, even text the grammar forbids
        m.fill_bitmask(b, 0)
        assert (b == -1).all() and m.accept(t) and m.in_reasoning
    ids = generate(m, RandomModel(tok, 5), forced={0: 9, 1: think_end})
    assert ids[:2] == [9, think_end] and not m.in_reasoning
    jsonschema.validate(json.loads(decode(tok, ids[2:])), SCHEMAS["flat"])
    n_grammar = len(ids) - 2 + 1  # the generated answer and its stop token
    m.rollback(n_grammar)
    assert not m.in_reasoning and not m.is_terminated
    m.rollback(1)  # back over </think>: thinking again, all allowed
    m.fill_bitmask(b, 0)
    assert m.in_reasoning and (b == -1).all()
    m.reset()
    assert m.in_reasoning and m.num_accepted == 0


def test_concurrent_compiles_from_threads(tok_path, tok):
    """Request handlers compile at once: every grammar works and each distinct one is cached once."""
    from concurrent.futures import ThreadPoolExecutor
    c = GrammarCompiler(tok_path, MODEL_VOCAB, [STOP_ID])
    specs = [StructuredOutputsParams(json=SCHEMAS[n]) for n in ("flat", "nested", "enum", "flat", "nested", "deep")]
    with ThreadPoolExecutor(4) as pool:
        grammars = list(pool.map(c.compile, specs))
    for spec, g in zip(specs, grammars):
        text = decode(tok, generate(StructuredMatcher(g), RandomModel(tok, 0)))
        jsonschema.validate(json.loads(text), spec.json)
    assert c.compile(specs[0]) is c.compile(specs[3]) and len(c._cache) == 4
