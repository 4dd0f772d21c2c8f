"""Triton kernels of :mod:`normlab.kernels.triton_kernels` (the launchers live there).

This module imports only ``triton``, so the ahead-of-time compile check
(:mod:`normlab.kernels.triton_aot`) can load it into any Python that has a triton — e.g. a
venv holding the GPU machine's triton version without torch.

Exact statistics, whatever the data (outliers up to 1e6, sets keeping one value, |μ|/σ of
1e8): every pass accumulates per *lane* (one element position of the register tile) the
shifted sums ``Σ(x − s)``, ``Σ(x − s)²`` where the lane's shift ``s`` is the first value the
lane took into the set. ``x − s`` is then exact for data near ``s`` (Sterbenz), so no
cancellation happens inside a lane; lanes, then programs, are merged with Chan, Golub and
LeVeque's pairwise update (count, mean, M2), the mean carried as a float32 pair
``ref + delta`` (``ref`` a float32 near the data, ``delta`` small), so ``x − μ`` is computed as
``(x − ref) − delta`` without losing the digits of a large mean. The filtered moments
(Horváth & Al-afandi 2020, arXiv 2010.08251, eq. 4–7) are accumulated the same way over the
kept values only, so they are centred on their own mean, never on the plain one. Normalize:
``y = (x − ref)·γr + (β − delta·γr)``.

NaN and Inf: a set holding NaN or ±Inf gets NaN mean/variance (no value passes the filter, so
the set falls back to its plain moments and count, as the reference does) and NaN outputs;
TLU and affine TLU keep a NaN ``y`` (``z = τ if y < τ else y``), like ``torch.relu``.
No ``tl.maximum``/``tl.minimum`` touches data: on a GPU they drop NaN.

Compile-safety rule (triton 3.6 asserts in ``OptimizeThreadLocality`` otherwise): no loop
carries an accumulator fed by a reduction — loops accumulate register tiles, reductions run
after the loop. ``tests/test_triton_aot.py`` checks the rule and compiles every kernel for
sm_80 and sm_90.

Statistics buffer ``STATS`` (float32, shape (11, sets): ``triton_kernels.STATS_ROWS``), rows:
0 mean0, 1 var0 (plain moments), 2 mean, 3 var (final: filtered, or plain), 4 rstd
``(var + ε)^(-1/2)``, 5 count M, 6 ref0, 7 delta0 (plain mean as a pair), 8 ref, 9 delta
(final mean as a pair), 10 rstd0 ``(var0 + ε)^(-1/2)`` (the filter's scale). Rows 0–5 are the
public statistics (mean = ref + delta rounded); backward reads the pairs.
"""

import triton
import triton.language as tl



@triton.jit
def _f32(v):
    """An integer argument (possibly specialized to a constant) as a float32 scalar."""
    return tl.full((), 1.0, tl.float32) * v


@triton.jit
def _rsqrt(v):
    """``v^(-1/2)`` correctly rounded (the approximate forms differ by a few ulp)."""
    return tl.div_rn(1.0, tl.sqrt_rn(v))


@triton.jit
def _accumulate(x, f, k, sh, s1, s2, CENTERED: tl.constexpr):
    """Take the values ``x`` where ``f`` into per-lane sums: count ``k``, shift ``sh`` (the
    lane's first value), ``s1 = Σ(x − sh)``, ``s2 = Σ(x − sh)²``; uncentered ``s2 = Σx²``."""
    if CENTERED:
        sh = tl.where(f & (k == 0.0), x, sh)
        u = tl.where(f, x - sh, 0.0)
        s1 += u
        s2 += u * u
    else:
        u = tl.where(f, x, 0.0)
        s2 += u * u
    k += tl.where(f, 1.0, 0.0)
    return k, sh, s1, s2


@triton.jit
def _zero_lanes(A: tl.constexpr, B: tl.constexpr):
    """Four (A, B) float32 zero tiles: a lane set's count, shift and two sums."""
    z = tl.zeros((A, B), tl.float32)
    return z, z, z, z


@triton.jit
def _lane_moments(k, sh, s1, s2, CENTERED: tl.constexpr):
    """Per lane: mean as ``sh + e`` and ``M2 = Σ(x − mean)²`` (uncentered: e = 0, M2 = Σx²)."""
    if CENTERED:
        e = s1 / tl.where(k > 0.0, k, 1.0)
        m2 = s2 - s1 * e
        m2 = tl.where(m2 < 0.0, 0.0, m2)  # rounding; NaN stays NaN
    else:
        e = s1
        m2 = s2
    return e, m2


@triton.jit
def _merge(k, hi, lo, m2, AXIS: tl.constexpr, CENTERED: tl.constexpr):
    """Merge parts (count k, mean hi + lo, M2) along AXIS (Chan, Golub & LeVeque 1979):
    ``n = Σk``, ``ref`` = float32 mean, ``d = Σk·((hi − ref) + lo)/n``,
    ``M2 = Σ(m2 + k·((hi − ref) + lo − d)²)``. Returns (n, ref, d, M2); mean = ref + d.
    Uncentered: ref = d = 0, M2 = Σm2 (= Σx²)."""
    n = tl.sum(k, AXIS)
    if CENTERED:
        nn = tl.where(n > 0.0, n, 1.0)
        ref = tl.sum(k * (hi + lo), AXIS) / nn
        dl = tl.where(k > 0.0, (hi - tl.expand_dims(ref, AXIS)) + lo, 0.0)
        d = tl.sum(k * dl, AXIS) / nn
        dd = dl - tl.expand_dims(d, AXIS)
        big = tl.sum(m2 + k * dd * dd, AXIS)
    else:
        ref = n * 0.0
        d = n * 0.0
        big = tl.sum(m2, AXIS)
    return n, ref, d, big


@triton.jit
def _plain_moments(big, ref, d, m, eps):
    """From a set's merge (M2 = big, mean ref + d): (var0, r0 = (var0 + ε)^(-1/2)) and the
    final moments (ref, d, var, count) as they stand without a filter."""
    var0 = big / m
    return var0, _rsqrt(var0 + eps), ref, d, var0, tl.zeros_like(var0) + m


@triton.jit
def _filtered_or_plain(kept, ref_f, d_f, m2_f, ref0, d0, var0, m, kap):
    """The filtered moments, or the plain ones where a set kept nothing (NaN/Inf sets too);
    the variance divided by κ (Gaussian-consistent filtering, else κ = 1)."""
    none = kept == 0.0
    ref = tl.where(none, ref0, ref_f)
    d = tl.where(none, d0, d_f)
    var = tl.where(none, var0, m2_f / tl.where(none, 1.0, kept))
    # a set whose plain variance is not finite (NaN, or an uncentered ν² = Inf) is NaN
    # even where its kept values are finite, as in the reference (0·Inf in Σ f x²)
    var = tl.where(var0 <= 3.4028234663852886e38, var, var0 - var0)
    cnt = tl.where(none, m, kept)
    return ref, d, var / kap, cnt


@triton.jit
def _keep(x, ref0, d0, r0, thr):
    """Filter decision ``|x − μ0| r0 ≤ T`` ([HA20] eq. 5); NaN is never kept."""
    return tl.abs(((x - ref0) - d0) * r0) <= thr


@triton.jit
def _kept_weight(x, ref0, d0, r0, thr, partial):
    """1.0 where a value took part in the filtered moments — every value of a set that kept
    all or fell back to its plain moments (``partial`` false) — else 0.0."""
    return tl.where(_keep(x, ref0, d0, r0, thr), 1.0, tl.where(partial, 0.0, 1.0))


@triton.jit
def _store_stats(STATS, S, s, smask, ref0, d0, var0, r0, ref, d, var, rstd, cnt):
    tl.store(STATS + 0 * S + s, ref0 + d0, mask=smask)
    tl.store(STATS + 1 * S + s, var0, mask=smask)
    tl.store(STATS + 2 * S + s, (ref + d), mask=smask)
    tl.store(STATS + 3 * S + s, var, mask=smask)
    tl.store(STATS + 4 * S + s, rstd, mask=smask)
    tl.store(STATS + 5 * S + s, cnt, mask=smask)
    tl.store(STATS + 6 * S + s, ref0, mask=smask)
    tl.store(STATS + 7 * S + s, d0, mask=smask)
    tl.store(STATS + 8 * S + s, ref, mask=smask)
    tl.store(STATS + 9 * S + s, d, mask=smask)
    tl.store(STATS + 10 * S + s, r0, mask=smask)


@triton.jit
def _load_stats(STATS, S, s, smask):
    """(ref0, d0, r0, ref, d, rstd, cnt) of sets s (see the module docstring)."""
    ref0 = tl.load(STATS + 6 * S + s, mask=smask, other=0.0)
    d0 = tl.load(STATS + 7 * S + s, mask=smask, other=0.0)
    r0 = tl.load(STATS + 10 * S + s, mask=smask, other=1.0)
    ref = tl.load(STATS + 8 * S + s, mask=smask, other=0.0)
    d = tl.load(STATS + 9 * S + s, mask=smask, other=0.0)
    rstd = tl.load(STATS + 4 * S + s, mask=smask, other=1.0)
    cnt = tl.load(STATS + 5 * S + s, mask=smask, other=1.0)
    return ref0, d0, r0, ref, d, rstd, cnt


@triton.jit
def _activation(y, t, k, ACT: tl.constexpr):
    """ACT 1: TLU ``max(y, τ)`` (FRN, Singh & Krishnan 2019, arXiv 1911.09737, eq. 3; ReLU is
    τ = 0); ACT 2: affine TLU ``max(y, κy + τ)``. A NaN ``y`` stays NaN."""
    if ACT == 1:
        y = tl.where(y < t, t, y)
    if ACT == 2:
        h = k * y + t
        y = tl.where(y < h, h, y)
    return y


@triton.jit
def _activation_grads(y, dz, t, k, ACT: tl.constexpr):
    """(∂ℓ/∂y, the part of ∂ℓ/∂z that reaches τ) of :func:`_activation`; NaN y → y branch."""
    dy = dz
    rest = dz * 0.0
    if ACT == 1:
        low = y < t
        dy = tl.where(low, 0.0, dz)
        rest = tl.where(low, dz, 0.0)
    if ACT == 2:
        low = y < k * y + t
        dy = tl.where(low, dz * k, dz)
        rest = tl.where(low, dz, 0.0)
    return dy, rest


@triton.jit
def _grad_terms(x, dz, valid, ref, d, a, c, t, k, ACT: tl.constexpr):
    """Per value: ∂ℓ/∂y, x − μ (0 outside the set), and the TLU's ∂ℓ/∂τ and ∂ℓ/∂κ parts
    (``rest``, ``rest·y``); ``ref, d, a = γr, c = β − d·a, t, k`` broadcast against x."""
    xc = tl.where(valid, (x - ref) - d, 0.0)
    y = (x - ref) * a + c
    dy, rest = _activation_grads(y, dz, t, k, ACT)
    return dy, xc, rest, tl.where(valid, rest * y, 0.0)


@triton.jit
def _store_grad_sums(WS, row, mask, c1, c2, c3, c4, rstd):
    """WS[row] = (Σ∂ℓ/∂y, Σ∂ℓ/∂y·x̂, Σ∂ℓ/∂τ, Σ∂ℓ/∂κ) of the tiles' rows; returns the first two."""
    s_dy = tl.sum(c1, 1)
    s_dyxhat = tl.sum(c2, 1) * rstd
    tl.store(WS + row * 4 + 0, s_dy, mask=mask)
    tl.store(WS + row * 4 + 1, s_dyxhat, mask=mask)
    tl.store(WS + row * 4 + 2, tl.sum(c3, 1), mask=mask)
    tl.store(WS + row * 4 + 3, tl.sum(c4, 1), mask=mask)
    return s_dy, s_dyxhat


@triton.jit
def _dx_coefficients(rstd, sg, sgx, cnt, kap, CENTERED: tl.constexpr):
    """(Bc, Cc) of ∂ℓ/∂x = γr ∂ℓ/∂y − f (Bc + (x − μ) Cc): Bc = rΣg/M (0 uncentered),
    Cc = r² Σg x̂/(κM)."""
    if CENTERED:
        bc = rstd * sg / cnt
    else:
        bc = tl.zeros_like(sgx)
    return bc, rstd * rstd * sgx / (kap * cnt)


@triton.jit
def _dx_tile(x, dz, ref, d, a, c, t, k, ref0, d0, r0, thr, partial, bc, cc,
             ACT: tl.constexpr, FILTER: tl.constexpr):
    """∂ℓ/∂x of a tile (the mask and the TLU decision recomputed from x)."""
    y = (x - ref) * a + c
    dy, rest = _activation_grads(y, dz, t, k, ACT)
    f = 1.0
    if FILTER:
        f = _kept_weight(x, ref0, d0, r0, thr, partial)
    return a * dy - f * (bc + ((x - ref) - d) * cc)


# ---- rows: one program per row (GN, LN, IN/FRN on contiguous tensors) ------------------
# Row s = n·G + g starts at n·stride_n + g·stride_g; its values (j, l), j < channels,
# l < positions, lie at j·stride_c + l·stride_l; the parameter index of (s, j) is g·channels + j.

@triton.jit
def _row_tile(X, base, j0, l0, channels, positions, stride_c, stride_l,
              BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr):
    j = j0 + tl.arange(0, BLOCK_J)
    l = l0 + tl.arange(0, BLOCK_L)
    valid = (j[:, None] < channels) & (l[None, :] < positions)
    offs = base + j[:, None].to(tl.int64) * stride_c + l[None, :].to(tl.int64) * stride_l
    x = tl.load(X + offs, mask=valid, other=0.0).to(tl.float32)
    return x, offs, valid, j


@triton.jit
def _vector_params(W, B, TAU, AK, pidx, pmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   ACT: tl.constexpr, BLOCK: tl.constexpr):
    """γ, β, τ, κ at parameter indices pidx (1, 0, 0, 0 where absent)."""
    if HAS_W:
        w = tl.load(W + pidx, mask=pmask, other=1.0).to(tl.float32)
    else:
        w = tl.full((BLOCK,), 1.0, tl.float32)
    if HAS_B:
        bb = tl.load(B + pidx, mask=pmask, other=0.0).to(tl.float32)
    else:
        bb = tl.zeros((BLOCK,), tl.float32)
    t = tl.zeros((BLOCK,), tl.float32)
    k = tl.zeros((BLOCK,), tl.float32)
    if ACT >= 1:
        t = tl.load(TAU + pidx, mask=pmask, other=0.0).to(tl.float32)
    if ACT == 2:
        k = tl.load(AK + pidx, mask=pmask, other=0.0).to(tl.float32)
    return w, bb, t, k


@triton.jit
def _row_moments(X, base, channels, positions, stride_c, stride_l, ref0, d0, r0, thr,
                 FILTERED: tl.constexpr, CENTERED: tl.constexpr, BLOCK_J: tl.constexpr,
                 BLOCK_L: tl.constexpr):
    """(count, ref, delta, M2) of one row's values — all of them, or (FILTERED) those
    passing the filter around the plain moments (ref0 + d0, r0)."""
    k, sh, s1, s2 = _zero_lanes(BLOCK_J, BLOCK_L)
    for j0 in range(0, channels, BLOCK_J):
        for l0 in range(0, positions, BLOCK_L):
            x, offs, valid, j = _row_tile(X, base, j0, l0, channels, positions, stride_c,
                                          stride_l, BLOCK_J, BLOCK_L)
            f = valid
            if FILTERED:
                f = valid & _keep(x, ref0, d0, r0, thr)
            k, sh, s1, s2 = _accumulate(x, f, k, sh, s1, s2, CENTERED)
    e, m2 = _lane_moments(k, sh, s1, s2, CENTERED)
    n_j, ref_j, d_j, m2_j = _merge(k, sh, e, m2, 1, CENTERED)
    return _merge(n_j, ref_j, d_j, m2_j, 0, CENTERED)


@triton.jit
def rows_fwd_kernel(X, Y, W, B, TAU, AK, EPSX, STATS,
                    rows, groups, stride_n, stride_g, channels, positions, stride_c, stride_l,
                    eps, thr, kap,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_EPSX: tl.constexpr,
                    ACT: tl.constexpr, CENTERED: tl.constexpr, FILTER: tl.constexpr,
                    BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr):
    """One row: plain moments, filtered moments (eq. 4–7), z = act(γ x̂ + β) (eq. 8)."""
    s = tl.program_id(0)
    g = s % groups
    base = (s // groups).to(tl.int64) * stride_n + g.to(tl.int64) * stride_g
    m = _f32(channels * positions)
    if HAS_EPSX:
        eps = eps + tl.load(EPSX).to(tl.float32)
    _n, ref0, d0, big0 = _row_moments(X, base, channels, positions, stride_c, stride_l, 0.0,
                                      0.0, 0.0, thr, False, CENTERED, BLOCK_J, BLOCK_L)
    var0, r0, ref, d, var, cnt = _plain_moments(big0, ref0, d0, m, eps)
    if FILTER:
        kept, ref_f, d_f, big_f = _row_moments(X, base, channels, positions, stride_c,
                                               stride_l, ref0, d0, r0, thr, True, CENTERED,
                                               BLOCK_J, BLOCK_L)
        ref, d, var, cnt = _filtered_or_plain(kept, ref_f, d_f, big_f, ref0, d0, var0, m, kap)
    rstd = _rsqrt(var + eps)
    for j0 in range(0, channels, BLOCK_J):
        jj = j0 + tl.arange(0, BLOCK_J)
        w, bb, t, kk = _vector_params(W, B, TAU, AK, g * channels + jj, jj < channels, HAS_W,
                                      HAS_B, ACT, BLOCK_J)
        a = w * rstd
        c = bb - d * a
        for l0 in range(0, positions, BLOCK_L):
            x, offs, valid, j = _row_tile(X, base, j0, l0, channels, positions, stride_c,
                                          stride_l, BLOCK_J, BLOCK_L)
            y = (x - ref) * a[:, None] + c[:, None]
            y = _activation(y, t[:, None], kk[:, None], ACT)
            tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=valid)
    _store_stats(STATS, rows, s, s < rows, ref0, d0, var0, r0, ref, d, var, rstd, cnt)


@triton.jit
def rows_bwd_kernel(X, DZ, DX, W, B, TAU, AK, STATS, WS, GX,
                    rows, groups, stride_n, stride_g, channels, positions, stride_c, stride_l,
                    dz_stride_n, dz_stride_g, dz_stride_c, dz_stride_l, thr, kap,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                    CENTERED: tl.constexpr, FILTER: tl.constexpr, NEED_DX: tl.constexpr,
                    BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr):
    """Backward of one row: per (row, channel) Σ∂ℓ/∂y, Σ∂ℓ/∂y·x̂ and the TLU sums (→ WS,
    shape (rows, channels, 4)), Σg·x̂ (→ GX), then
    ∂ℓ/∂x = r (g − f (Σg/M + x̂ Σg x̂/(κM))) with g = γ ∂ℓ/∂y (no Σg term uncentered)."""
    s = tl.program_id(0)
    g = s % groups
    s_hi = (s // groups).to(tl.int64)
    base = s_hi * stride_n + g.to(tl.int64) * stride_g
    dbase = s_hi * dz_stride_n + g.to(tl.int64) * dz_stride_g
    m = _f32(channels * positions)
    ref0, d0, r0, ref, d, rstd, cnt = _load_stats(STATS, rows, s, s < rows)
    acc_g = tl.zeros((BLOCK_J, BLOCK_L), tl.float32)
    acc_gx = tl.zeros((BLOCK_J, BLOCK_L), tl.float32)
    for j0 in range(0, channels, BLOCK_J):
        jj = j0 + tl.arange(0, BLOCK_J)
        jm = jj < channels
        w, bb, t, kk = _vector_params(W, B, TAU, AK, g * channels + jj, jm, HAS_W, HAS_B, ACT,
                                      BLOCK_J)
        a = w * rstd
        c = bb - d * a
        c1, c2, c3, c4 = _zero_lanes(BLOCK_J, BLOCK_L)
        for l0 in range(0, positions, BLOCK_L):
            x, offs, valid, j = _row_tile(X, base, j0, l0, channels, positions, stride_c,
                                          stride_l, BLOCK_J, BLOCK_L)
            dz, doffs, _v, _j = _row_tile(DZ, dbase, j0, l0, channels, positions, dz_stride_c,
                                          dz_stride_l, BLOCK_J, BLOCK_L)
            dy, xc, rest, rest_y = _grad_terms(x, dz, valid, ref, d, a[:, None], c[:, None],
                                               t[:, None], kk[:, None], ACT)
            c1 += dy
            c2 += dy * xc
            c3 += rest
            c4 += rest_y
            acc_g += w[:, None] * dy
            acc_gx += w[:, None] * dy * xc
        _store_grad_sums(WS, s.to(tl.int64) * channels + jj, jm, c1, c2, c3, c4, rstd)
    sg = tl.sum(tl.sum(acc_g, 1), 0)
    sgx = tl.sum(tl.sum(acc_gx, 1), 0) * rstd
    tl.store(GX + s, sgx)
    if NEED_DX:
        partial = cnt < m  # all kept (or the fallback): no mask
        bc, cc = _dx_coefficients(rstd, sg, sgx, cnt, kap, CENTERED)
        for j0 in range(0, channels, BLOCK_J):
            jj = j0 + tl.arange(0, BLOCK_J)
            w, bb, t, kk = _vector_params(W, B, TAU, AK, g * channels + jj, jj < channels,
                                          HAS_W, HAS_B, ACT, BLOCK_J)
            a = w * rstd
            c = bb - d * a
            for l0 in range(0, positions, BLOCK_L):
                x, offs, valid, j = _row_tile(X, base, j0, l0, channels, positions, stride_c,
                                              stride_l, BLOCK_J, BLOCK_L)
                dz, doffs, _v, _j = _row_tile(DZ, dbase, j0, l0, channels, positions,
                                              dz_stride_c, dz_stride_l, BLOCK_J, BLOCK_L)
                dx = _dx_tile(x, dz, ref, d, a[:, None], c[:, None], t[:, None], kk[:, None],
                              ref0, d0, r0, thr, partial, bc, cc, ACT, FILTER)
                tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=valid)


# ---- rows of one channel each (FRN, IN, GN with C groups) on channels_last ------------
# A row's positions are C apart, so one program per row would read a float per 32-byte
# sector. Here a program owns BLOCK_S neighbouring rows (channels g of one sample n) and
# reads (BLOCK_S, BLOCK_L) tiles that are contiguous along the channels.

@triton.jit
def _rows1_tile(X, base, l0, smask, positions, stride_l, BLOCK_L: tl.constexpr):
    l = l0 + tl.arange(0, BLOCK_L)
    valid = smask[:, None] & (l[None, :] < positions)
    offs = base[:, None] + l[None, :].to(tl.int64) * stride_l
    return tl.load(X + offs, mask=valid, other=0.0).to(tl.float32), offs, valid


@triton.jit
def _rows1_block(groups, stride_n, stride_g, BLOCK_S: tl.constexpr):
    """This program's rows: sample n, channels g (mask), row ids s of S, base offsets."""
    n = tl.program_id(0)
    g = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    base = n.to(tl.int64) * stride_n + g.to(tl.int64) * stride_g
    return n, g, g < groups, n * groups + g, tl.num_programs(0) * groups, base


@triton.jit
def _rows1_moments(X, base, smask, positions, stride_l, ref0, d0, r0, thr,
                   FILTERED: tl.constexpr, CENTERED: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_L: tl.constexpr):
    """Per row of the block, as :func:`_row_moments`."""
    k, sh, s1, s2 = _zero_lanes(BLOCK_S, BLOCK_L)
    for l0 in range(0, positions, BLOCK_L):
        x, offs, valid = _rows1_tile(X, base, l0, smask, positions, stride_l, BLOCK_L)
        f = valid
        if FILTERED:
            f = valid & _keep(x, ref0[:, None], d0[:, None], r0[:, None], thr)
        k, sh, s1, s2 = _accumulate(x, f, k, sh, s1, s2, CENTERED)
    e, m2 = _lane_moments(k, sh, s1, s2, CENTERED)
    return _merge(k, sh, e, m2, 1, CENTERED)


@triton.jit
def rows1_fwd_kernel(X, Y, W, B, TAU, AK, EPSX, STATS, groups, positions, stride_n, stride_g,
                     stride_l, eps, thr, kap,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_EPSX: tl.constexpr,
                     ACT: tl.constexpr, CENTERED: tl.constexpr, FILTER: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr):
    """Rows s = n·G + g for BLOCK_S channels g: moments, filter, z = act(γ x̂ + β)."""
    n, g, smask, s, S, base = _rows1_block(groups, stride_n, stride_g, BLOCK_S)
    m = _f32(positions)
    if HAS_EPSX:
        eps = eps + tl.load(EPSX).to(tl.float32)
    _n, ref0, d0, big0 = _rows1_moments(X, base, smask, positions, stride_l, 0.0, 0.0, 0.0,
                                        thr, False, CENTERED, BLOCK_S, BLOCK_L)
    var0, r0, ref, d, var, cnt = _plain_moments(big0, ref0, d0, m, eps)
    if FILTER:
        kept, ref_f, d_f, big_f = _rows1_moments(X, base, smask, positions, stride_l, ref0, d0,
                                                 r0, thr, True, CENTERED, BLOCK_S, BLOCK_L)
        ref, d, var, cnt = _filtered_or_plain(kept, ref_f, d_f, big_f, ref0, d0, var0, m, kap)
    rstd = _rsqrt(var + eps)
    w, bb, t, kk = _vector_params(W, B, TAU, AK, g, smask, HAS_W, HAS_B, ACT, BLOCK_S)
    a = w * rstd
    c = bb - d * a
    for l0 in range(0, positions, BLOCK_L):
        x, offs, valid = _rows1_tile(X, base, l0, smask, positions, stride_l, BLOCK_L)
        y = (x - ref[:, None]) * a[:, None] + c[:, None]
        y = _activation(y, t[:, None], kk[:, None], ACT)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=valid)
    _store_stats(STATS, S, s, smask, ref0, d0, var0, r0, ref, d, var, rstd, cnt)


@triton.jit
def rows1_bwd_kernel(X, DZ, DX, W, B, TAU, AK, STATS, WS, GX, groups, positions, stride_n,
                     stride_g, stride_l, dz_stride_n, dz_stride_g, dz_stride_l, thr, kap,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                     CENTERED: tl.constexpr, FILTER: tl.constexpr, NEED_DX: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr):
    """Backward of rows1_fwd_kernel (the formula of rows_bwd_kernel)."""
    n, g, smask, s, S, base = _rows1_block(groups, stride_n, stride_g, BLOCK_S)
    dbase = n.to(tl.int64) * dz_stride_n + g.to(tl.int64) * dz_stride_g
    m = _f32(positions)
    ref0, d0, r0, ref, d, rstd, cnt = _load_stats(STATS, S, s, smask)
    w, bb, t, kk = _vector_params(W, B, TAU, AK, g, smask, HAS_W, HAS_B, ACT, BLOCK_S)
    a = w * rstd
    c = bb - d * a
    c1, c2, c3, c4 = _zero_lanes(BLOCK_S, BLOCK_L)
    for l0 in range(0, positions, BLOCK_L):
        x, offs, valid = _rows1_tile(X, base, l0, smask, positions, stride_l, BLOCK_L)
        dz, doffs, _v = _rows1_tile(DZ, dbase, l0, smask, positions, dz_stride_l, BLOCK_L)
        dy, xc, rest, rest_y = _grad_terms(x, dz, valid, ref[:, None], d[:, None],
                                           a[:, None], c[:, None], t[:, None], kk[:, None], ACT)
        c1 += dy
        c2 += dy * xc
        c3 += rest
        c4 += rest_y
    s_dy, s_dyxhat = _store_grad_sums(WS, s.to(tl.int64), smask, c1, c2, c3, c4, rstd)
    sg = w * s_dy
    sgx = w * s_dyxhat
    tl.store(GX + s, sgx, mask=smask)
    if NEED_DX:
        partial = cnt < m  # all kept (or the fallback): no mask
        bc, cc = _dx_coefficients(rstd, sg, sgx, cnt, kap, CENTERED)
        for l0 in range(0, positions, BLOCK_L):
            x, offs, valid = _rows1_tile(X, base, l0, smask, positions, stride_l, BLOCK_L)
            dz, doffs, _v = _rows1_tile(DZ, dbase, l0, smask, positions, dz_stride_l, BLOCK_L)
            dx = _dx_tile(x, dz, ref[:, None], d[:, None], a[:, None], c[:, None], t[:, None],
                          kk[:, None], ref0[:, None], d0[:, None], r0[:, None], thr,
                          partial[:, None], bc[:, None], cc[:, None], ACT, FILTER)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=valid)


# ---- batch norm (channel plan): split reductions over 2-D tiles ---------------------
# x is (N, C, L) with any strides; rows r = n·L + l (R = N·L) form one channel's set. A
# program owns BLOCK_C channels and one contiguous chunk of ROWS rows, so a channel's
# reduction is spread over SPLIT programs (a few channels still fill the GPU) and a tile is
# read along whichever axis is contiguous: rows for NCHW, channels for channels_last.
# Partials (count, hi, lo, M2) go to PART of shape (4, C, SPLIT); a finalize launch merges
# them once per channel in a fixed order (deterministic, no atomics) into STATS.

@triton.jit
def _bn_block(channels, BLOCK_C: tl.constexpr):
    """This program's channels c (and mask) and its chunk index p."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    return c, tl.program_id(1), c < channels


@triton.jit
def _bn_tile(X, c, r0, channels, r_end, positions, stride_c, stride_n, stride_l,
             BLOCK_R: tl.constexpr):
    r = r0 + tl.arange(0, BLOCK_R)
    n = r // positions
    valid = (c[:, None] < channels) & (r[None, :] < r_end)
    offs = (c[:, None].to(tl.int64) * stride_c + n[None, :].to(tl.int64) * stride_n
            + (r - n * positions)[None, :].to(tl.int64) * stride_l)
    x = tl.load(X + offs, mask=valid, other=0.0).to(tl.float32)
    return x, offs, valid


@triton.jit
def _bn_grad_tiles(X, DZ, c, r0, channels, r_end, positions, stride_c, stride_n, stride_l,
                   dz_stride_c, dz_stride_n, dz_stride_l, BLOCK_R: tl.constexpr):
    """The tiles of x and ∂ℓ/∂y at rows r0.. of channels c (each with its own strides)."""
    x, offs, valid = _bn_tile(X, c, r0, channels, r_end, positions, stride_c, stride_n,
                              stride_l, BLOCK_R)
    dy, _offs, _valid = _bn_tile(DZ, c, r0, channels, r_end, positions, dz_stride_c,
                                 dz_stride_n, dz_stride_l, BLOCK_R)
    return x, dy, offs, valid


@triton.jit
def _bn_store_partials(PART, c, cmask, channels, SPLIT, p, k, sh, s1, s2,
                       CENTERED: tl.constexpr):
    e, m2 = _lane_moments(k, sh, s1, s2, CENTERED)
    n, ref, d, big = _merge(k, sh, e, m2, 1, CENTERED)
    out = c.to(tl.int64) * SPLIT + p
    plane = channels * SPLIT
    tl.store(PART + out, n, mask=cmask)
    tl.store(PART + plane + out, ref, mask=cmask)
    tl.store(PART + 2 * plane + out, d, mask=cmask)
    tl.store(PART + 3 * plane + out, big, mask=cmask)


@triton.jit
def _bn_load_partials(PART, c, cmask, channels, SPLIT, p0, BLOCK_P: tl.constexpr):
    p = p0 + tl.arange(0, BLOCK_P)
    pm = cmask[:, None] & (p[None, :] < SPLIT)
    offs = c[:, None].to(tl.int64) * SPLIT + p[None, :]
    plane = channels * SPLIT
    k = tl.load(PART + offs, mask=pm, other=0.0)
    hi = tl.load(PART + plane + offs, mask=pm, other=0.0)
    lo = tl.load(PART + 2 * plane + offs, mask=pm, other=0.0)
    m2 = tl.load(PART + 3 * plane + offs, mask=pm, other=0.0)
    return k, hi, lo, m2


@triton.jit
def _bn_merge_partials(PART, c, cmask, channels, SPLIT, CENTERED: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """:func:`_merge` over the SPLIT partials of channels c, BLOCK_P at a time (three loops
    over the partials, no reduction inside a loop)."""
    acc_n = tl.zeros((BLOCK_C, BLOCK_P), tl.float32)
    acc_s = tl.zeros((BLOCK_C, BLOCK_P), tl.float32)
    for p0 in range(0, SPLIT, BLOCK_P):
        k, hi, lo, m2 = _bn_load_partials(PART, c, cmask, channels, SPLIT, p0, BLOCK_P)
        acc_n += k
        acc_s += k * (hi + lo)
    n = tl.sum(acc_n, 1)
    nn = tl.where(n > 0.0, n, 1.0)
    ref = tl.sum(acc_s, 1) / nn
    acc_d = tl.zeros((BLOCK_C, BLOCK_P), tl.float32)
    if CENTERED:
        for p0 in range(0, SPLIT, BLOCK_P):
            k, hi, lo, m2 = _bn_load_partials(PART, c, cmask, channels, SPLIT, p0, BLOCK_P)
            acc_d += k * tl.where(k > 0.0, (hi - ref[:, None]) + lo, 0.0)
    d = tl.sum(acc_d, 1) / nn
    acc_m = tl.zeros((BLOCK_C, BLOCK_P), tl.float32)
    for p0 in range(0, SPLIT, BLOCK_P):
        k, hi, lo, m2 = _bn_load_partials(PART, c, cmask, channels, SPLIT, p0, BLOCK_P)
        if CENTERED:
            dd = tl.where(k > 0.0, (hi - ref[:, None]) + lo, 0.0) - d[:, None]
            acc_m += m2 + k * dd * dd
        else:
            acc_m += m2
    if not CENTERED:
        ref = n * 0.0
        d = n * 0.0
    return n, ref, d, tl.sum(acc_m, 1)


@triton.jit
def bn_moments_kernel(X, STATS, PART, channels, rows, positions, stride_c, stride_n, stride_l,
                      SPLIT, ROWS, thr, FILTERED: tl.constexpr, CENTERED: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Each program's (count, mean pair, M2) of its chunk of rows, per channel: over every
    value (pass 1), or (FILTERED, pass 2) over the values f = [|x − μ0| r0 ≤ T] kept around
    the plain moments already in STATS (eq. 4–7)."""
    c, p, cmask = _bn_block(channels, BLOCK_C)
    if FILTERED:
        ref0, d0, r0, _ref, _d, _rstd, _cnt = _load_stats(STATS, channels, c, cmask)
    k, sh, s1, s2 = _zero_lanes(BLOCK_C, BLOCK_R)
    r_end = tl.minimum(rows, (p + 1) * ROWS)
    for r0_ in range(p * ROWS, r_end, BLOCK_R):
        x, offs, valid = _bn_tile(X, c, r0_, channels, r_end, positions, stride_c, stride_n,
                                  stride_l, BLOCK_R)
        f = valid
        if FILTERED:
            f = valid & _keep(x, ref0[:, None], d0[:, None], r0[:, None], thr)
        k, sh, s1, s2 = _accumulate(x, f, k, sh, s1, s2, CENTERED)
    _bn_store_partials(PART, c, cmask, channels, SPLIT, p, k, sh, s1, s2, CENTERED)


@triton.jit
def bn_finalize_kernel(PART, STATS, EPSX, RM, RV, channels, rows, SPLIT, eps, kap, factor,
                       HAS_EPSX: tl.constexpr, CENTERED: tl.constexpr, FILTER: tl.constexpr,
                       FILTERED: tl.constexpr, HAS_RUN: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_P: tl.constexpr):
    """Merge the partials of pass 1 (FILTERED=False) or pass 2 (FILTERED=True) per channel into
    STATS. The last stage (pass 2, or pass 1 without a filter) writes the final moments and,
    with HAS_RUN, updates the running averages as torch's BatchNorm does (variance unbiased
    over the kept count M: σ′² M/(M − 1))."""
    c, _p, cmask = _bn_block(channels, BLOCK_C)
    if HAS_EPSX:
        eps = eps + tl.load(EPSX).to(tl.float32)
    m = _f32(rows)
    n, ref_p, d_p, big = _bn_merge_partials(PART, c, cmask, channels, SPLIT, CENTERED,
                                            BLOCK_C, BLOCK_P)
    if FILTERED:
        ref0 = tl.load(STATS + 6 * channels + c, mask=cmask, other=0.0)
        d0 = tl.load(STATS + 7 * channels + c, mask=cmask, other=0.0)
        var0 = tl.load(STATS + 1 * channels + c, mask=cmask, other=1.0)
        r0 = tl.load(STATS + 10 * channels + c, mask=cmask, other=1.0)
        ref, d, var, cnt = _filtered_or_plain(n, ref_p, d_p, big, ref0, d0, var0, m, kap)
    else:
        ref0 = ref_p
        d0 = d_p
        var0, r0, ref, d, var, cnt = _plain_moments(big, ref0, d0, m, eps)
    rstd = _rsqrt(var + eps)
    if FILTERED or not FILTER:
        _store_stats(STATS, channels, c, cmask, ref0, d0, var0, r0, ref, d, var, rstd, cnt)
        if HAS_RUN:
            rm = tl.load(RM + c, mask=cmask, other=0.0).to(tl.float32)
            rv = tl.load(RV + c, mask=cmask, other=0.0).to(tl.float32)
            unbiased = var * (cnt / tl.where(cnt > 1.0, cnt - 1.0, 1.0))
            tl.store(RM + c, (rm + factor * ((ref + d) - rm)).to(RM.dtype.element_ty),
                     mask=cmask)
            tl.store(RV + c, (rv + factor * (unbiased - rv)).to(RV.dtype.element_ty),
                     mask=cmask)
    else:
        tl.store(STATS + 0 * channels + c, ref0 + d0, mask=cmask)
        tl.store(STATS + 1 * channels + c, var0, mask=cmask)
        tl.store(STATS + 6 * channels + c, ref0, mask=cmask)
        tl.store(STATS + 7 * channels + c, d0, mask=cmask)
        tl.store(STATS + 10 * channels + c, r0, mask=cmask)


@triton.jit
def bn_apply_kernel(X, Y, W, B, STATS, channels, rows, positions, stride_c, stride_n,
                    stride_l, ROWS, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Pass 3: y = (x − ref)·γr + (β − delta·γr), i.e. γ (x − μ′) r + β (eq. 8)."""
    c, p, cmask = _bn_block(channels, BLOCK_C)
    ref = tl.load(STATS + 8 * channels + c, mask=cmask, other=0.0)
    d = tl.load(STATS + 9 * channels + c, mask=cmask, other=0.0)
    rstd = tl.load(STATS + 4 * channels + c, mask=cmask, other=1.0)
    w, bb, _t, _k = _vector_params(W, B, W, W, c, cmask, HAS_W, HAS_B, 0, BLOCK_C)
    a = w * rstd
    b0 = bb - d * a
    r_end = tl.minimum(rows, (p + 1) * ROWS)
    for r0 in range(p * ROWS, r_end, BLOCK_R):
        x, offs, valid = _bn_tile(X, c, r0, channels, r_end, positions, stride_c, stride_n,
                                  stride_l, BLOCK_R)
        y = (x - ref[:, None]) * a[:, None] + b0[:, None]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=valid)


@triton.jit
def bn_bwd_sums_kernel(X, DZ, STATS, PART, channels, rows, positions, stride_c, stride_n,
                       stride_l, dz_stride_c, dz_stride_n, dz_stride_l, SPLIT, ROWS,
                       BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Backward pass 1: partial Σ∂ℓ/∂y and Σ∂ℓ/∂y · (x − μ) per channel → PART (2, C, SPLIT)."""
    c, p, cmask = _bn_block(channels, BLOCK_C)
    ref = tl.load(STATS + 8 * channels + c, mask=cmask, other=0.0)
    d = tl.load(STATS + 9 * channels + c, mask=cmask, other=0.0)
    a1 = tl.zeros((BLOCK_C, BLOCK_R), tl.float32)
    a2 = tl.zeros((BLOCK_C, BLOCK_R), tl.float32)
    r_end = tl.minimum(rows, (p + 1) * ROWS)
    for r0 in range(p * ROWS, r_end, BLOCK_R):
        x, dy, offs, valid = _bn_grad_tiles(X, DZ, c, r0, channels, r_end, positions, stride_c,
                                            stride_n, stride_l, dz_stride_c, dz_stride_n,
                                            dz_stride_l, BLOCK_R)
        a1 += dy
        a2 += dy * tl.where(valid, (x - ref[:, None]) - d[:, None], 0.0)
    out = c.to(tl.int64) * SPLIT + p
    tl.store(PART + out, tl.sum(a1, 1), mask=cmask)
    tl.store(PART + channels * SPLIT + out, tl.sum(a2, 1), mask=cmask)


@triton.jit
def bn_bwd_finalize_kernel(PART, STATS, SUMS, channels, SPLIT, BLOCK_C: tl.constexpr,
                           BLOCK_P: tl.constexpr):
    """Per channel Σ∂ℓ/∂y and Σ∂ℓ/∂y·x̂ (→ SUMS (2, C)) from the partials, in a fixed order."""
    c, _p, cmask = _bn_block(channels, BLOCK_C)
    acc1 = tl.zeros((BLOCK_C, BLOCK_P), tl.float32)
    acc2 = tl.zeros((BLOCK_C, BLOCK_P), tl.float32)
    for p0 in range(0, SPLIT, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pm = cmask[:, None] & (p[None, :] < SPLIT)
        offs = c[:, None].to(tl.int64) * SPLIT + p[None, :]
        acc1 += tl.load(PART + offs, mask=pm, other=0.0)
        acc2 += tl.load(PART + channels * SPLIT + offs, mask=pm, other=0.0)
    rstd = tl.load(STATS + 4 * channels + c, mask=cmask, other=1.0)
    tl.store(SUMS + c, tl.sum(acc1, 1), mask=cmask)
    tl.store(SUMS + channels + c, tl.sum(acc2, 1) * rstd, mask=cmask)


@triton.jit
def bn_bwd_dx_kernel(X, DZ, DX, W, STATS, SUMS, channels, rows, positions, stride_c, stride_n,
                     stride_l, dz_stride_c, dz_stride_n, dz_stride_l, ROWS, thr, kap,
                     HAS_W: tl.constexpr, CENTERED: tl.constexpr, FILTER: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Backward pass 2: ∂ℓ/∂x = r (g − f (Σg/M + x̂ Σg x̂ / (κM))), g = γ ∂ℓ/∂y."""
    c, p, cmask = _bn_block(channels, BLOCK_C)
    m = _f32(rows)
    ref0, d0, r0, ref, d, rstd, cnt = _load_stats(STATS, channels, c, cmask)
    w, _b, _t, _k = _vector_params(W, W, W, W, c, cmask, HAS_W, False, 0, BLOCK_C)
    sg = w * tl.load(SUMS + c, mask=cmask, other=0.0)
    sgx = w * tl.load(SUMS + channels + c, mask=cmask, other=0.0)
    partial = cnt < m  # all kept (or the fallback): no mask
    a = w * rstd
    bc, cc = _dx_coefficients(rstd, sg, sgx, cnt, kap, CENTERED)
    r_end = tl.minimum(rows, (p + 1) * ROWS)
    for r0_ in range(p * ROWS, r_end, BLOCK_R):
        x, dy, offs, valid = _bn_grad_tiles(X, DZ, c, r0_, channels, r_end, positions,
                                            stride_c, stride_n, stride_l, dz_stride_c,
                                            dz_stride_n, dz_stride_l, BLOCK_R)
        dx = _dx_tile(x, dy, ref[:, None], d[:, None], a[:, None], 0.0, 0.0, 0.0, ref0[:, None],
                      d0[:, None], r0[:, None], thr, partial[:, None], bc[:, None],
                      cc[:, None], 0, FILTER)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=valid)


KERNELS = (rows_fwd_kernel, rows_bwd_kernel, rows1_fwd_kernel, rows1_bwd_kernel,
           bn_moments_kernel, bn_finalize_kernel, bn_apply_kernel,
           bn_bwd_sums_kernel, bn_bwd_finalize_kernel, bn_bwd_dx_kernel)
