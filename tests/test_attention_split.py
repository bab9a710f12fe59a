"""model/attention_split.py (a chunk as prefix-without-mask + own-keys-causal, merged by lse) against
the fp32 torch reference of test_attention_kernels (NaN-poisoned pools, shuffled block tables).

The "math" backend runs everywhere and checks the decomposition, the GQA row stacking and the
merge; @pytest.mark.gpu cases run the cuDNN and FlashAttention backends at the real shape
(32 q / 4 kv heads, head_dim 128, bf16) at offsets up to 100k."""
from __future__ import annotations

import pytest
import torch

import test_attention_kernels as tak

from model import attention_split as sp
from model.batch import AttnBatch


def meta(qlens, ctxs, bt, qs, cl) -> AttnBatch:
    """The AttnBatch of a make_case (positions, slots and logits rows unused by attention)."""
    none = torch.empty(0, dtype=torch.int64, device=bt.device)
    return AttnBatch(none, none, bt, qs, cl, none, query_lens=qlens, context_lens=ctxs)


def decode_ref(q, kc, vc, bt, cl, scale, max_context):
    """The single-query rows through the reference (the engine passes the Triton decode kernel)."""
    ctxs = cl.tolist()
    return tak.ref_fp32(q, kc, vc, bt, [1] * len(ctxs), ctxs, scale).to(q.dtype)


def run(qlens, ctxs, N, K, D, S, dtype, backend, seed=None):
    q, kc, vc, bt, qs, cl = tak.make_case(qlens, ctxs, N, K, D, S, dtype, seed=seed)
    batch = meta(qlens, ctxs, bt, qs, cl)
    o = sp.prefill_split(q, kc, vc, batch, D ** -0.5, decode_ref, backend)
    ref = tak.ref_fp32(q, kc, vc, bt, qlens, ctxs, D ** -0.5)
    return tak.check(o, ref, dtype, f"split/{backend} N{N} K{K} S{S} q{qlens} ctx{ctxs}")


@pytest.mark.parametrize("N,K", [(4, 4), (8, 4), (8, 2), (16, 1)])  # GQA groups 1, 2, 4, 16
@pytest.mark.parametrize("S", [16, 64])
def test_math_backend_matches_reference(N, K, S):
    # offsets 0 (fresh), mid-block and on a block boundary; a decode row mixed in
    qlens, ctxs = [37, 1, 20, 48], [37, 90, 20 + 3 * S + 5, 48 + 2 * S]
    run(qlens, ctxs, N, K, 32, S, torch.float32, "math")


def test_math_backend_bf16():
    run([64, 33], [64 + 200, 33 + 17], 8, 2, 64, 16, torch.bfloat16, "math")


def test_lse_merge_weighs_both_parts():
    # one query, one prefix key and one own key: the merge must give their softmax-weighted mean
    q = torch.tensor([[[1.0, 0.0]]])  # [1, 1, 2]
    k = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]])  # prefix key scores 2, own key scores 0
    v = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    out = sp.chunk_attend(q, k, v, 1.0, "math")
    w = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    torch.testing.assert_close(out[0, 0], w[0] * v[0, 0] + w[1] * v[1, 0])


def test_bad_backend_is_named():
    q, kc, vc, bt, qs, cl = tak.make_case([4], [8], 2, 1, 16, 16, torch.float32, seed=0)
    batch = meta([4], [8], bt, qs, cl)
    with pytest.raises(ValueError, match="'nope'"):
        sp.prefill_split(q, kc, vc, batch, 0.25, decode_ref, "nope")


@pytest.mark.gpu
@pytest.mark.skipif(not tak._CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["cudnn", "flash"])
@pytest.mark.parametrize("qlens,ctxs", [([4096], [4096]), ([2048, 1, 216], [2048 + 40000, 5000, 100_000 + 216])])
def test_vendor_backends_real_shape(backend, qlens, ctxs):
    try:
        run(qlens, ctxs, 32, 4, 128, 16, torch.bfloat16, backend, seed=1)
    except RuntimeError as e:  # cuDNN attention may be missing from a build; flash never is on sm_80+
        if backend != "cudnn" or "cudnn" not in str(e).lower():
            raise
        pytest.skip(f"{backend}: {str(e)[:200]}")
