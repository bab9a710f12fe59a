"""The fused MoE kernels (model/fused_moe_triton.py) against the torch reference (model/moe.py) on
fresh seeded random inputs: routing, the small-batch GEMV path, the large-batch grouped path,
both sides of the switch, and a batch whose every token picks the same experts. Without CUDA they
run under TRITON_INTERPRET=1 at small shapes; @pytest.mark.gpu cases use the real shapes.

The reference is experts_grouped, the torch path that traces and CPU runs use: its rounding
steps (projections, SiLU, SiLU * up, y * w in the dtype; the k terms summed in fp32) are the
kernels'. (experts_loop, HF's order, instead sums the k terms in a bf16 buffer, up to ~2 bf16
steps of the row's scale away from both.) Bounds: fp32 within 2e-5 (summation order only). bf16:
the accumulation order differs, so a projection can land one bf16 step away and travel through
the down GEMM. On CPU (small shapes) each output is within 2^-7 of its row's scale of the
reference. At the real shapes on GPU the rounding flips compound: on H100 the kernels and
torch._grouped_mm are each up to 1.03% of the row's scale from an fp64 computation with no
intermediate rounding (the same distance for all three), and up to 0.93% from each other
(bench/results/moe_diag_H100_2026-11-28.json). There the bound is 2^-6 (1.56%) of the row's scale,
against the reference and against fp64."""
import importlib
import os

import pytest
import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from model import fused_moe_triton as fm  # noqa: E402
from model import moe_align as ma  # noqa: E402
from model import moe_dispatch as md  # noqa: E402
from model import moe_route_triton as mrt  # noqa: E402
from model import moe_rows_triton as mr  # noqa: E402
from model.moe import experts_grouped, route  # noqa: E402

if not _CUDA and os.environ.get("TRITON_INTERPRET") == "1":
    # in import order, so each module binds the reloaded (interpreted) kernels of the ones before it
    mrt, ma, fm, mr, md = (importlib.reload(m) for m in (mrt, ma, fm, mr, md))
DEV = "cuda" if _CUDA else "cpu"

# (H, I, E, k): the tiny and user-mini presets (CPU); the real shapes (GPU)
CPU_SHAPES = {"tiny": (64, 32, 8, 2), "user-mini": (96, 32, 16, 4)}
GPU_SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8), "user-config": (6144, 1024, 128, 16),
              "qwen3-235b-a22b": (4096, 1536, 128, 8)}


def _weights(H, I, E, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * 0.02).to(DEV, dtype)
    w2 = (torch.randn(E, H, I, generator=g) * 0.02).to(DEV, dtype)
    gate = (torch.randn(E, H, generator=g) * 0.02).to(DEV, dtype)
    return w13, w2, gate


def _x(N, H, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(N, H, generator=g).to(DEV, dtype)


def assert_close(got, want, dtype, bound=2 ** -7):
    assert got.shape == want.shape and got.dtype == want.dtype
    g, w = got.float(), want.float()
    if dtype == torch.float32:
        assert torch.allclose(g, w, atol=2e-5, rtol=2e-5), (g - w).abs().max()
        return
    scale = w.abs().amax(dim=-1, keepdim=True)
    assert ((g - w).abs() <= bound * scale).all(), f"max error {((g - w).abs() / scale).max():.4f} of row scale"


def exact_fp64(x, w13, w2, ids, w):
    """sum_j w_j * down(silu(gate) * up) in fp64 with no intermediate rounding, expert by expert."""
    I = w2.shape[2]
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64, device=x.device)
    for e in torch.unique(ids).tolist():
        t, j = (ids == e).nonzero(as_tuple=True)
        h = x[t].double() @ w13[e].double().T
        a = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        out.index_add_(0, t, (a @ w2[e].double().T) * w[t, j].double()[:, None])
    return out


def _check(N, shape, dtype, seed, same_expert=False, paths=("small", "large"), bound=2 ** -7, vs_fp64=False):
    H, I, E, k = shape
    w13, w2, gate = _weights(H, I, E, dtype, seed)
    x = _x(N, H, dtype, seed + 1)
    _, w, ids = route(x, gate, k, True)
    if same_expert:  # every token picks experts 0..k-1
        ids = torch.arange(k, device=DEV).repeat(N, 1)
    want = experts_grouped(x, w13, w2, ids, w)
    exact = exact_fp64(x, w13, w2, ids, w) if vs_fp64 else None
    fns = {"small": fm.experts_small, "large": fm.experts_large}
    for name in paths:
        got = fns[name](x, w13, w2, ids, w)
        assert_close(got, want, dtype, bound)
        if exact is not None:
            err = ((got.double() - exact).abs() / exact.abs().amax(-1, keepdim=True)).max().item()
            assert err <= bound, f"{name} N={N}: {err:.4f} of the row's scale from fp64"
    return x, w13, w2, gate, want


@pytest.mark.parametrize("shape,dtype", [("tiny", torch.float32), ("user-mini", torch.bfloat16)])
def test_both_paths_match_reference(shape, dtype):
    """Interpreted programs are slow: the GEMV path at 1 and 2 tokens, the grouped one at 2 and 16."""
    _check(1, CPU_SHAPES[shape], dtype, seed=1, paths=("small",))
    _check(2, CPU_SHAPES[shape], dtype, seed=2)
    _check(16, CPU_SHAPES[shape], dtype, seed=16, paths=("large",))


def test_top_k_not_a_power_of_two():
    """top-3 of 6 experts, expert width 40 (not a multiple of the K step): the down GEMV pads its
    [k, BN, BK] tile to 4 experts and masks the padding; both paths against the torch path."""
    _check(1, (48, 40, 6, 3), torch.bfloat16, seed=31, paths=("small",))
    _check(3, (48, 40, 6, 3), torch.bfloat16, seed=32)


def test_one_expert_gets_every_token():
    _check(24, CPU_SHAPES["user-mini"], torch.bfloat16, seed=3, same_expert=True, paths=("large",))
    _check(3, CPU_SHAPES["user-mini"], torch.bfloat16, seed=4, same_expert=True, paths=("small",))


def test_fused_moe_switches_paths_and_matches_reference():
    H, I, E, k = CPU_SHAPES["user-mini"]
    w13, w2, gate = _weights(H, I, E, torch.bfloat16, 9)
    for N in (2, 3):  # threshold 8 pairs, top-4: 2 tokens small, 3 large
        x = _x(N, H, torch.bfloat16, N)
        _, w, ids = route(x, gate, k, False)
        want = experts_grouped(x, w13, w2, ids, w)
        assert_close(md.fused_moe(x, gate, w13, w2, k, False, small_max_pairs=8), want, torch.bfloat16)


def test_grouped_path_with_the_wide_align_matches_reference(monkeypatch):
    """experts_large groups its pairs with moe_align.align_wide (here with 16 pairs a program, so
    10 programs count and place 160 pairs) and the output matches the torch path, also through
    fused_moe's threshold (3 tokens x top-4 = 12 pairs above 8: the grouped path, 12 pairs aligned).
    Experts of uneven size."""
    wide, calls = ma.align_wide, []
    monkeypatch.setattr(ma, "align_wide", lambda ids, E, BM: calls.append(ids.numel()) or wide(ids, E, BM, 16))
    H, I, E, k = CPU_SHAPES["user-mini"]
    w13, w2, gate = _weights(H, I, E, torch.bfloat16, 61)
    x = _x(40, H, torch.bfloat16, 62)
    _, w, ids = route(x, gate, k, True)
    ids[:8] = torch.arange(k, device=DEV)  # expert 0..k-1 take 8 extra tokens: several blocks of BM 16
    want = experts_grouped(x, w13, w2, ids, w)
    assert_close(fm.experts_large(x, w13, w2, ids, w, tiles=(16, 32, 32, 4, 1)), want, torch.bfloat16)
    assert calls == [160]
    x3 = x[:3]
    _, w3, ids3 = route(x3, gate, k, False)
    assert_close(md.fused_moe(x3, gate, w13, w2, k, False, small_max_pairs=8),
                 experts_grouped(x3, w13, w2, ids3, w3), torch.bfloat16)
    assert calls == [160, 12]


@pytest.mark.parametrize("tiles", [(16, 32, 32, 4, 1), (32, 16, 32, 4, 1)])
def test_n_major_grid_gives_the_same_bits(tiles):
    """The grouped GEMM with its grid N-major (n_major_min_bm at or below the row tile) against the
    block-major grid: the same programs in another launch order, so the same bits; a min_bm above
    the tile leaves the order alone. Experts of uneven size (some padded, one with several blocks)."""
    H, I, E, k = CPU_SHAPES["user-mini"]
    w13, w2, gate = _weights(H, I, E, torch.bfloat16, 51)
    x = _x(40, H, torch.bfloat16, 52)
    _, w, ids = route(x, gate, k, True)
    ids[:8] = torch.arange(k, device=DEV)  # expert 0..k-1 take 8 extra tokens: several blocks of BM 16
    base = fm.experts_large(x, w13, w2, ids, w, tiles=tiles)
    assert torch.equal(fm.experts_large(x, w13, w2, ids, w, tiles=tiles, n_major_min_bm=tiles[0]), base)
    assert torch.equal(fm.experts_large(x, w13, w2, ids, w, tiles=tiles, n_major_min_bm=2 * tiles[0]), base)
    assert_close(base, experts_grouped(x, w13, w2, ids, w), torch.bfloat16)


@pytest.mark.parametrize("tiles", [(16, 32, 32, 4, 1), (16, 64, 64, 4, 1), (32, 128, 64, 4, 2)])
def test_tma_tiles_give_the_same_bits(tiles):
    """grouped_gemms with its weight (and the down GEMM's act) tiles by TMA descriptor against the
    pointer loads: the same bits. Tiles that divide I and H, and tiles past them (BN 64 and 128 > I
    = 32: a gate tile reads up rows, an up tile the next expert's, the down tile past H = 96 the
    next expert's; BK 64 > I: the descriptor's zeros past the end), which the stores must mask.
    Experts of uneven size, padding rows in most blocks."""
    H, I, E, k = CPU_SHAPES["user-mini"]
    w13, w2, gate = _weights(H, I, E, torch.bfloat16, 71)
    x = _x(40, H, torch.bfloat16, 72)
    _, w, ids = route(x, gate, k, True)
    ids[:8] = torch.arange(k, device=DEV)
    pairs, bexp = ma.align_by_expert(ids, E, tiles[0])
    plain = fm.grouped_gemms(x, w13, w2, pairs, bexp, w, tiles, tma=False)
    assert torch.equal(fm.grouped_gemms(x, w13, w2, pairs, bexp, w, tiles, tma=True), plain)
    want = experts_grouped(x, w13, w2, ids, w)
    assert_close(fm.combine_k(plain.view(40, k, H)), want, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
@pytest.mark.parametrize("shape,N", [("qwen3-30b-a3b", 8192), ("qwen3-30b-a3b", 2048), ("user-config", 1024)])
def test_tma_tiles_on_gpu_at_prefill(shape, N):
    """The prefill tile (128 rows) at real shapes with TMA loads against pointer loads (the same
    bits expected: the same tiles reach the same wgmma) and against the torch path within the
    real-shape bound; one expert taking every token's first slot."""
    H, I, E, k = GPU_SHAPES[shape]
    w13, w2, gate = _weights(H, I, E, torch.bfloat16, N + 5)
    x = _x(N, H, torch.bfloat16, N + 6)
    w, ids = mrt.route_fused(x, gate, k, True)
    ids[:, 0] = E - 1
    ids[:, 1:] = torch.where(ids[:, 1:] == E - 1, 0, ids[:, 1:])
    tiles = fm.grouped_tiles(N * k, E)
    assert tiles[0] >= fm.TMA_MIN_BM
    pairs, bexp = ma.align_by_expert(ids, E, tiles[0])
    plain = fm.grouped_gemms(x, w13, w2, pairs, bexp, w, tiles, 128, tma=False)
    got = fm.grouped_gemms(x, w13, w2, pairs, bexp, w, tiles, 128, tma=True)
    assert torch.equal(got, plain)
    assert_close(fm.combine_k(got.view(N, k, H)), experts_grouped(x, w13, w2, ids, w), torch.bfloat16, 2 ** -6)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
@pytest.mark.parametrize("N", [4096, 8192])
def test_n_major_grid_on_gpu_at_prefill(N):
    """The 30b shape at prefill sizes (the (128, 128) tile): the N-major grid gives the block-major
    grid's bits."""
    H, I, E, k = GPU_SHAPES["qwen3-30b-a3b"]
    w13, w2, gate = _weights(H, I, E, torch.bfloat16, N)
    x = _x(N, H, torch.bfloat16, N + 1)
    w, ids = mrt.route_fused(x, gate, k, True)
    base = fm.experts_large(x, w13, w2, ids, w)
    assert torch.equal(fm.experts_large(x, w13, w2, ids, w, n_major_min_bm=128), base)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
@pytest.mark.parametrize("N,same_expert", [(8192, False), (4096, True)])
def test_grouped_path_with_the_wide_align_on_gpu(N, same_expert):
    """experts_large at the 30b shape (align_wide groups the pairs) against the torch path, within
    the real-shape bound (module docstring)."""
    H, I, E, k = GPU_SHAPES["qwen3-30b-a3b"]
    w13, w2, gate = _weights(H, I, E, torch.bfloat16, N + 3)
    x = _x(N, H, torch.bfloat16, N + 4)
    w, ids = mrt.route_fused(x, gate, k, True)
    if same_expert:
        ids = torch.arange(k, device=DEV).repeat(N, 1)
    got = fm.experts_large(x, w13, w2, ids, w)
    assert_close(got, experts_grouped(x, w13, w2, ids, w), torch.bfloat16, 2 ** -6)


@pytest.mark.parametrize("dtype,norm_topk", [(torch.float32, False), (torch.bfloat16, True)])
def test_routing_picks_the_reference_experts(dtype, norm_topk):
    H, E, k = 96, 16, 4
    _, _, gate = _weights(H, 32, E, dtype, 11)
    gate[3] = gate[9]  # ties: experts 3 and 9 always have equal logits
    gate[12] = gate[9]
    x = _x(40, H, dtype, 12)
    _, w_ref, ids_ref = route(x, gate, k, norm_topk)
    w, ids = mrt.route_fused(x, gate, k, norm_topk)
    probs = torch.softmax(torch.nn.functional.linear(x, gate), -1, dtype=torch.float32)
    kth = probs.topk(k + 1, dim=-1).values  # a tie straddles the k-th place when kth[k-1] == kth[k]
    straddle = kth[:, k - 1] == kth[:, k]
    clear = ~straddle
    assert clear.sum() > 25 and (probs[:, 3] == probs[:, 9]).all()
    tied_inside = clear & (ids_ref == 9).any(-1)
    assert tied_inside.any()  # some rows choose all three tied experts inside the top k
    assert torch.equal(ids[clear].sort(-1).values, ids_ref[clear].sort(-1).values)
    assert torch.equal(probs.gather(1, ids).sort(-1).values, probs.gather(1, ids_ref).sort(-1).values)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7  # one bf16 step: the renorm sums in another order
    got_w = torch.zeros_like(probs).scatter_(1, ids, w.float())
    ref_w = torch.zeros_like(probs).scatter_(1, ids_ref, w_ref.float())
    assert ((got_w - ref_w)[clear].abs() <= tol * ref_w[clear].abs() + 1e-7).all()
    assert w.dtype == dtype and ids.dtype == torch.int64


@pytest.mark.gpu
@pytest.mark.parametrize("shape", sorted(GPU_SHAPES))
def test_real_shapes_on_gpu(shape):
    from model.backend import MOE_SMALL_MAX_PAIRS
    S = MOE_SMALL_MAX_PAIRS // GPU_SHAPES[shape][3]  # the last token count on the GEMV path
    for N in (1, 2, S, S + 1, 64, 256, 2048, 4096):  # 4096: the (128, 128) grouped tile
        paths = ("small", "large") if N <= 256 else ("large",)
        _check(N, GPU_SHAPES[shape], torch.bfloat16, seed=N, paths=paths, bound=2 ** -6, vs_fp64=True)
    _check(512, GPU_SHAPES[shape], torch.bfloat16, seed=7, same_expert=True, bound=2 ** -6, vs_fp64=True)


@pytest.mark.gpu
def test_routing_on_gpu_matches_torch_topk():
    H, E, k = 2048, 128, 8
    _, _, gate = _weights(H, 768, E, torch.bfloat16, 1)
    gate[7] = gate[100]
    x = _x(4096, H, torch.bfloat16, 2)
    _, w_ref, ids_ref = route(x, gate, k, True)
    w, ids = mrt.route_fused(x, gate, k, True)
    assert torch.equal(ids.sort(-1).values, ids_ref.sort(-1).values)
    assert ((w.float().sort(-1).values - w_ref.float().sort(-1).values).abs() <= 2 ** -8).all()


def _two_layer_stage(shape: str, device: str, seed: int = 0):
    from loader.dummy import fill_dummy
    from loader.presets import preset_config
    from model.config import ModelConfig
    from model.stage import Stage
    raw = preset_config("qwen3-30b-a3b" if shape == "user-config" else shape)
    if shape == "user-config":  # ../shared/docs/user-config.json's shape
        raw.update(hidden_size=6144, num_attention_heads=48, num_key_value_heads=8, head_dim=128,
                   num_experts=128, num_experts_per_tok=16, moe_intermediate_size=1024, norm_topk_prob=False)
    raw.update(num_hidden_layers=2, torch_dtype="bfloat16")
    return fill_dummy(Stage(ModelConfig.from_dict(raw), 0, 2, True, False, device, torch.bfloat16), seed=seed)


def _prefill_then_decode(stage, backends: dict, device: str) -> dict:
    """{name: [(out, moe inputs) of a 37-token prefill, a 5-row decode step, a 1-row one]}, each backend from
    an empty KV pool."""
    from model.batch import AttnBatch
    from routing_ties import moe_inputs
    runs = {}
    for name, be in backends.items():
        stage.backend = be
        stage.allocate_kv(32, 16)
        ids = torch.randint(0, stage.cfg.vocab_size, (37,), generator=torch.Generator().manual_seed(1)).to(device)
        tables = [[3, 9, 4]] + [[10 + i] for i in range(4)]
        runs[name] = []
        for x, batch in ((ids, AttnBatch.build([37], [37], [[3, 9, 4]], 16, [True], device)),
                         (ids[:5], AttnBatch.build([1] * 5, [38, 2, 5, 9, 16], tables, 16, [True] * 5, device)),
                         (ids[5:6], AttnBatch.build([1], [39], [[3, 9, 4]], 16, [True], device))):  # batch 1
            with moe_inputs(stage) as got:
                out = stage(x, batch)
            runs[name].append((out, got))
    return runs


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["qwen3-30b-a3b", "user-config", "qwen3-235b-a22b", "tiny", "user-mini"])
def test_stage_fused_matches_reference_on_gpu(shape):
    """Two layers with the default CUDA kernels (fused qkv write, add+norm, routing, MoE) against
    the torch reference backend on the same dummy weights: a 37-token prefill, then decode steps
    of 5 rows and of 1 (the small-token GEMVs and their fused epilogues). bf16 through two layers: tokens routed alike stay within 2% of the output's scale
    (one bf16 step is 0.4%), and few tokens may be re-routed by rounding (tests/routing_ties.py:
    on 4 x H200 the 235b shape's 2-layer max error over all tokens was 4.2% of scale; on CPU, two
    torch rounding orders at that shape put 2.4% on one re-routed token, 0.5% on the others)."""
    from model.backend import Backend, pick_backend
    from routing_ties import assert_close_up_to_routing_ties
    stage = _two_layer_stage(shape, "cuda")
    runs = _prefill_then_decode(stage, {"ref": Backend("sdpa", "torch", False), "fused": pick_backend("cuda")}, "cuda")
    for (r, in_r), (f, in_f) in zip(runs["ref"], runs["fused"]):
        assert_close_up_to_routing_ties(stage, r, f, in_r, in_f)


def test_routing_tie_comparison_on_cpu():
    """The comparison above, on CPU where two torch MoE orders (grouped, fp32 sum of the k terms;
    HF's loop, a bf16 buffer) re-route one token of user-mini's layer 1 (dummy seed 3): it passes,
    and it fails on a corrupted token and on inputs moved enough to re-route most tokens."""
    from model.backend import Backend
    from routing_ties import assert_close_up_to_routing_ties, routing_flips
    stage = _two_layer_stage("user-mini", "cpu", seed=3)
    runs = _prefill_then_decode(stage, {"ref": Backend("fa", "torch", False),
                                        "loop": Backend("fa", "loop", False)}, "cpu")
    (r, in_r), (o, in_o) = runs["ref"][0], runs["loop"][0]
    figures = assert_close_up_to_routing_ties(stage, r, o, in_r, in_o)
    assert figures["flipped"] == 1 and figures["max_err_agreeing"] > 0  # one near-tie, rounding elsewhere
    bad = o.clone()
    t = int((~routing_flips(stage, in_r, in_o)).nonzero()[0])
    bad[t] += 0.05 * r.float().abs().max()
    with pytest.raises(AssertionError, match="routed alike"):
        assert_close_up_to_routing_ties(stage, r, bad, in_r, in_o)
    g = torch.Generator().manual_seed(0)  # inputs moved by 20% noise: most tokens re-route
    moved = {i: (v.float() * (1 + 0.2 * torch.randn(v.shape, generator=g))).to(v.dtype) for i, v in in_o.items()}
    with pytest.raises(AssertionError, match="re-routed"):
        assert_close_up_to_routing_ties(stage, r, o, in_r, moved)


def mini_layer_runs(backends: dict) -> dict:
    """{name: (prefill out, decode out, KV cache)}: one user-mini layer (bf16, dummy weights) on
    each backend from an empty pool, a 9-token prefill then a 3-row decode step."""
    from loader.dummy import dummy_config, fill_dummy
    from model.batch import AttnBatch
    from model.stage import Stage
    cfg = dummy_config("user-mini")
    stage = fill_dummy(Stage(cfg, 0, 1, True, True, DEV, torch.bfloat16))
    outs = {}
    for name, be in backends.items():
        stage.backend = be
        stage.allocate_kv(8, 16)
        ids = torch.randint(0, cfg.vocab_size, (9,), generator=torch.Generator().manual_seed(0)).to(DEV)
        a = stage(ids, AttnBatch.build([9], [9], [[3]], 16, [True], DEV))
        b = stage(ids[:3], AttnBatch.build([1] * 3, [10, 2, 3], [[3], [5], [6]], 16, [True] * 3, DEV))
        outs[name] = (a, b, stage.kv_cache.clone())
    return outs


def test_stage_with_every_fused_kernel_matches_reference_interpreted():
    """One user-mini layer, bf16, prefill then decode: the fused backend (qkv norm+rope+KV write,
    add+norm, routing, both MoE paths (the prefill's 36 pairs grouped by the one-launch align), the
    small-token GEMV for the decode's projections) against the torch backend, outputs and KV cache.
    Both round at the same steps; under the interpreter they agree to the bit."""
    from model.backend import Backend
    outs = mini_layer_runs({"ref": Backend("ref", "torch", False),
                            "fused": Backend("ref", "triton", True, moe_small_max_pairs=12, linear_small_max=4)})
    for r, f in zip(outs["ref"], outs["fused"]):
        assert_close(f.reshape(-1, r.shape[-1]), r.reshape(-1, r.shape[-1]), torch.bfloat16)


def test_default_tiles_interpreted_against_fp64():
    """The tiles the GPU runs by default (GEMV (4, 1024, ...) at one token; grouped (128, 128, ...)
    past 96 rows per expert), interpreted at a small shape, against the reference and fp64."""
    H, I, E, k = CPU_SHAPES["user-mini"]
    assert fm.small_tiles(1, H, I, k)[:2] == (4, 1024) and fm.grouped_tiles(100 * E, E)[:2] == (128, 128)
    _check(1, (H, I, E, k), torch.bfloat16, seed=21, paths=("small",), bound=2 ** -6, vs_fp64=True)
    w13, w2, gate = _weights(H, I, E, torch.bfloat16, 22)
    x = _x(40, H, torch.bfloat16, 23)
    _, w, ids = route(x, gate, k, True)
    got = fm.experts_large(x, w13, w2, ids, w, tiles=fm.grouped_tiles(100 * E, E))
    assert_close(got, experts_grouped(x, w13, w2, ids, w), torch.bfloat16)
    exact = exact_fp64(x, w13, w2, ids, w)
    err = ((got.double() - exact).abs() / exact.abs().amax(-1, keepdim=True)).max().item()
    assert err <= 2 ** -6, err  # the bf16 intermediates' bound at the real shapes (module docstring)

