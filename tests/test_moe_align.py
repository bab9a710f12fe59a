"""The MoE's grouping of (token, expert) pairs by expert (model/moe_align.py): the Triton align
(align_wide, three launches over many programs) against the torch ops (align_by_expert) on seeded
random expert ids. Without CUDA they run under the interpreter at small shapes (test_fused_moe
sets it up); @pytest.mark.gpu cases use the 30b shape's decode and prefill sizes."""
import pytest
import torch

import test_fused_moe as tfm  # sets TRITON_INTERPRET on CPU and reloads the kernel modules

_CUDA, DEV, fm, ma = tfm._CUDA, tfm.DEV, tfm.fm, tfm.ma


def test_align_by_expert_pads_each_expert_to_the_tile():
    E, BM, k = 6, 4, 2
    ids = torch.tensor([[5, 0], [0, 2], [5, 0], [2, 5], [0, 1]], device=DEV)
    pairs, bexp = ma.align_by_expert(ids, E, BM)
    flat = ids.reshape(-1).tolist()
    P = len(flat)
    seen = []
    for b, e in enumerate(bexp.tolist()):
        rows = pairs[b * BM:(b + 1) * BM].tolist()
        if e >= E:
            assert rows == [P] * BM
            continue
        real = [r for r in rows if r < P]
        assert real and all(flat[r] == e for r in real) and rows == real + [P] * (BM - len(real))
        seen += real
    assert sorted(seen) == list(range(P))


def _assert_same_grouping(got, want, P):
    """Two aligns group alike: the same block experts, padding on the same rows, and each expert's
    run holding the same pairs (their order within a run is free: a row's GEMM result does not
    depend on its row in the tile)."""
    (pg, bg), (pw, bw) = got, want
    assert torch.equal(bg, bw) and torch.equal(pg == P, pw == P)
    BM = pw.numel() // bw.numel()
    row_expert = bw.repeat_interleave(BM)
    key = lambda pairs: torch.sort(row_expert * (P + 1) + pairs).values
    assert torch.equal(key(pg), key(pw))


def _align_ids(N, k, E, case, seed):
    """[N, k] expert ids: k distinct random experts a token ("random"), every token on experts
    0..k-1 ("all"), or only the lower half of the experts ever chosen ("empty")."""
    g = torch.Generator().manual_seed(seed)
    if case == "all":
        return torch.arange(k).repeat(N, 1).to(DEV)
    hi = E // 2 if case == "empty" else E
    return torch.stack([torch.randperm(hi, generator=g)[:k] for _ in range(N)]).to(DEV)


@pytest.mark.parametrize("N,k,E,BM,tile,case", [(5, 2, 6, 4, 4, "random"), (3, 8, 128, 128, 8, "random"),
                                                (40, 8, 128, 16, 32, "random"), (37, 8, 60, 32, 64, "random"),
                                                (300, 8, 32, 64, 256, "random"), (300, 8, 128, 16, None, "random"),
                                                (40, 8, 128, 16, 32, "all"), (33, 4, 16, 16, 16, "empty")])
def test_align_over_many_programs_equals_the_torch_ops(N, k, E, BM, tile, case):
    """align_wide groups as align_by_expert does, its count and place launches over 3 to 19
    programs (tile: pairs per program; None: WIDE_TILE): P not a multiple of the tile (a last
    program part full), P below one row tile (24 pairs, BM 128), tiles of two 128-pair one-hot
    steps (256), a non-power-of-two E, every token on the same experts, half the experts empty.
    A count missing any program's pairs, or part of them, moves block experts and padding."""
    ids = _align_ids(N, k, E, case, N * 1000 + E + 7)
    P, tile = ids.numel(), tile or ma.WIDE_TILE
    assert -(-P // tile) >= 3  # several programs count and place
    _assert_same_grouping(ma.align_wide(ids, E, BM, tile), ma.align_by_expert(ids, E, BM), P)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
@pytest.mark.parametrize("N,case", [(16, "random"), (64, "random"), (256, "random"), (512, "random"),
                                    (256, "all")])
def test_align_over_many_programs_on_gpu_at_decode_batches(N, case):
    """The decode batches of the 30b shape (128 experts, top-8, the grouped path's BM for N * 8
    pairs): align() (align_wide on CUDA) groups as align_by_expert does on the device, its atomics
    racing; "all": every token on experts 0-7 (256 pairs race for each cursor)."""
    E, k = 128, 8
    ids = _align_ids(N, k, E, case, N)
    BM = fm.grouped_tiles(N * k, E)[0]
    _assert_same_grouping(ma.align(ids, E, BM), ma.align_by_expert(ids, E, BM), ids.numel())


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA, reason="needs CUDA")
@pytest.mark.parametrize("N,case", [(2048, "random"), (4096, "random"), (8192, "random"), (2048, "all"),
                                    (8192, "all")])
def test_align_over_many_programs_on_gpu_at_prefill(N, case):
    """The 30b shape's prefill (128 experts, top-8, BM 128): align_wide groups as align_by_expert
    does on the device, its count and place atomics racing over 128 to 512 programs; "all": every
    token on experts 0-7 (N pairs race for each cursor)."""
    E, k = 128, 8
    ids = _align_ids(N, k, E, case, N)
    BM = fm.grouped_tiles(N * k, E)[0]
    assert BM == 128
    _assert_same_grouping(ma.align_wide(ids, E, BM), ma.align_by_expert(ids, E, BM), ids.numel())
