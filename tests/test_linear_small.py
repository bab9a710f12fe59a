"""The small-token dense GEMV (model/linear_triton.py) and PDL launches (model/pdl.py). Without CUDA
the kernel runs under TRITON_INTERPRET=1 at small shapes; @pytest.mark.gpu cases use the real
projection shapes and check that PDL changes no result inside a decode CUDA graph.

Bound: the kernel accumulates in fp32 and rounds once, so each output is within half a bf16 step
(2^-8 of its magnitude) of the fp64 product, plus the fp32 accumulation error (far below it at
these K: 1e-3 of the step is allowed for it)."""
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from model import linear_triton as lt  # noqa: E402

if not _CUDA:
    lt = importlib.reload(lt)
DEV = "cuda" if _CUDA else "cpu"


def _check_vs_fp64(T: int, N: int, K: int, dtype: torch.dtype, seed: int, tiles=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g).to(DEV, dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(DEV, dtype)
    y = lt.linear_small(x, w, tiles)
    assert y.shape == (T, N) and y.dtype == dtype
    exact = x.double() @ w.double().T
    half_step = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -24
    bound = exact.abs() * half_step * (1 + 1e-3) + 1e-6 * exact.abs().max()
    over = (y.double() - exact).abs() - bound
    assert over.max().item() <= 0, f"T={T} N={N} K={K}: {over.max().item():.3g} over the bound"
    return y


@pytest.mark.parametrize("T,N,K", [(1, 40, 64), (2, 24, 96), (3, 130, 200), (8, 128, 256), (5, 7, 33)])
def test_linear_small_against_fp64(T, N, K):
    """Ragged N and K (masks), each token count class, bf16 and fp32."""
    _check_vs_fp64(T, N, K, torch.bfloat16, seed=T * 1000 + N)
    _check_vs_fp64(T, N, K, torch.float32, seed=T * 1000 + N + 1)


def test_linear_small_tiles_and_zero_weight_rows():
    """A non-default tile gives the same result as the default (each output row is one program's
    fp32 dot product either way, summed over the same K chunks or finer), and a zero row is 0."""
    y = _check_vs_fp64(4, 64, 128, torch.bfloat16, seed=5)
    assert torch.allclose(_check_vs_fp64(4, 64, 128, torch.bfloat16, seed=5, tiles=(2, 64, 4)).float(), y.float(),
                          rtol=2 ** -7, atol=0)
    x = torch.randn(2, 32, device=DEV, dtype=torch.bfloat16)
    w = torch.zeros(8, 32, device=DEV, dtype=torch.bfloat16)
    assert lt.linear_small(x, w).eq(0).all()


@pytest.mark.parametrize("T", [0, lt.MAX_TOKENS + 1])
def test_linear_small_rejects_token_counts_outside_its_range(T):
    x = torch.randn(T, 16, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="linear_small takes 1 to"):
        lt.linear_small(x, torch.randn(8, 16, device=DEV, dtype=torch.bfloat16))


def test_backend_linear_switch():
    """Backend.linear runs the GEMV up to linear_small_max tokens and torch above; the reference
    backend never does."""
    from model.backend import Backend
    be = Backend("ref", "torch", False, linear_small_max=2)
    w = torch.randn(16, 32, device=DEV, dtype=torch.bfloat16)
    calls = []
    real = lt.linear_small
    lt.linear_small = lambda x, w_: calls.append(x.shape[0]) or real(x, w_)
    try:
        for T in (1, 2, 3):
            x = torch.randn(T, 32, device=DEV, dtype=torch.bfloat16)
            torch.testing.assert_close(be.linear(x, w).float(), F.linear(x, w).float(), rtol=2 ** -7, atol=1e-3)
        assert be.reference().linear_small_max == 0
    finally:
        lt.linear_small = real
    assert calls == [1, 2]


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="CUDA")
@pytest.mark.parametrize("preset", ["qwen3-30b-a3b", "user-config", "qwen3-235b-a22b"])
def test_linear_small_real_shapes_on_gpu(preset):
    """The fused qkv, o_proj and router shapes at 1 to MAX_TOKENS tokens, PDL on and off: within
    the bound of fp64, and within one bf16 step of cuBLAS."""
    from model import pdl
    # (hidden, q heads, kv heads, experts); head_dim 128 (user-config: ../shared/docs/user-config.json)
    H, nq, nkv, E = {"qwen3-30b-a3b": (2048, 32, 4, 128), "user-config": (6144, 48, 8, 128),
                     "qwen3-235b-a22b": (4096, 64, 4, 128)}[preset]
    for N, K in (((nq + 2 * nkv) * 128, H), (H, nq * 128), (E, H)):
        for T in (1, 2, 3, 4, 8):
            outs = []
            for on in (True, False):  # PDL on: its own tile at one token (one K step up to 4096)
                pdl.set_enabled(on)
                try:
                    outs.append(_check_vs_fp64(T, N, K, torch.bfloat16, seed=T + N))
                finally:
                    pdl.set_enabled(None)
            g = torch.Generator().manual_seed(T + N)
            x = torch.randn(T, K, generator=g).to(DEV, torch.bfloat16)
            w = (torch.randn(N, K, generator=g) / K ** 0.5).to(DEV, torch.bfloat16)
            cub = F.linear(x, w).double()
            # each rounds its own fp32 sum once; the two sums differ by at most K fp32 steps of sum |x w|
            mag = x.double().abs() @ w.double().abs().T
            bound = 2.0 ** -8 * (outs[0].double().abs() + cub.abs()) + K * 2.0 ** -24 * mag
            assert ((outs[0].double() - cub).abs() <= bound).all()


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="CUDA")
def test_pdl_changes_no_result_in_the_decode_graph(monkeypatch):
    """Two layers of the 30b shape, decode at batch 1, 3 and 8 replayed from CUDA graphs: with PDL
    the outputs and the KV cache equal, bit for bit, those of the same kernels launched without it
    (a missing wait would read a half-written input). The attention's split count is the engine's
    (graphs captured at the model's length: most splits hold no key). Both use the GEMV tiles PDL
    picks, whose summation order differs from the others'."""
    from loader.dummy import dummy_config, fill_dummy
    from model import linear_triton, pdl
    tiles = linear_triton.small_linear_tiles
    monkeypatch.setattr(linear_triton, "small_linear_tiles", lambda T, N, K, prefetch=False: tiles(T, N, K, True))
    from model.batch import AttnBatch
    from model.stage import Stage
    cfg = dummy_config("qwen3-30b-a3b")
    stage = fill_dummy(Stage(cfg, 0, 2, False, False, torch.device("cuda"), torch.bfloat16))
    stage.allocate_kv(64, 16)
    assert stage.backend.linear_small_max > 0
    for B in (1, 3, 8):
        x = torch.randn(B, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
        ctxs = [40 + 9 * i for i in range(B)]  # up to 103 tokens: 7 blocks of 16
        batch = AttnBatch.build([1] * B, ctxs, [[8 * i + j for j in range(-(-c // 16))] for i, c in enumerate(ctxs)],
                                16, [True] * B, "cuda")
        batch.max_context = cfg.max_position_embeddings
        got = []
        for on in (False, True):
            pdl.set_enabled(on)
            try:
                stage.kv_cache.zero_()
                with torch.inference_mode():
                    stage(x, batch)  # compile, then capture
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        out = stage(x, batch)
                    stage.kv_cache.zero_()
                    for _ in range(3):
                        graph.replay()
                    torch.cuda.synchronize()
                got.append((out.clone(), stage.kv_cache.clone()))
            finally:
                pdl.set_enabled(None)
        for out, kv in got[1:]:
            assert torch.equal(out, got[0][0]) and torch.equal(kv, got[0][1]), f"batch {B}"


def test_pdl_selection(monkeypatch):
    """Whether a CUDA launch gets PDL (the capability check stubbed, so it runs on CPU): on by
    default, off after set_enabled(False), on CPU, under the interpreter and before Hopper; the
    environment cannot change it."""
    from model import pdl
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(pdl, "_capable", lambda index: True)
    cuda = torch.device("cuda", 0)
    assert pdl.launch_args(cuda) == {"PDL": 1, "launch_pdl": True}
    monkeypatch.setenv("MOEPIPE_PDL", "0")  # the lost switch: no longer read
    assert pdl.enabled(cuda)
    try:
        pdl.set_enabled(False)
        assert pdl.launch_args(cuda) == {"PDL": 0}
    finally:
        pdl.set_enabled(None)
    assert pdl.enabled(cuda)
    assert not pdl.enabled(torch.device("cpu"))
    monkeypatch.setattr(pdl, "_capable", lambda index: False)  # before Hopper: off
    assert not pdl.enabled(cuda)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(pdl, "_capable", lambda index: True)
    assert not pdl.enabled(cuda)
