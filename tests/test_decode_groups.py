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
