"""Dynamic prefill chunk sizes (engine/runtime/chunking.py): the cost model's inverse, the sizes it gives,
and that a prefill chunked at those sizes gives the logits of an unchunked one (CPU, torch
reference attention) and of transformers (GPU, the paged flash-attention kernel)."""
import math
from dataclasses import replace

import pytest
import torch

from engine.runtime.chunking import QWEN3_30B_FIT, ChunkCost, ChunkSizer
from loader.load import load_stage
from loader.partition import partition
from loader.presets import preset_config
from loader.writer import write_checkpoint
from model.batch import AttnBatch
from model.config import ModelConfig

# A made-up model where attention dominates early, so short prompts already get small chunks.
STEEP = ChunkCost(c0=0.05, a=1e-3, b=2e-5)


def test_tokens_for_inverts_cost():
    for cost in (STEEP, QWEN3_30B_FIT, ChunkCost(0.0, 1e-3, 0.0)):
        for p in (1, 100, 4096, 90000):
            for t in (0.3, 2.0, 40.0):
                n = cost.tokens_for(p, t)
                if t <= cost.c0:
                    assert n == 0.0
                else:
                    assert math.isclose(cost.ms(n, p), t, rel_tol=1e-9), (cost, p, t, n)


def test_sizer_equal_cost_chunks():
    s = ChunkSizer(2048, STEEP, min_tokens=128, align=64)
    assert s(0) == 2048
    sizes = [s(p) for p in range(0, 200_000, 997)]
    assert all(a >= b for a, b in zip(sizes, sizes[1:])), "deeper chunks must not grow"
    assert all(n % 64 == 0 and 128 <= n <= 2048 for n in sizes)
    for p in range(1, 200_000, 7919):
        n = s(p)
        if 128 < n < 2048:  # not clamped: the largest aligned size within the budget chunk's cost
            assert STEEP.ms(n, p) <= s.base_ms < STEEP.ms(n + 64, p), (p, n)
    assert s(10**7) == 128  # the floor


def test_sizer_plan_covers_prompt_and_clamps():
    s = ChunkSizer(1000, STEEP, min_tokens=100, align=16)
    plan = s.plan(50_000)
    assert sum(plan) == 50_000 and plan[0] == 1000 and min(plan[:-1]) >= 100
    assert plan[-2] < plan[0]
    assert ChunkSizer(300, STEEP, min_tokens=512).plan(700) == [300, 300, 100]  # floor capped at budget
    assert ChunkSizer(8, ChunkCost(0.0, 1.0, 0.0)).plan(20) == [8, 8, 4]  # no attention cost: budget
    with pytest.raises(ValueError, match="budget"):
        ChunkSizer(0, STEEP)
    with pytest.raises(ValueError, match="min_tokens"):
        ChunkSizer(10, STEEP, min_tokens=0)


def pipeline_ttft(cost: ChunkCost, sizes: list[int], stages: int) -> float:
    """Modeled time to first token of one prompt in chunks `sizes` through `stages` equal stages."""
    free, pos = [0.0] * stages, 0
    for n in sizes:
        t, c = 0.0, cost.ms(n, pos)
        for s in range(stages):  # a chunk enters stage s when both it and the stage are ready
            t = max(t, free[s]) + c
            free[s] = t
        pos += n
    return free[-1]


def plan_for_target(cost: ChunkCost, L: int, target_ms: float, budget: int = 8192) -> list[int]:
    pos, sizes = 0, []
    while pos < L:
        n = int(cost.tokens_for(pos, target_ms)) // 64 * 64 if pos else budget
        sizes.append(min(L - pos, max(512, min(budget, n))))
        pos += sizes[-1]
    return sizes


def test_long_prompt_target_minimises_modeled_ttft():
    """For a long prompt on 2 stages the raised target beats both the budget-cost target (many
    small chunks, each paying c0) and fixed full-budget chunks (stages out of step), and its
    neighbours (half, twice)."""
    cost, L = QWEN3_30B_FIT, 90_000
    s = ChunkSizer(8192, cost, num_stages=2)
    assert s.target_ms(L) > s.base_ms and ChunkSizer(8192, cost, num_stages=1).target_ms(L) == s.base_ms
    assert s.target_ms(1000) == s.base_ms  # short prompts: the budget chunk's cost
    plan = s.plan(L)
    assert plan == plan_for_target(cost, L, s.target_ms(L))
    best = pipeline_ttft(cost, plan, 2)
    fixed = [8192] * (L // 8192) + [L % 8192]
    assert best < pipeline_ttft(cost, fixed, 2)
    for t in (s.base_ms, s.target_ms(L) / 2, s.target_ms(L) * 2):
        assert best < pipeline_ttft(cost, plan_for_target(cost, L, t), 2), t


def test_fitted_coefficients_shrink_deep_chunks():
    """The shipped model's costs grow with tokens and with the prefix, so deep chunks shrink."""
    c = QWEN3_30B_FIT
    assert c.a > 0 and c.b > 0 and c.c0 >= 0
    s = ChunkSizer(8192, c)
    assert s(0) == 8192 and s(90_000) < s(30_000) < 8192


# ----------------------------------------------------------------------------- numerics


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    write_checkpoint(d, preset_config("tiny"), seed=21)
    return d


def prefill_logits(stage, ids: torch.Tensor, sizes: list[int], block_size: int, seed: int = 0) -> torch.Tensor:
    """Logits of every position, the prompt fed in chunks of `sizes` over a scattered block table."""
    T = len(ids)
    nblocks = -(-T // block_size)
    stage.allocate_kv(nblocks * 2, block_size)
    table = torch.randperm(nblocks * 2, generator=torch.Generator().manual_seed(seed))[:nblocks].tolist()
    out, start = [], 0
    for n in sizes:
        end = start + n
        batch = AttnBatch.build([n], [end], [table[:-(-end // block_size)]], block_size, [True], stage.device)
        batch.logits_indices = torch.arange(n, device=stage.device)
        out.append(stage(ids[start:end].to(stage.device), batch))
        start = end
    assert start == T
    return torch.cat(out).cpu()


def test_split_attention_chunked_equals_reference_cpu(tiny):
    """attention='split' (model/attention_split.py's torch maths on CPU): a prompt fed in chunks
    behind cached prefixes (mid-block and on block boundaries), with a decode row after it, gives
    the reference path's logits."""
    from dataclasses import replace
    cfg = ModelConfig.from_file(tiny)
    spec = partition(cfg.num_hidden_layers, 1)[0]
    ids = torch.randint(3, 500, (300,), generator=torch.Generator().manual_seed(6))
    got = {}
    for attn in ("split", "ref"):
        stage = load_stage(tiny, cfg, spec, "cpu", torch.float32, attention=attn)
        stage.backend = replace(stage.backend, attention=attn)
        got[attn] = prefill_logits(stage, ids, [37, 75, 60, 127, 1], 16, seed=2)
    assert (got["split"] - got["ref"]).abs().max().item() <= 1e-4


def test_dynamic_chunks_equal_unchunked_cpu(tiny):
    cfg = ModelConfig.from_file(tiny)
    stage = load_stage(tiny, cfg, partition(cfg.num_hidden_layers, 1)[0], "cpu", torch.float32)
    ids = torch.randint(3, 500, (700,), generator=torch.Generator().manual_seed(5))
    sizes = ChunkSizer(256, STEEP, min_tokens=32, align=16).plan(len(ids))
    assert len(set(sizes)) >= 3, sizes  # really several different sizes
    whole = prefill_logits(stage, ids, [len(ids)], 16)
    chunked = prefill_logits(stage, ids, sizes, 16, seed=1)
    assert (chunked - whole).abs().max().item() <= 1e-4
    assert torch.equal(chunked.argmax(-1), whole.argmax(-1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("block_size", [16, 256])
def test_gpu_fa_dynamic_chunked_prefill_equals_transformers(tiny, block_size):
    """test_paged's 4200-token parity, on the GPU with the paged flash-attention kernel ('fa') and
    dynamic chunk sizes: logits equal transformers' (fp32, CPU) and the torch reference path's."""
    from hf_ref import load_hf
    ids = torch.randint(3, 500, (4200,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = load_hf(tiny)(input_ids=ids[None], use_cache=False).logits[0]
    cfg = ModelConfig.from_file(tiny)
    spec = partition(cfg.num_hidden_layers, 1)[0]
    sizes = ChunkSizer(1500, STEEP, min_tokens=64, align=16).plan(len(ids))
    got = {}
    for attn in ("fa", "ref"):
        stage = load_stage(tiny, cfg, spec, "cuda", torch.float32, attention=attn)
        stage.backend = replace(stage.backend, moe="torch", fused_norms=False, linear_small_max=0)  # only attention differs
        got[attn] = prefill_logits(stage, ids, sizes, block_size)
    assert (got["fa"] - got["ref"]).abs().max().item() <= 1e-4
    assert (got["fa"] - ref).abs().max().item() <= 2e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_split_attention_bf16_matches_reference(tiny):
    """attention='split' in bf16 on CUDA (cuDNN's fused kernel on the prefix and the chunk, merged
    by lse) against the torch reference path in bf16, a 4200-token prompt in chunks behind cached
    prefixes: the logits agree to bf16 rounding and the argmax nearly everywhere."""
    from dataclasses import replace
    from model.attention_split import cudnn_ok
    if not cudnn_ok(torch.cuda.current_device()):
        pytest.skip("this torch build or card has no cuDNN attention")
    ids = torch.randint(3, 500, (4200,), generator=torch.Generator().manual_seed(4))
    cfg = ModelConfig.from_file(tiny)
    spec = partition(cfg.num_hidden_layers, 1)[0]
    got = {}
    for attn in ("split", "ref"):
        stage = load_stage(tiny, cfg, spec, "cuda", torch.bfloat16, attention=attn)
        stage.backend = replace(stage.backend, moe="torch", fused_norms=False, linear_small_max=0)
        got[attn] = prefill_logits(stage, ids, [1100, 1500, 1599, 1], 16).float()
    err = ((got["split"] - got["ref"]).norm() / got["ref"].norm()).item()
    assert err < 2e-2, err
    assert (got["split"].argmax(-1) == got["ref"].argmax(-1)).float().mean().item() > 0.98


# ----------------------------------------------------------------------------- scheduler


def drive(sched, in_flight: int = 2) -> list[list[tuple[int, int, int]]]:
    """Run the scheduler like the pipeline (up to `in_flight` micro-batches outstanding, a token
    of 7 for every sample); returns each micro-batch's (seq_id, start, length) chunks."""
    from collections import deque
    q, seen = deque(), []
    while sched.has_work or q:
        while len(q) < in_flight:
            mb = sched.schedule()
            if mb is None:
                break
            q.append(mb)
            seen.append([(c.seq.seq_id, c.start, c.length) for c in mb.chunks])
        mb = q.popleft()
        sched.complete(mb, [7] * len(mb.sampled))
    return seen


def make_sched(prompt_len: int, budget: int, stages: int, dynamic: bool, sizer: ChunkSizer | None = None):
    from engine.runtime.block_manager import BlockManager
    from engine.params import SamplingParams
    from engine.runtime.scheduler import Scheduler
    from engine.runtime.sequence import Sequence
    s = Scheduler(BlockManager(4096, 16), 4, budget, 100_000, num_stages=stages, dynamic_chunks=dynamic)
    if sizer is not None:
        s.chunk_sizer = sizer
    s.add(Sequence(0, list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=2, temperature=0), (2,)))
    return s


def test_scheduler_sizes_prefill_chunks_and_pipelines_them():
    """One long prompt on 2 stages: chunks follow ChunkSizer.plan, and the next chunk is scheduled
    while the previous one is still in flight (a chunk on stage 1 while the next runs on stage 0)."""
    L, sizer = 20_000, ChunkSizer(2048, STEEP, num_stages=2, min_tokens=128)
    s = make_sched(L, 2048, 2, True, sizer)
    first, second = s.schedule(), s.schedule()
    assert [c.seq.seq_id for c in first.chunks] == [0] == [c.seq.seq_id for c in second.chunks]
    assert second.chunks[0].start == first.chunks[0].end
    s = make_sched(L, 2048, 2, True, sizer)
    prefill = [c[0][2] for c in drive(s)][:len(sizer.plan(L))]
    assert prefill == sizer.plan(L) and len(set(prefill)) > 3
    assert s.chunk_sizer is sizer and make_sched(L, 2048, 1, True).chunk_sizer is None  # one stage: off
    off = [c[0][2] for c in drive(make_sched(L, 2048, 2, False))]
    assert off[:9] == [2048] * 9 and off[9] == L - 9 * 2048  # switched off: full-budget chunks
