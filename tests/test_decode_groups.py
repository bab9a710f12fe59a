"""One stage: decodes that reach the decode phase in different micro-batches (prompts admitted in
waves under a small token budget) merge into one micro-batch once no prefill is left, instead of
two groups alternating forever, each step running part of the batch (Scheduler._decodes_would_split).
The real engine on CPU (tiny preset, dummy weights), async scheduling on."""
from __future__ import annotations

import pytest
import torch

from engine.options import EngineOptions
from engine.params import SamplingParams
from engine.runtime.launch import build_rank, resolve_engine


def run(n_seqs: int) -> tuple[list[tuple[int, bool]], dict]:
    args, cfg, _ = resolve_engine("tiny", EngineOptions(load_format="dummy", device="cpu", max_num_seqs=n_seqs,
                                                        max_num_batched_tokens=48, max_model_len=256,
                                                        verbose=False))
    eng = build_rank(args, 0, 0).engine
    seen, dispatch = [], eng._dispatch

    def record(mb):
        decodes = all(c.seq.num_scheduled - c.length >= c.seq.prompt_len or c.pending for c in mb.chunks)
        seen.append((len(mb.chunks), decodes, sum(1 for s in eng.scheduler.running if s.num_scheduled >= s.prompt_len)))
        return dispatch(mb)
    eng._dispatch = record
    g = torch.Generator().manual_seed(3)
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = [torch.randint(3, cfg.vocab_size, (20,), generator=g).tolist() for _ in range(n_seqs)]
    for i, p in enumerate(prompts):
        eng.add(i, p, sp)
    out: dict = {}
    while eng.has_work:
        for sid, tok, _, _ in eng.step():
            out.setdefault(sid, []).append(tok)
    return seen, out


def test_decode_groups_merge_on_one_stage():
    seen, out = run(8)
    assert all(len(v) == 24 for v in out.values()) and len(out) == 8
    decode_only = [rows for rows, decodes, _ in seen if decodes]
    assert decode_only, seen
    # prompts of 20 tokens under a 48-token budget: admitted 2 or 3 at a time, so the decodes start
    # in several groups; once the last prompt is in, every decode micro-batch holds all 8
    tail = decode_only[-10:-1]  # the last: sequences one token from max_tokens cannot continue
    assert all(rows == 8 for rows in tail), seen


def test_aborts_while_the_groups_wait_finish_the_rest():
    """Sequences aborted mid-decode (some in flight, some waiting for the in-flight micro-batch)
    end; the others still get every token, and nothing is left in flight or held."""
    args, cfg, _ = resolve_engine("tiny", EngineOptions(load_format="dummy", device="cpu", max_num_seqs=8,
                                                        max_num_batched_tokens=48, max_model_len=256,
                                                        verbose=False))
    eng = build_rank(args, 0, 0).engine
    g = torch.Generator().manual_seed(4)
    sp = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    for i in range(8):
        eng.add(i, torch.randint(3, cfg.vocab_size, (20,), generator=g).tolist(), sp)
    out: dict = {}
    steps = 0
    while eng.has_work:
        for sid, tok, _, _ in eng.step():
            out.setdefault(sid, []).append(tok)
        steps += 1
        if steps == 12:  # every prompt is in by now and decodes run in groups
            eng.abort([1, 4, 6])
        assert steps < 500, "the engine did not finish"
    assert all(len(out[i]) == 20 for i in (0, 2, 3, 5, 7)), {k: len(v) for k, v in out.items()}
    assert all(len(out.get(i, [])) < 20 for i in (1, 4, 6))
    assert not eng.scheduler.running and eng.scheduler.blocks.num_free == eng.scheduler.blocks.num_blocks
