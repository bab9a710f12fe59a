"""Paged KV cache on CPU: chunked prefill over scattered blocks equals contiguous attention
(transformers' eager forward) across block sizes at 4k+ tokens; many concurrent requests give
the same greedy tokens as one at a time; preemption under a small pool changes nothing."""
import pytest
import torch

from cache_util import scattered_cache
from engine import LLM, SamplingParams
from hf_ref import load_hf
from loader.load import load_stage
from loader.partition import partition
from loader.presets import preset_config
from loader.writer import write_checkpoint
from model.attention import attention_ref
from model.batch import AttnBatch
from model.config import ModelConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    write_checkpoint(d, preset_config("tiny"), seed=21)
    return d


@pytest.fixture(scope="module")
def long_ref(tiny):
    """transformers' logits over a 4200-token prompt (contiguous attention, no cache)."""
    ids = torch.randint(3, 500, (4200,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = load_hf(tiny)(input_ids=ids[None], use_cache=False).logits[0]
    return ids, logits


@pytest.mark.parametrize("block_size,chunk", [(1, 1500), (16, 1000), (64, 700), (256, 4200)])
def test_chunked_paged_prefill_equals_contiguous(tiny, long_ref, block_size, chunk):
    ids, ref = long_ref
    cfg = ModelConfig.from_file(tiny)
    stage = load_stage(tiny, cfg, partition(cfg.num_hidden_layers, 1)[0], "cpu", torch.float32)
    T = len(ids)
    nblocks = -(-T // block_size)
    stage.allocate_kv(nblocks * 2, block_size)
    table = torch.randperm(nblocks * 2)[:nblocks].tolist()  # scattered blocks
    worst = 0.0
    for start in range(0, T, chunk):
        end = min(T, start + chunk)
        batch = AttnBatch.build([end - start], [end], [table[:-(-end // block_size)]], block_size, [True], "cpu")
        batch.logits_indices = torch.arange(end - start)
        logits = stage(ids[start:end], batch)
        worst = max(worst, (logits - ref[start:end]).abs().max().item())
    assert worst <= 1e-4, worst


def test_reference_attention_mixed_batch_against_naive_maths():
    """attention_ref on a batch of chunks at different offsets vs a dense float64 softmax."""
    torch.manual_seed(0)
    N, K, D, S = 6, 2, 16, 8
    qlens, ctxs = [5, 1, 12], [37, 20, 12]
    kc, vc, tables = scattered_cache(ctxs, S, K, D)
    M = max(map(len, tables))
    bt = torch.tensor([t + [0] * (M - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(sum(qlens), N, D)
    out = attention_ref(q, kc, vc, bt, qlens, ctxs, D ** -0.5)
    row = 0
    for b, (ql, c) in enumerate(zip(qlens, ctxs)):
        k = kc[bt[b].long()].reshape(-1, K, D)[:c].double().repeat_interleave(N // K, 1)
        v = vc[bt[b].long()].reshape(-1, K, D)[:c].double().repeat_interleave(N // K, 1)
        for i in range(ql):
            pos = c - ql + i
            s = torch.einsum("nd,tnd->nt", q[row + i].double(), k[:pos + 1]) * D ** -0.5
            want = torch.einsum("nt,tnd->nd", torch.softmax(s, -1), v[:pos + 1])
            assert torch.allclose(out[row + i].double(), want, atol=1e-5)
        row += ql


@pytest.mark.slow
def test_concurrent_requests_equal_one_at_a_time_and_survive_preemption(tiny):
    g = torch.Generator().manual_seed(9)
    lens = [3, 700, 40, 1500, 9, 260, 1, 90, 33, 2100, 5, 128]
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in lens]
    sp = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (8, 5, 12, 4, 9, 6, 10, 3, 7, 5, 11, 6)]
    with LLM(str(tiny), stages=2, verbose=False, max_num_batched_tokens=512, block_size=16) as llm:
        together = [o.token_ids for o in llm.generate(prompts, sp)]
        alone = [llm.generate([p], s)[0].token_ids for p, s in zip(prompts, sp)]
    assert together == alone
    # a pool of 160 blocks x 16 = 2560 tokens holds any one request but not all of them at once
    per_token = 4 * 2 * 2 * 32 * 4  # layers x (k, v) x kv heads x head_dim x fp32, the whole model
    gib = 160 * 16 * per_token / 2 / 2**30  # per stage: half the layers
    with LLM(str(tiny), stages=2, verbose=False, max_num_batched_tokens=512, block_size=16, kv_cache_gib=gib) as llm:
        assert llm.info["num_blocks"] == 160
        squeezed = [o.token_ids for o in llm.generate(prompts, sp)]
        assert llm.stats()["scheduler"]["preemptions"] > 0
    assert squeezed == alone


def test_sdpa_prefill_path_matches_reference_on_mixed_batch():
    """The CUDA prefill path (gathered K/V + SDPA lower-right causal, single-query rows through a
    decode function) computes attention_ref's function; on CPU SDPA runs its math kernel."""
    from model.attention_sdpa import prefill_sdpa

    def ref_decode(q, kc, vc, tables, ctx_t, scale, max_ctx):
        return attention_ref(q, kc, vc, tables, [1] * q.shape[0], ctx_t.tolist(), scale)

    torch.manual_seed(1)
    N, K, D, S = 6, 2, 16, 8
    qlens, ctxs = [5, 1, 40, 1, 13], [37, 20, 40, 9, 100]
    kc, vc, tables = scattered_cache(ctxs, S, K, D)
    batch = AttnBatch.build(qlens, ctxs, tables, S, [True] * len(qlens), "cpu")
    q = torch.randn(sum(qlens), N, D)
    want = attention_ref(q, kc, vc, batch.block_tables, qlens, ctxs, D ** -0.5)
    got = prefill_sdpa(q, kc, vc, batch, D ** -0.5, ref_decode)
    assert torch.allclose(got, want, atol=1e-5)
