"""No Triton compile inside a request, for any model shape: the warm-up walks the variants each
kernel module declares (model/attention_prefill_triton.warm_classes, model/fused_moe_triton.
warm_token_counts). CPU: the variants a long request's chunks launch, as the scheduler cuts them,
are all among the warm-up's. GPU: a config no preset has, at a long prompt, compiles nothing late."""
from __future__ import annotations

import pytest
import torch

from engine.runtime.chunking import ChunkSizer
from model.attention_prefill_triton import launch_variant, warm_classes
from model.warmup import warm_shapes

S, SMS = 16, 132  # block size; an H100 / H200's SMs
# (name, head_dim, q heads per kv head, kv heads): hidden 1024 with 16/4 heads (no preset), the 30B-A3B
SHAPES = [("h1024-16/4", 128, 4, 4), ("qwen3-30b-a3b", 128, 8, 4), ("hd64", 64, 4, 4)]


def request_batches(prompt: int, budget: int, stages: int, decodes: int) -> list[tuple[list[int], list[int]]]:
    """The micro-batches of one prompt prefilled in chunks as the scheduler cuts them (dynamic
    chunks on several stages), beside `decodes` decoding sequences of short context."""
    sizer = ChunkSizer(budget, num_stages=stages) if stages > 1 else None
    out, pos = [], 0
    while pos < prompt:
        n = min(prompt - pos, budget if sizer is None else sizer(pos, prompt))
        out.append(([n] + [1] * decodes, [pos + n] + [40] * decodes))
        pos += n
    return out


def variants(batches, hd, g, k):
    return {v for q, c in batches if (v := launch_variant(torch.bfloat16, hd, g, k, q, c, S, SMS)) is not None}


@pytest.mark.parametrize("name,hd,g,k", SHAPES)
def test_long_requests_launch_only_warmed_variants(name, hd, g, k):
    budget, max_ctx = 8192, 40960
    warmed = variants(warm_classes(torch.bfloat16, hd, g, k, budget, 256, max_ctx, S, SMS), hd, g, k)
    seen = set()
    for prompt in (32000, 9000, 20011, 40000):
        for stages in (1, 2, 4):
            for decodes in (0, 1, 3, 63):
                seen |= variants(request_batches(prompt, budget, stages, decodes), hd, g, k)
    assert seen and seen <= warmed, seen - warmed


def test_the_token_ladder_alone_misses_tile_choices():
    """Why the 16/4-head config compiled inside a request: the warm-up's token ladder (powers of two
    and their +1) never selects one of the tile configs that dynamic chunk lengths select."""
    name, hd, g, k = SHAPES[0]
    ladder = variants(warm_shapes(8192, 256, 40960, 8, S), hd, g, k)
    seen = set()
    for stages in (1, 2):
        for decodes in (0, 1):
            seen |= variants(request_batches(32000, 8192, stages, decodes), hd, g, k)
    assert seen - ladder


def test_moe_token_counts_cover_every_tile_and_pair_class():
    """Each tile set and pair class of the MoE's launches (the GEMV path's two, the token-row
    path's row tiles, the grouped path's row tiles by the pair count's class) is reached by some
    warm-up count, for every count up to 8 192 tokens, with the token-row path off and up to 512
    pairs, and its ranked form off and up to 512 pairs (by the id vector's power of two)."""
    from model.attention_prefill_triton import stride_class
    from model.fused_moe_triton import grouped_tiles
    from model.moe_warm import warm_token_counts
    for E, top_k, small in ((128, 8, 64), (16, 4, 64), (64, 6, 64)):
        for rows, ranked in ((0, 0), (512, 0), (512, 512)):
            counts = warm_token_counts(E, top_k, small, 8192, rows, ranked)

            def key(n):
                P = n * top_k
                if P <= small:
                    return "small", P <= 16
                if P <= rows and n <= 16:  # one row tile of 16 tokens
                    return "rows", grouped_tiles(P, E)
                bp = 1 << (P - 1).bit_length()
                if P <= ranked and grouped_tiles(P, E)[0] * bp <= 8192:
                    return "ranked", grouped_tiles(P, E), bp
                return "grouped", grouped_tiles(P, E), stride_class(P)
            assert {key(n) for n in range(1, 8193)} == {key(n) for n in counts}
    bms = {grouped_tiles(8 * n, 128)[0] for n in warm_token_counts(128, 8, 64, 8192) if 8 * n > 64}
    assert bms == {16, 32, 64, 128}  # the align's runs kernel compiles once per row tile
    assert [n for n in warm_token_counts(128, 8, 64, 8192, 512) if 8 < n <= 16] == [9]  # one row tile
    assert [n for n in warm_token_counts(128, 8, 64, 8192, 512, 512) if 16 < n <= 64] == [17, 33]  # ids 256, 512


def test_warm_up_reaches_the_token_budget_when_the_context_limit_is_shorter():
    """max_model_len 1 165 under an 8 192-token budget (bench_breakdown's engine): micro-batches of
    several prompts reach 8 192 tokens, so the warm-up does too, as prompts of at most 1 165 tokens
    (each kernel's variants follow the micro-batch's total). Each fresh prefill's token count of
    the ladder is warmed, no shape passes the context limit, and the MoE's 128-row tile class
    (from 1 537 tokens at 128 experts, top-8), which a 1 165-token warm-up never reached, is there."""
    from model.fused_moe_triton import grouped_tiles
    from model.warmup import packed
    assert packed(8192, 1165) == [1165] * 7 + [37] and packed(1165, 1165) == [1165] and packed(5, 1165) == [5]
    shapes = warm_shapes(8192, 256, 1165, 8, S)
    assert all(max(c) <= 1165 for _, c in shapes)
    totals = {sum(q) for q, c in shapes if q == c}
    assert {1, 2, 3, 1024, 1025, 4096, 4097, 8192} <= totals
    assert any(grouped_tiles(8 * t, 128)[0] == 128 for t in totals)
    assert not any(grouped_tiles(8 * t, 128)[0] == 128 for q, c in warm_shapes(1165, 256, 1165, 8, S)
                   if q == c for t in [sum(q)])


@pytest.mark.gpu
def test_no_compile_inside_a_long_request_of_a_shape_no_preset_has(tmp_path):
    import json

    from engine import LLM, SamplingParams
    cfg = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=1024, hidden_size=1024,
               num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
               intermediate_size=1024, moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4,
               norm_topk_prob=True, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
               hidden_act="silu", tie_word_embeddings=False, torch_dtype="bfloat16", eos_token_id=2)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(3)
    with LLM(str(tmp_path), load_format="dummy", device="cuda", verbose=False, max_model_len=40960,
             max_num_seqs=8) as llm:
        long = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (32000, 20011)]
        short = [torch.randint(3, 1000, (40,), generator=g).tolist()]
        sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        llm.generate(long[:1], sp)
        llm.generate(short + long[1:], [SamplingParams(max_tokens=64, temperature=0, ignore_eos=True), sp])
        st = llm.stats()["stages"]
    late = {s["rank"]: s["late_kernels"] for s in st if s["late_compiles"]}
    assert not late, f"Triton kernels compiled inside requests: {late}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_compile_when_prompts_fill_a_budget_past_the_context_limit(tmp_path):
    """max_model_len 1 024 under the 8 192-token budget: 16 prompts of 1 000 tokens fill micro-batches
    of 8 192 tokens (the MoE's 128-row tile); nothing compiles inside them."""
    import json

    from engine import LLM, SamplingParams
    from loader.presets import preset_config
    cfg = preset_config("qwen3-30b-a3b")
    cfg["num_hidden_layers"] = cfg["max_window_layers"] = 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(5)
    with LLM(str(tmp_path), load_format="dummy", device="cuda", verbose=False, max_model_len=1024,
             max_num_seqs=16, kv_cache_gib=2) as llm:
        prompts = [torch.randint(3, 1000, (1000,), generator=g).tolist() for _ in range(16)]
        llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        st = llm.stats()["stages"]
    late = {s["rank"]: s["late_kernels"] for s in st if s["late_compiles"]}
    assert not late, f"Triton kernels compiled inside requests: {late}"
