"""The pipeline engine end to end on CPU (gloo, float32): greedy tokens equal across stage counts
and equal to transformers' greedy generate, seeded sampling, stop ids, max_tokens, errors."""
import gc
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from engine import LLM, EngineClosed, SamplingParams
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


SEEDED = [SamplingParams(max_tokens=8, temperature=0.9, top_k=40, top_p=0.9, min_p=0.01, seed=s, ignore_eos=True)
          for s in (7, 8, 9, 10)]


def test_greedy_equal_across_stages_and_to_transformers(ckpt, prompts):
    """Greedy equals transformers on every stage count; a seeded request draws the same tokens
    alone, beside other requests, in another order and on any stage count."""
    ref = hf_greedy(ckpt, prompts, GREEDY.max_tokens)
    seeded = {}
    for stages in (1, 2, 3):
        with LLM(str(ckpt), stages=stages, verbose=False) as llm:
            outs = llm.generate(prompts, GREEDY)
            assert [o.token_ids for o in outs] == ref, f"stages={stages}"
            assert all(o.finish_reason == "length" for o in outs)
            together = [o.token_ids for o in llm.generate(prompts, SEEDED)]
            mixed = llm.generate(prompts[::-1] + prompts[:2], SEEDED[::-1] + [GREEDY, GREEDY])
            seeded[stages] = together
            assert [o.token_ids for o in mixed[:4]] == together[::-1], f"stages={stages}"
            assert [o.token_ids for o in mixed[4:]] == ref[:2]
            if stages == 1:
                assert llm.generate([prompts[2]], SEEDED[2])[0].token_ids == together[2]
    assert seeded[1] == seeded[2] == seeded[3]


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny2")
    write_checkpoint(d, preset_config("tiny"), seed=3)
    return d


@pytest.fixture(scope="module")
def llm2(tiny2):
    with LLM(str(tiny2), stages=2, verbose=False) as llm:
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


def test_text_prompts_and_text_output(llm2, tiny2):
    """Prompt encoding and output text against an independent `tokenizers` call on the file."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tiny2 / "tokenizer.json"))
    texts = ["Hello world", "The fox"]
    outs = llm2.generate(texts, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    for t, o in zip(texts, outs):
        assert o.prompt_token_ids == tok.encode(t, add_special_tokens=False).ids
        assert len(o.token_ids) == 5 and o.text == tok.decode(o.token_ids, skip_special_tokens=True)
    ids = llm2.generate([tok.encode("Hello world", add_special_tokens=False).ids],
                        SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert ids.token_ids == outs[0].token_ids


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


def test_async_scheduling_same_tokens_as_without(tiny2, llm2, prompts):
    """Async scheduling (the default: a decode's next step queued before its token reaches stage
    0's host, its id gathered on the device) gives the tokens of the plain path: greedy and seeded,
    alone and batched, and at a stop token, whose continuation's token is dropped."""
    free = llm2.generate([prompts[1]], GREEDY)[0].token_ids
    stop = SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[free[4]])
    calls = [([prompts[1]], GREEDY), ([prompts[0]], SEEDED[0]), (prompts, SEEDED), ([prompts[1]], stop)]
    want = []
    with LLM(str(tiny2), stages=2, verbose=False, async_scheduling=False) as plain:
        for p, sp in calls:
            want.append([(o.token_ids, o.finish_reason) for o in plain.generate(p, sp)])
        assert plain.stats()["scheduler"]["continuations"] == 0
    llm2.stats(reset=True)
    for (p, sp), w in zip(calls, want):
        assert [(o.token_ids, o.finish_reason) for o in llm2.generate(p, sp)] == w
    assert _idle(llm2)["continuations"] >= 8  # it ran ahead


def test_async_run_ahead_past_a_stop_token_drops_its_token(tiny2, prompts, tmp_path):
    """A sequence that stops while its next step is already queued: that step's token is dropped and
    the output is the plain path's. The last layer spins 30 ms a forward, so every token reaches
    stage 0's host well after its continuation was queued (without it, whether the engine runs past
    the stop depends on the host's timing)."""
    from slow_layers import inject_into_workers
    with LLM(str(tiny2), stages=2, verbose=False, async_scheduling=False) as plain:
        free = plain.generate([prompts[1]], GREEDY)[0].token_ids
        stop = SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[free[4]])
        want = [(o.token_ids, o.finish_reason) for o in plain.generate([prompts[1]], stop)]
    with pytest.MonkeyPatch.context() as mp:
        inject_into_workers(mp, tmp_path, "3:30")
        slow = LLM(str(tiny2), stages=2, verbose=False)
    with slow:
        assert [(o.token_ids, o.finish_reason) for o in slow.generate([prompts[1]], stop)] == want
        assert want[0][1] == "stop"
        # the queued step's token reaches the host after the stop was returned, and the stopped
        # sequence's blocks may be free before it does: wait for it rather than for idle
        deadline = time.monotonic() + 20
        while slow.stats()["scheduler"]["dropped_tokens"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert slow.stats()["scheduler"]["dropped_tokens"] >= 1


# ---- the request API ---------------------------------------------------------------------------
LONG = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)


def _idle(llm) -> dict:
    """The scheduler once aborted work has drained: nothing running or waiting, every block free."""
    deadline = time.monotonic() + 20
    while True:
        s = llm.stats()["scheduler"]
        if (s["running"], s["waiting"], s["free_blocks"]) == (0, 0, s["num_blocks"]) or time.monotonic() > deadline:
            return s


def test_leaving_a_stream_aborts_its_requests(llm2, prompts):
    want = [o.token_ids for o in llm2.generate(prompts[:2], GREEDY)]
    it = llm2.stream(prompts[:2], LONG)
    for _ in range(5):
        next(it)
    it.close()  # as `break` does
    s = _idle(llm2)
    assert (s["running"], s["waiting"], s["free_blocks"]) == (0, 0, s["num_blocks"])
    it = llm2.stream(prompts[:2], LONG)
    next(it)
    del it  # garbage collection
    gc.collect()
    outs = llm2.generate(prompts[:2], GREEDY)  # nothing of the abandoned calls leaks in
    assert [o.token_ids for o in outs] == want and all(len(o.token_ids) == 10 for o in outs)
    assert outs[0].request_id != outs[1].request_id
    _idle(llm2)


def test_submit_from_threads_abort_and_on_event(llm2, prompts):
    want = [o.token_ids for o in llm2.generate(prompts, GREEDY)]
    got, errors = {}, []

    def worker(i):
        try:
            s = llm2.submit(prompts[i], GREEDY, request_id=f"t{i}")
            toks = [ev.token_id for ev in s]
            assert s.request_id == f"t{i}"
            got[i] = toks
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    seen = []
    done = threading.Event()
    cb = llm2.submit(prompts[0], GREEDY, on_event=lambda ev: (seen.append(ev), ev.finish_reason and done.set()))
    victim = llm2.submit(prompts[1], LONG, request_id="victim")
    first = next(victim)
    with pytest.raises(ValueError, match="already running"):
        llm2.submit(prompts[1], GREEDY, request_id="victim")
    llm2.abort(["victim"])
    assert list(victim) == [] and first.finish_reason is None
    for t in threads:
        t.join(60)
    assert done.wait(60) and not errors
    assert [got[i] for i in range(len(prompts))] == want
    assert [e.token_id for e in seen] == want[0] and seen[-1].finish_reason == "length" and cb.request_id
    _idle(llm2)


def test_abort_of_a_finished_but_unread_stream_ends_it(llm2, prompts):
    """A request the engine has finished while its stream was not read yet: abort ends the stream
    (its queued tokens are not yielded) and leaves the pool free."""
    a = llm2.submit(prompts[0], GREEDY)
    b = llm2.submit(prompts[1], GREEDY)
    next(a)
    assert len(list(b)) == 10  # a runs beside b, so it has finished too by now
    _idle(llm2)
    llm2.abort([a.request_id])
    assert list(a) == []
    s = _idle(llm2)
    assert (s["running"], s["free_blocks"]) == (0, s["num_blocks"])


def test_stats_snapshot_while_generating(llm2, prompts):
    results, errors = [], []

    def poll():
        try:
            while len(results) < 20:
                results.append(llm2.stats(per_step=True))
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    llm2.stats(reset=True)
    t = threading.Thread(target=poll)
    t.start()
    outs = llm2.generate(prompts, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    t.join(60)
    assert not errors and len(results) == 20
    assert all(len(o.token_ids) == 30 for o in outs)
    last = llm2.stats()
    assert [s["rank"] for s in last["stages"]] == [0, 1] and last["scheduler"]["generation_tokens"] >= 120
    assert all(s["peak_gib"] > 0 and s["kv_gib"] > 0 and "step_ms" not in s for s in last["stages"])
    assert all(len(s["step_ms"]) == s["steps"] for r in results for s in r["stages"])


def test_keyboard_interrupt_in_generate_aborts(llm2, prompts):
    def interrupt(*_):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        with pytest.raises(KeyboardInterrupt):
            llm2.generate(prompts, SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    s = _idle(llm2)
    assert (s["running"], s["waiting"], s["free_blocks"]) == (0, 0, s["num_blocks"])


def test_stats_and_calls_after_close_raise_at_once(tiny2):
    llm = LLM(str(tiny2), stages=2, verbose=False)
    llm.close()
    t0 = time.monotonic()
    with pytest.raises(EngineClosed):
        llm.stats()
    with pytest.raises(EngineClosed):
        llm.generate([[5, 6]], GREEDY)
    assert time.monotonic() - t0 < 1


README_SCRIPT = """
from engine import LLM, SamplingParams

with LLM({model!r}, stages=2, verbose=False) as llm:
    out = llm.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    print("TOKENS", out[0].token_ids, out[0].finish_reason)
"""


def test_readme_example_runs_as_a_plain_script(tiny2, tmp_path):
    """No `if __name__ == "__main__"` guard: the stages must not import the user's script."""
    script = tmp_path / "example.py"
    script.write_text(README_SCRIPT.format(model=str(tiny2)))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("TOKENS") == 1 and "length" in r.stdout
