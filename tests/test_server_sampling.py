"""The sampling API through the server (tiny preset, CPU, 2 stages) with the official `openai` client:
n (choices indexed, seeded seed + i, streamed, counted in usage), penalties, logit_bias, min_tokens,
stop strings, seed, logprobs of both endpoints (against the engine and transformers), echo,
cache_salt with the prefix-cache metrics and POST /reset_prefix_cache, and lm-evaluation-harness's
`local-completions` scoring a multiple-choice task to the same accuracy as transformers' logits on
the same checkpoint."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from loader.presets import preset_config
from loader.writer import write_checkpoint
from server_util import MODEL_NAME, Server, start_server

pytestmark = pytest.mark.slow
CHAT = [{"role": "user", "content": "The river ran past the mill?"}]
# thinking off: the whole output is `content` (with it on, text before `</think>` is reasoning_content)
NOTHINK = {"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}}
PROMPT = "The miller's daughter watched the water"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny_sampling"), preset_config("tiny"), seed=7)


@pytest.fixture(scope="module")
def server_proc(tiny, tmp_path_factory):
    with start_server(tiny, tmp_path_factory.mktemp("log"), "--stages", "2") as s:
        yield s


@pytest.fixture(scope="module")
def ref_llm(tiny, server_proc):
    """The engine itself (1 stage), loaded while the server loads."""
    from engine import LLM
    with LLM(str(tiny), stages=1, verbose=False, max_model_len=256) as llm:
        yield llm


@pytest.fixture(scope="module")
def server(server_proc) -> Server:
    return server_proc.wait_ready()


@pytest.fixture(scope="module")
def hf(tiny):
    from hf_ref import load_hf
    return load_hf(tiny)


def _hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits: row i is the distribution of token i + 1. [T, V]"""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)


# ---- n, seed ---------------------------------------------------------------------------------------
def test_n_choices_are_indexed_seeded_streamed_and_counted(server):
    c = server.client()
    kw = dict(model=MODEL_NAME, max_tokens=6, temperature=1.0, extra_body={"ignore_eos": True})
    r = c.completions.create(prompt=[PROMPT, "Hello"], n=3, seed=11, **kw)
    assert [ch.index for ch in r.choices] == list(range(6))
    # choice prompt x n + j is sample j of that prompt: seeded seed + j, as one n=1 request with that seed
    for p, prompt in enumerate([PROMPT, "Hello"]):
        for j in range(3):
            alone = c.completions.create(prompt=prompt, seed=11 + j, **kw).choices[0].text
            assert r.choices[p * 3 + j].text == alone
    assert len({ch.text for ch in r.choices[:3]}) > 1
    ones = [c.completions.create(prompt=p, **kw).usage.prompt_tokens for p in (PROMPT, "Hello")]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (sum(ones), 36)  # each prompt once, every choice
    # streamed: every index, each choice's text equal to the whole response's
    chunks = list(c.completions.create(prompt=[PROMPT, "Hello"], n=3, seed=11, stream=True,
                                       stream_options={"include_usage": True}, **kw))
    texts = {}
    for ch in chunks[:-1]:
        texts[ch.choices[0].index] = texts.get(ch.choices[0].index, "") + ch.choices[0].text
    assert texts == {i: ch.text for i, ch in enumerate(r.choices)}
    assert chunks[-1].usage.completion_tokens == 36 and chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    # chat: n choices, seeded the same way; streamed with a role delta for each
    ckw = dict(model=MODEL_NAME, messages=CHAT, max_tokens=5, temperature=1.0, extra_body=NOTHINK)
    rc = c.chat.completions.create(n=2, seed=4, **ckw)
    assert [ch.index for ch in rc.choices] == [0, 1] and rc.usage.completion_tokens == 10
    assert rc.choices[1].message.content == c.chat.completions.create(seed=5, **ckw).choices[0].message.content
    assert rc.usage.prompt_tokens == c.chat.completions.create(seed=5, **ckw).usage.prompt_tokens
    got, roles = {0: "", 1: ""}, set()
    for ch in c.chat.completions.create(n=2, seed=4, stream=True, **ckw):
        d = ch.choices[0]
        roles |= {d.index} if d.delta.role == "assistant" else set()
        got[d.index] += d.delta.content or ""
    assert roles == {0, 1} and got == {i: ch.message.content for i, ch in enumerate(rc.choices)}


def test_seed_repeats_in_chat_and_differs_between_seeds(server):
    c = server.client()
    kw = dict(model=MODEL_NAME, messages=CHAT, max_tokens=8, temperature=1.0, extra_body=NOTHINK)
    a, b, other = (c.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (3, 3, 4))
    assert a == b and a != other


def test_abort_midway_frees_every_choice(server):
    before = server.metrics()
    total = before["moepipe:kv_blocks_total"]
    body = {"model": MODEL_NAME, "prompt": "The traveller told them", "max_tokens": 200, "n": 4, "temperature": 1,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert any(next(lines).startswith("data: {") for _ in range(8))
        assert server.metrics()["moepipe:num_requests_running"] == 4
    deadline = time.monotonic() + 20
    while (m := server.metrics())["moepipe:kv_blocks_free"] != total or m["moepipe:num_requests_running"]:
        assert time.monotonic() < deadline, m
        time.sleep(0.1)
    aborted = 'moepipe:request_success_total{finished_reason="abort"}'
    assert m.get(aborted, 0) - before.get(aborted, 0) == 4


# ---- penalties, bias, min_tokens, stop ------------------------------------------------------------
def test_penalties_equal_the_engine_and_change_the_text(server, ref_llm):
    from engine import SamplingParams
    c = server.client()
    pen = dict(presence_penalty=1.5, frequency_penalty=1.0)
    plain = c.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0,
                                 extra_body={"ignore_eos": True}).choices[0].text
    for extra in ({**pen}, {"repetition_penalty": 1.8}, {**pen, "repetition_penalty": 1.3}):
        want = ref_llm.generate([PROMPT], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, **extra))[0]
        got = c.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0,
                                   extra_body={"ignore_eos": True, **extra}).choices[0].text
        assert got == want.text and got != plain, extra
    chat = c.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=16, temperature=0, **pen,
                                     extra_body={**NOTHINK, "repetition_penalty": 1.8})
    want = ref_llm.chat(CHAT, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, repetition_penalty=1.8,
                                             **pen), chat_template_kwargs=NOTHINK["chat_template_kwargs"])[0]
    assert chat.choices[0].message.content == want.text


def test_logit_bias_string_keys_and_min_tokens(server, ref_llm):
    from engine import SamplingParams
    c = server.client()
    tok = ref_llm.tokenizer
    target = tok.encode(" river")[0]
    r = c.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0,
                             logit_bias={str(target): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode([target] * 4)
    r = c.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=3, temperature=0.7, seed=1,
                                  logit_bias={str(target): 100}, extra_body=NOTHINK)
    assert r.choices[0].message.content == tok.decode([target] * 3)
    # the first greedy token as the only stop token: alone it ends the request at once; min_tokens holds it off
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    stop_id = ref_llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))[0].token_ids[0]
    r = c.completions.create(extra_body={"stop_token_ids": [stop_id]}, **kw)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("stop", 1)
    r = c.completions.create(extra_body={"stop_token_ids": [stop_id], "min_tokens": 5}, **kw)
    assert r.usage.completion_tokens >= 5


def test_stop_strings_min_tokens_and_include(server):
    c = server.client()
    kw = dict(model=MODEL_NAME, prompt="Hello, world! How are", max_tokens=16, temperature=0)
    free = c.completions.create(extra_body={"ignore_eos": True}, **kw).choices[0].text
    clean = [i for i in range(len(free) - 1) if "\ufffd" not in free[i:i + 2]]  # not completed by the last flush
    stop = free[clean[len(clean) // 2]:clean[len(clean) // 2] + 2]
    cut = free.index(stop)
    r = c.completions.create(stop=stop, extra_body={"ignore_eos": True, "include_stop_str_in_output": True}, **kw)
    assert r.choices[0].text == free[:cut + len(stop)] and r.choices[0].model_extra["stop_reason"] == stop
    streamed = c.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=16, temperature=0, stream=True,
                                         extra_body=NOTHINK)
    chat_free = "".join(ch.choices[0].delta.content or "" for ch in streamed)
    assert len(chat_free) >= 4
    cstop = chat_free[len(chat_free) // 2:len(chat_free) // 2 + 2]
    r = c.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=16, temperature=0, stop=[cstop],
                                  extra_body=NOTHINK)
    assert r.choices[0].message.content == chat_free[:chat_free.index(cstop)]
    assert r.choices[0].finish_reason == "stop"
    # min_tokens past the stop string's place: the stop string is not searched before that many tokens
    early = c.completions.create(stop=stop, extra_body={"ignore_eos": True}, **kw).usage.completion_tokens
    r = c.completions.create(stop=stop, extra_body={"ignore_eos": True, "min_tokens": 16}, **kw)
    assert early < 16 and r.usage.completion_tokens == 16 and r.choices[0].text.startswith(free[:cut + len(stop)])


# ---- logprobs -------------------------------------------------------------------------------------
def _token_text(tok, t: int) -> str:
    """A token's text as the tokenizers library decodes it alone (special tokens shown)."""
    return tok._tok.decode([t], skip_special_tokens=False)


def _top(d: dict, k: int) -> list[tuple[int, float]]:
    """The top k of an engine logprob dict {token: Logprob(logprob, rank)}, best first."""
    return sorted(((t, lp.logprob) for t, lp in d.items() if lp.rank <= k), key=lambda x: -x[1])


def test_token_bytes_are_exact_across_split_characters(tiny):
    """Tokens that each hold part of a character: each token's bytes joined give the text's bytes."""
    from loader.model_files import load_tokenizer
    from engine.server.logprobs import TokenStrings
    tok = load_tokenizer(tiny)
    strings = TokenStrings(tok)
    text = "Hello, 日本語 wörld! 🙂 <|im_end|>"
    ids = tok._tok.encode(text, add_special_tokens=False).ids
    assert any("\ufffd" in strings.text(t) for t in ids)  # some token holds part of a character
    assert b"".join(bytes(strings.bytes(t)) for t in ids) == text.encode()
    assert strings.text(ids[-1]) == "<|im_end|>"


def test_chat_logprobs_equal_the_engine_streamed_and_not(server, ref_llm):
    from engine import SamplingParams
    want = ref_llm.chat(CHAT, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3),
                        chat_template_kwargs=NOTHINK["chat_template_kwargs"])[0]
    c = server.client()
    kw = dict(model=MODEL_NAME, messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
              extra_body=NOTHINK)
    content = c.chat.completions.create(**kw).choices[0].logprobs.content
    tok = ref_llm.tokenizer
    assert len(content) == 6
    for entry, tid, d in zip(content, want.token_ids, want.outputs[0].logprobs):
        assert entry.token == _token_text(tok, tid) == bytes(entry.bytes).decode("utf-8", errors="replace")
        assert entry.logprob == pytest.approx(d[tid].logprob, abs=1e-4)
        top = _top(d, 3)
        assert [x.logprob for x in entry.top_logprobs] == pytest.approx([v for _, v in top], abs=1e-4)
        assert [x.token for x in entry.top_logprobs] == [_token_text(tok, t) for t, _ in top]
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)  # greedy: the best
    # the bytes are exact: joined, they are the text's (special tokens, which the text skips, left out)
    special = set(tok._tok.get_added_tokens_decoder())
    joined = b"".join(bytes(e.bytes) for e, t in zip(content, want.token_ids) if t not in special)
    assert joined.decode("utf-8", errors="replace") == want.text
    streamed = [x for ch in c.chat.completions.create(stream=True, **kw) if ch.choices and ch.choices[0].logprobs
                for x in ch.choices[0].logprobs.content]
    assert [(x.token, x.logprob) for x in streamed] == [(x.token, x.logprob) for x in content]
    # logprobs without top_logprobs: the token's own, no alternatives
    bare = c.chat.completions.create(**{**kw, "top_logprobs": None}).choices[0].logprobs.content
    assert [x.top_logprobs for x in bare] == [[]] * 6 and bare[0].logprob == content[0].logprob


def test_completions_logprobs_and_echo_equal_transformers(server, hf, ref_llm):
    from engine import SamplingParams
    c = server.client()
    r = c.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True,
                             extra_body={"ignore_eos": True})
    ch = r.choices[0]
    gen = ref_llm.generate([PROMPT], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    ids = gen.prompt_token_ids + gen.token_ids
    tok = ref_llm.tokenizer
    assert ch.text == PROMPT + gen.text and len(ch.logprobs.tokens) == len(ids)
    lp = _hf_logprobs(hf, ids)
    want = [None] + [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert ch.logprobs.token_logprobs[0] is None and ch.logprobs.top_logprobs[0] is None
    assert ch.logprobs.token_logprobs[1:] == pytest.approx(want[1:], abs=1e-4)
    for i in range(1, len(ids)):
        vals, top = lp[i - 1].topk(2)
        want_top = {}  # keyed by text: of two tokens of one text (two partial characters), the better
        for t, v in [*zip(top.tolist(), vals.tolist()), (ids[i], lp[i - 1, ids[i]].item())]:
            want_top.setdefault(_token_text(tok, t), v)
        assert ch.logprobs.top_logprobs[i] == pytest.approx(want_top, abs=1e-4)
    assert ch.logprobs.tokens == [_token_text(tok, t) for t in ids]
    offsets = [0]
    for t in ch.logprobs.tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert ch.logprobs.text_offset == offsets
    # streamed: the chunks' lists joined are the whole response's
    joined = {"tokens": [], "token_logprobs": [], "text_offset": []}
    text = ""
    for chunk in c.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2,
                                      echo=True, stream=True, extra_body={"ignore_eos": True}):
        text += chunk.choices[0].text
        for k in joined:
            joined[k] += getattr(chunk.choices[0].logprobs, k)
    assert text == ch.text and joined == {k: getattr(ch.logprobs, k) for k in joined}
    # without echo: the generated tokens only; logprobs=0 still gives the token's own
    r0 = c.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=0,
                              extra_body={"ignore_eos": True}).choices[0]
    assert r0.logprobs.token_logprobs == pytest.approx(want[-3:], abs=1e-4)
    assert [len(d) for d in r0.logprobs.top_logprobs] == [1, 1, 1] and r0.logprobs.text_offset[0] == 0


def test_processed_logprobs_per_request(server, ref_llm):
    from engine import SamplingParams
    c = server.client()
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0.5, seed=2, logprobs=1)
    raw = c.completions.create(extra_body={"ignore_eos": True}, **kw).choices[0].logprobs.token_logprobs
    proc = c.completions.create(extra_body={"ignore_eos": True, "logprobs_mode": "processed_logprobs"},
                                **kw).choices[0].logprobs.token_logprobs
    want = ref_llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0.5, seed=2, ignore_eos=True, logprobs=1,
                                                     logprobs_mode="processed_logprobs"))[0].outputs[0]
    assert proc == pytest.approx([d[t].logprob for t, d in zip(want.token_ids, want.logprobs)], abs=1e-4)
    assert all(abs(a - b) > 1e-3 for a, b in zip(raw, proc))  # temperature 0.5 sharpens the distribution


def test_prompt_logprobs_extra(server, hf, ref_llm):
    r = server.post("/v1/completions", {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 1, "temperature": 0,
                                        "prompt_logprobs": 1})
    got = r.json()["choices"][0]["prompt_logprobs"]
    ids = ref_llm.tokenizer.encode(PROMPT)
    lp = _hf_logprobs(hf, ids)
    assert got[0] is None and len(got) == len(ids)
    for i in range(1, len(ids)):
        assert got[i][str(ids[i])]["logprob"] == pytest.approx(lp[i - 1, ids[i]].item(), abs=1e-4)
        best = lp[i - 1].argmax().item()
        assert got[i][str(best)]["rank"] == 1
    chat = server.post("/v1/chat/completions", {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 1,
                                                "prompt_logprobs": 0}).json()
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"] and chat["prompt_logprobs"][0] is None
    assert all(len(d) == 1 for d in chat["prompt_logprobs"][1:])  # k = 0: the prompt token's own


BAD = [
    ({"prompt": "hi", "logprobs": 21}, "/v1/completions", "logprobs"),
    ({"prompt": "hi", "logit_bias": {"512": 1}}, "/v1/completions", "logit_bias: token id 512 is not in the vocab"),
    ({"prompt": "hi", "max_tokens": 3, "min_tokens": 4}, "/v1/completions", "min_tokens"),
    ({"prompt": "hi", "prompt_logprobs": 1, "stream": True}, "/v1/completions", "prompt_logprobs"),
    ({"prompt": ["a"] * 9, "n": 128}, "/v1/completions", "n x prompts = 1152"),
    ({"prompt": "hi", "n": 0}, "/v1/completions", "n"),
    ({"prompt": ["a"] * 8, "n": 128, "max_tokens": 200, "logprobs": 20}, "/v1/completions",
     "is 4300800 values, more than the 4194304"),
    ({"prompt": "hi", "presence_penalty": 2.5}, "/v1/completions", "presence_penalty"),
    ({"prompt": "hi", "repetition_penalty": 0}, "/v1/completions", "repetition_penalty"),
    ({"prompt": "hi", "logprobs_mode": "softmax"}, "/v1/completions", "logprobs_mode"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "/v1/chat/completions", "top_logprobs"),
    ({"messages": CHAT, "top_logprobs": 2}, "/v1/chat/completions", "requires logprobs"),
    ({"messages": CHAT, "frequency_penalty": -3}, "/v1/chat/completions", "frequency_penalty"),
    ({"messages": CHAT, "max_tokens": 2, "min_tokens": 3}, "/v1/chat/completions", "min_tokens"),
]


def test_bad_sampling_fields_get_400_naming_them(server):
    for body, path, needle in BAD:
        r = server.post(path, {"model": MODEL_NAME, **body})
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert needle in err["message"] and err["type"] == "invalid_request_error", (body, err)
    assert httpx.get(server.url + "/health").status_code == 200


# ---- prefix cache ---------------------------------------------------------------------------------
def test_cache_salt_metrics_and_reset(server):
    c = server.client()
    prompt = " ".join(f"word{i}" for i in range(40))  # several full 16-token blocks
    hits = 'moepipe:prefix_cache_hits_total'

    def hit_tokens(**extra) -> float:
        before = server.metrics()
        r = c.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1, temperature=0, extra_body=extra)
        after = server.metrics()
        assert after["moepipe:prefix_cache_queries_total"] - before["moepipe:prefix_cache_queries_total"] == \
            r.usage.prompt_tokens
        return after[hits] - before[hits]

    hit_tokens()  # computed (or found) once
    assert hit_tokens() >= 32  # the same prompt again: its full blocks come from the cache
    assert hit_tokens(cache_salt="tenant-a") == 0  # another salt shares nothing
    assert hit_tokens(cache_salt="tenant-a") >= 32
    r = server.post("/reset_prefix_cache", "")
    assert r.status_code == 200 and r.json() == {"success": True}
    assert hit_tokens() == 0 and hit_tokens(cache_salt="tenant-a") == 0
    assert server.post("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "cache_salt": ""}).status_code == 400


# ---- lm-evaluation-harness ------------------------------------------------------------------------
QUESTIONS = [("The river ran past the", ["mill", "moon", "cat", "house"], 0),
             ("She carried bread to the", ["market", "river", "sky"], 1),
             ("Hello, world! How are", ["you", "they", "we", "it"], 0),
             ("The wheel turned and the", ["water", "stone", "miller"], 2),
             ("Once upon a time the", ["king", "queen", "traveller", "daughter"], 3),
             ("Every morning the", ["sun rose", "bird sang", "bell rang"], 1),
             ("The traveller told them about", ["distant cities", "the weather", "bread"], 0),
             ("At night the mill was", ["quiet", "loud", "gone"], 0)]
TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def _hf_loglikelihoods(hf, tok, context: str, choices: list[str]) -> list[float]:
    """log P(" " + choice | context) as lm-eval splits it: the whole text encoded, the context's
    tokens cut off its front."""
    ctx = tok.encode(context)
    out = []
    for choice in choices:
        whole = tok.encode(context + " " + choice)
        lp = _hf_logprobs(hf, whole)
        out.append(sum(lp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
    return out


def test_lm_eval_local_completions_accuracy_equals_transformers(server, hf, ref_llm, tiny, tmp_path):
    pytest.importorskip("lm_eval")
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    model_args = (f"model={MODEL_NAME},base_url={server.url}/v1/completions,tokenizer={tiny},"
                  "tokenizer_backend=huggingface,tokenized_requests=True,max_retries=1")
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
                           model_args, "--tasks", "tiny_mc", "--batch_size", "4", "--include_path", str(tmp_path / "tasks"), "--output_path",
                           str(tmp_path / "out"), "--log_samples"], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    lines = next((tmp_path / "out").rglob("samples_tiny_mc_*.jsonl")).read_text().splitlines()
    samples = [json.loads(x) for x in lines]
    tok = ref_llm.tokenizer
    lls = {d["doc_id"]: [float(r[0]) for r in d["filtered_resps"]] for d in samples}
    want_lls = [_hf_loglikelihoods(hf, tok, q, c) for q, c, _ in QUESTIONS]
    right = [max(range(len(ll)), key=ll.__getitem__) == a for ll, (_, _, a) in zip(want_lls, QUESTIONS)]
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(sum(right) / len(right), abs=1e-12)
    for i, want in enumerate(want_lls):
        assert lls[i] == pytest.approx(want, abs=1e-3), i
    assert 0 < sum(right) < len(right)  # a task the model neither always passes nor always fails
