"""Fused sampling on CUDA, one program per row, no [R, V] temporaries (model/sampler.py has the
semantics and the torch reference).

filtered_gumbel_argmax (sample()'s path on CUDA): argmax over the vocabulary of x + Gumbel noise,
the noise hashed from (row key, vocab index) exactly as model/sampler.py's gumbel_noise does
(lowbias32 on uint32), over the tokens kept by top-k,
min-p and top-p, the row key hashed from the packed sampling row in the kernel. Every filter is a
threshold on the value (ties kept together), found exactly by a multi-way search over the
order-preserving integer keys of the fp32 values: each pass over the row evaluates S candidate
thresholds at once (counts for top-k, masses exp(x - max) for top-p) and narrows (L, H] to the
candidates' sub-interval holding the answer, cut to the least and largest values that pass found
in (L, H]; a pass that finds one distinct value there ends the search. The first pass of a search
places its candidates geometrically below the row max, later ones uniformly in value. The S
candidates are S scalars against S [BLOCK] accumulators (about 2 instructions per element and
candidate), and each loop step loads the next block while it counts this one. Passes over a row
of 151936 bf16-rounded logits / 0.8: top-p 0.9: 5 + the draw; top-k 50: 4 + 1; min-p 0.05 with
top-p 0.9: 3 + 1; no filter: the draw alone."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_PASSES = 64  # a search shrinks [L, H] every pass; this only bounds a pathological row


# Keys: key(x) = bits ^ ((bits >> 31) & 0x7FFFFFFF) on the int32 bits of x is an involution and
# orders as the floats do. Rows are compared as floats (-0.0 == 0.0); a value turned into a key
# is mapped from -0.0 to +0.0 first, so equal floats have equal keys.
# Search invariants for a threshold t* = min{t : F(t) < target} with F(t) = count or mass of
# {x > float(t)} (non-increasing): F(L) >= target (L may be the virtual bottom key(-inf) - 1,
# never evaluated) and F(H) < target (H = key(row max) at the start); t* = H once H - L <= 1.


@triton.jit
def _search(row, V, L, H, m, flo, target, MASS: tl.constexpr, BLOCK: tl.constexpr, S: tl.constexpr,
            MAX_PASSES: tl.constexpr):
    """Narrow (L, H] (int64 keys) to t*; F counts x > t (MASS false; target = k) or sums
    exp(x - m) over x > t against target * Z, Z = the sum over x >= flo (MASS true).
    Returns (t*, passes)."""
    NEG = -2139095041  # key(-inf)
    jv = tl.arange(0, S)
    n_pass = 0
    while (H - L > 1) & (n_pass < MAX_PASSES):
        # S ascending candidate keys strictly inside (L, H)
        if L < NEG:
            if n_pass == 0:  # geometric below the max: m - 2^4.5 .. m - 2^-3
                cf = m - tl.exp2(4.5 - jv.to(tl.float32) * (8.0 / S))
                cb = cf.to(tl.int32, bitcast=True)
                ck = (cb ^ ((cb >> 31) & 0x7FFFFFFF)).to(tl.int64)
            else:  # uniform in key space (a row holding -inf)
                ck = L + ((H - L) * (jv + 1).to(tl.int64)) // (S + 1)
        else:  # uniform in value over (L, H]
            l1 = (L + 1).to(tl.int32)
            vlo = (l1 ^ ((l1 >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
            h32 = H.to(tl.int32)
            vhi = (h32 ^ ((h32 >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
            cf = vlo + (vhi - vlo) * ((jv + 1).to(tl.float32) * (1.0 / (S + 1)))
            cb = cf.to(tl.int32, bitcast=True)
            ck = (cb ^ ((cb >> 31) & 0x7FFFFFFF)).to(tl.int64)
        ck = tl.minimum(tl.maximum(ck, L + 1), H - 1)
        c32 = ck.to(tl.int32)
        cf = (c32 ^ ((c32 >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        # candidates as S scalars and S [BLOCK] accumulators (tuples: no [BLOCK, S] broadcasts)
        cs = ()
        accs = ()
        for j in tl.static_range(S):
            cs = cs + (tl.max(tl.where(jv == j, cf, float("-inf")), 0),)
            accs = accs + (tl.zeros([BLOCK], tl.float32),)
        l1 = (L + 1).to(tl.int32)
        f_lo = (l1 ^ ((l1 >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)  # x in (L, H]: f_lo <= x <= f_hi
        h32 = H.to(tl.int32)
        f_hi = (h32 ^ ((h32 >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        zacc = tl.zeros([BLOCK], tl.float32)
        dmin = tl.full([BLOCK], float("inf"), tl.float32)  # least / largest x in (L, H]
        dmax = tl.full([BLOCK], float("-inf"), tl.float32)
        # masked lanes read NaN: every comparison false, so no count, mass or min / max
        nxt = tl.load(row + tl.arange(0, BLOCK), mask=tl.arange(0, BLOCK) < V, other=float("nan"))
        for v0 in range(0, V, BLOCK):
            offs = v0 + tl.arange(0, BLOCK)
            x = nxt  # the next block's load is in flight while this one is counted
            nxt = tl.load(row + BLOCK + offs, mask=offs + BLOCK < V, other=float("nan"))
            # (L, H] holds values, so its least / largest are those of x >= f_lo / x <= f_hi
            dmin = tl.minimum(dmin, tl.where(x >= f_lo, x, float("inf")))
            dmax = tl.maximum(dmax, tl.where(x <= f_hi, x, float("-inf")))
            new = ()
            if MASS:
                w = tl.where(x >= flo, tl.exp(x - m), 0.0)  # 0 below the floor and for NaN lanes
                zacc += w
                for j in tl.static_range(S):
                    new = new + (accs[j] + w * (x > cs[j]).to(tl.float32),)
            else:
                for j in tl.static_range(S):
                    new = new + (accs[j] + (x > cs[j]).to(tl.float32),)
            accs = new
        f = tl.zeros([S], tl.float32)  # F at each candidate
        for j in tl.static_range(S):
            f = tl.where(jv == j, tl.sum(accs[j], 0), f)
        if MASS:
            goal = target * tl.sum(zacc, 0)
        else:
            goal = target
        n_ge = tl.sum((f >= goal).to(tl.int32), 0)  # candidates with F >= target: a prefix of jv
        Ln = tl.max(tl.where(jv == n_ge - 1, ck, L), 0)
        Hn = tl.min(tl.where(jv == n_ge, ck, H), 0)
        lo_v = tl.min(dmin, 0)
        hi_v = tl.max(dmax, 0)
        lo_b = tl.where(lo_v == 0.0, 0.0, lo_v).to(tl.int32, bitcast=True)  # -0.0 -> +0.0
        lo_k = (lo_b ^ ((lo_b >> 31) & 0x7FFFFFFF)).to(tl.int64)
        hi_b = tl.where(hi_v == 0.0, 0.0, hi_v).to(tl.int32, bitcast=True)
        hi_k = (hi_b ^ ((hi_b >> 31) & 0x7FFFFFFF)).to(tl.int64)
        # (L, H] held one distinct value: that is t*; else the candidates' sub-interval, cut to the
        # values that were in (L, H] (found in this pass, so they narrow the next one)
        L = tl.where(lo_k == hi_k, hi_k - 1, tl.maximum(Ln, lo_k - 1))
        H = tl.where(lo_k == hi_k, hi_k, tl.minimum(Hn, hi_k))
        n_pass += 1
    return H, n_pass


@triton.jit
def _filtered_gumbel_kernel(x_ptr, stride, rows_ptr, row_stride, floor_ptr, m_ptr, greedy_ptr, out_ptr, thr_ptr,
                            pass_ptr, V, FILTERED: tl.constexpr, HAS_GREEDY: tl.constexpr, BLOCK: tl.constexpr,
                            S: tl.constexpr, MAX_PASSES: tl.constexpr):
    r = tl.program_id(0)
    prow = rows_ptr + r * row_stride  # the packed sampling row (model/sampler.py's ROW)
    if tl.load(prow).to(tl.float32, bitcast=True) > 0.0:
        row = x_ptr + r.to(tl.int64) * stride
        thr = float("-inf")
        passes = 0
        if FILTERED:
            m = tl.load(m_ptr + r)
            m = tl.where(m == 0.0, 0.0, m)  # -0.0 -> +0.0 (equal floats, equal keys)
            flo = tl.load(floor_ptr + r)
            flo = tl.where(flo == 0.0, 0.0, flo)
            k = tl.load(prow + 1)
            p = tl.load(prow + 2).to(tl.float32, bitcast=True)
            mb = m.to(tl.int32, bitcast=True)
            hi = (mb ^ ((mb >> 31) & 0x7FFFFFFF)).to(tl.int64)  # key(max)
            fb = flo.to(tl.int32, bitcast=True)
            lo = (fb ^ ((fb >> 31) & 0x7FFFFFFF)).to(tl.int64)  # key(min-p floor); key(-inf) when off
            lo = tl.minimum(lo, hi)
            if (k > 0) & (k < V):  # top-k: keep x >= the k-th largest value
                tk, n = _search(row, V, tl.full((), -2139095042, tl.int64), hi, m, flo, k.to(tl.float32),
                                False, BLOCK, S, MAX_PASSES)
                lo = tl.maximum(lo, tk)
                passes += n
            if p < 1.0:  # top-p on what top-k and min-p kept
                l32 = lo.to(tl.int32)
                flo2 = (l32 ^ ((l32 >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
                lo, n = _search(row, V, lo - 1, hi, m, flo2, p, True, BLOCK, S, MAX_PASSES)
                passes += n
            l32 = lo.to(tl.int32)
            thr = (l32 ^ ((l32 >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
            tl.store(thr_ptr + r, thr)
            tl.store(pass_ptr + r, passes)
        # the row's key, as model/sampler.py's row_keys: lowbias32 chained over step, seed high, seed low
        c1 = tl.full((), 0x7FEB352D, tl.uint32)
        c2 = tl.full((), 0x846CA68B, tl.uint32)
        key = tl.load(prow + 6).to(tl.uint32, bitcast=True) + tl.full((), 0x9E3779B9, tl.uint32)
        for t in tl.static_range(3):
            key = key ^ (key >> 16)
            key = key * c1
            key = key ^ (key >> 15)
            key = key * c2
            key = key ^ (key >> 16)
            if t < 2:
                key = key ^ tl.load(prow + 5 - t).to(tl.uint32, bitcast=True)
        # the draw: Gumbel-max over x >= thr, the noise as model/sampler.py's gumbel_noise
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_i = tl.zeros([BLOCK], tl.int32)
        nxt = tl.load(row + tl.arange(0, BLOCK), mask=tl.arange(0, BLOCK) < V, other=float("-inf"))
        for v0 in range(0, V, BLOCK):
            offs = v0 + tl.arange(0, BLOCK)
            msk = offs < V
            x = nxt  # the next block's load is in flight while this one is drawn
            nxt = tl.load(row + BLOCK + offs, mask=offs + BLOCK < V, other=float("-inf"))
            h = offs.to(tl.uint32) * tl.full((), 0x61C88647, tl.uint32) + tl.full((), 0x3C6EF372, tl.uint32)
            h = h ^ (h >> 16)
            h = h * c1
            h = h ^ (h >> 15)
            h = h * c2
            h = h ^ (h >> 16)
            h = key ^ h
            h = h ^ (h >> 16)
            h = h * c1
            h = h ^ (h >> 15)
            h = h * c2
            h = h ^ (h >> 16)
            bits = h >> 8
            u = (bits.to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            s = x - tl.log(-tl.log(u))
            s = tl.where(msk & (x >= thr), s, float("-inf"))  # NaN (x = -inf, noise inf) never wins
            take = s > best
            best = tl.where(take, s, best)
            best_i = tl.where(take, offs, best_i)
        top = tl.max(best, 0)
        idx = tl.min(tl.where(best == top, best_i, 2147483647), 0)
        tl.store(out_ptr + r, idx.to(tl.int64))
    elif HAS_GREEDY:
        tl.store(out_ptr + r, tl.load(greedy_ptr + r))


def filtered_gumbel_argmax(x_RV: torch.Tensor, rows_R: torch.Tensor, floor_R: torch.Tensor | None = None,
                           max_R: torch.Tensor | None = None, greedy_R: torch.Tensor | None = None,
                           block: int | None = None, s: int = 8, num_warps: int | None = None, passes: bool = False):
    """Gumbel-max over each sampled row's kept tokens {x >= thr} (model/sampler.py's semantics).
    x fp32 [R, V] (rows contiguous); rows int32 [R, ROW] packed sampling rows (temperature > 0:
    sampled; top_k, top_p; seed and step for the noise); floor fp32 [R] = min_p_floor (-inf: no
    min-p) and max fp32 [R] = x.amax(-1), or both None: no filters at all (thr = -inf);
    greedy int64 [R]: the token of rows with temperature 0 (else their token is garbage). block
    (elements per loop step), s (candidates per search pass, a power of 2), num_warps: tuning.
    Returns (int64 [R] tokens, fp32 [R] thr), and int32 [R] search passes if passes; thr and
    passes are garbage for greedy rows."""
    R, V = x_RV.shape
    dev = x_RV.device
    out = torch.empty(R, dtype=torch.int64, device=dev)
    thr = torch.full((R,), float("-inf"), dtype=torch.float32, device=dev)
    n_pass = torch.zeros(R, dtype=torch.int32, device=dev)
    filtered = floor_R is not None
    if block is None:  # few rows: more warps per row; many: more rows per SM
        block, num_warps = (2048, 16) if R < 128 else (1024, 8)
    if R:
        _filtered_gumbel_kernel[(R,)](
            x_RV, x_RV.stride(0), rows_R, rows_R.stride(0), floor_R if filtered else thr, max_R if filtered else thr,
            greedy_R if greedy_R is not None else out, out, thr, n_pass, V, FILTERED=filtered,
            HAS_GREEDY=greedy_R is not None, BLOCK=block, S=s, MAX_PASSES=_MAX_PASSES, num_warps=num_warps)
    return (out, thr, n_pass) if passes else (out, thr)
