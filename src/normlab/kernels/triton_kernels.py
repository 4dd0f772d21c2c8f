"""Triton kernels for CUDA tensors: (filtered) normalize + affine (+ TLU), forward and backward.

Statistics and accumulation in float32; inputs float32, float16 or bfloat16 with any
strides (NCHW and channels_last views). Backward recomputes the robust-filter mask and the
TLU decision from ``x`` and the saved per-set statistics; the math is that of
:mod:`normlab.kernels.analytic`. Two families:

**Batch norm** (channel plans, ``x`` viewed ``(N, C, L)``): a channel's ``N·L`` values are
few and long, so its reduction is split over ``split`` programs (:func:`bn_launch`), each
owning a chunk of rows of ``block_c`` channels, read along the contiguous axis (rows for
NCHW, channels for channels_last). Forward is three launches — plain shifted sums, the
robust-filter sums (filtered-BN seed eq. 4–7; skipped without a threshold), and combine +
``y = γ (x − μ′) r + β`` (eq. 8) — backward two (``Σ∂ℓ/∂y``, ``Σ∂ℓ/∂y·(x − μ)``; then
``∂ℓ/∂x``). Partials are combined in a fixed order: results are deterministic.

**Rows** (GN/IN/LN/FRN family): one program per row runs every pass of that row — plain
moments, filter moments, then normalize with an optional TLU (FRN seed eq. 3) or affine
TLU — re-reading the row from L2. Index scheme: row ``s`` starts at
``(s // G) * sA + (s % G) * sB``; its values are ``(j, l)`` with ``j < Cg``, ``l < L`` at
``j * sJ + l * sL``; the parameter index of a value is ``(s % G) * Cg + j``.

``TRITON_INTERPRET=1`` runs these kernels on CPU tensors (how CI tests them).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor

from .. import functional as F
from .layout import Plan, canonical_param

__all__ = ["available", "forward", "backward", "ACT_CODES"]

ACT_CODES = {"none": 0, "tlu": 1, "relu": 1, "affine_tlu": 2}


try:  # Triton is optional: without it (or with a broken install) the reference path runs
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001
    triton = tl = None


def available() -> bool:
    """Whether Triton is importable (CUDA dispatch also needs a CUDA tensor)."""
    return triton is not None


def _kernels():
    if triton is None:
        raise RuntimeError("triton is not installed: pip install triton")
    return fwd_kernel, bwd_kernel


if triton is not None:
    @triton.jit
    def _load_tile(X, base, j0, l0, JH, L, sJ, sL, BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr):
        j = j0 + tl.arange(0, BLOCK_J)
        l = l0 + tl.arange(0, BLOCK_L)
        mask = (j[:, None] < JH) & (l[None, :] < L)
        offs = base + j[:, None].to(tl.int64) * sJ + l[None, :].to(tl.int64) * sL
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        return x, offs, mask, j

    @triton.jit
    def _plain_moments(s1, s2, shift, m, CENTERED: tl.constexpr):
        """(μ, σ²) from Σu, Σu² with u = x − shift (centered), or (0, ν²) from Σx² (eq. 2–3)."""
        d0 = s1 / m
        if CENTERED:
            mean0 = shift + d0
            var0 = tl.maximum(s2 / m - d0 * d0, 0.0)
        else:
            mean0 = d0 * 0.0
            var0 = s2 / m
        return mean0, var0

    @triton.jit
    def _final_moments(s1, s2, shift, m, mean0, kept, f1, f2, kap, CENTERED: tl.constexpr,
                       FILTER: tl.constexpr):
        """(μ′, σ′², M): the filtered moments (eq. 6–7, divided by κ) from the kept count and
        the sums f1, f2 of x − μ0 over the kept values; a set that kept nothing falls back to
        its plain sums s1, s2 of x − shift. Without a filter, the plain moments."""
        cnt = s1 * 0.0 + m
        sf = s1
        sff = s2
        if FILTER:
            none_kept = kept == 0.0
            dm = mean0 - shift
            cnt = tl.where(none_kept, m, kept)
            sf = tl.where(none_kept, s1 - m * dm, f1)
            sff = tl.where(none_kept, s2 - 2.0 * dm * s1 + m * dm * dm, f2)
            shift = mean0
        d = sf / cnt
        if CENTERED:
            mean = shift + d
            var = tl.maximum(sff / cnt - d * d, 0.0)
        else:
            mean = d * 0.0
            var = sff / cnt
        if FILTER:
            var = var / kap
        return mean, var, cnt

    @triton.jit
    def fwd_kernel(X, Y, W, B, TAU, AK, EPSX, STATS, S, G2, sA, sB, JH, L, sJ, sL, P_MUL, P_J,
                   eps, thr, kap,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_EPSX: tl.constexpr,
                   ACT: tl.constexpr, CENTERED: tl.constexpr, FILTER: tl.constexpr,
                   BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr):
        s = tl.program_id(0)
        s_lo = s % G2
        base = (s // G2).to(tl.int64) * sA + s_lo.to(tl.int64) * sB
        m = (JH * L).to(tl.float32)
        if HAS_EPSX:
            eps = eps + tl.load(EPSX).to(tl.float32)
        if CENTERED:
            shift = tl.load(X + base).to(tl.float32)
        else:
            shift = 0.0
        a1 = tl.zeros((BLOCK_J, BLOCK_L), tl.float32)
        a2 = tl.zeros((BLOCK_J, BLOCK_L), tl.float32)
        for j0 in range(0, JH, BLOCK_J):
            for l0 in range(0, L, BLOCK_L):
                x, offs, mask, j = _load_tile(X, base, j0, l0, JH, L, sJ, sL, BLOCK_J, BLOCK_L)
                u = tl.where(mask, x - shift, 0.0)
                a1 += u
                a2 += u * u
        s1 = tl.sum(tl.sum(a1, 1), 0)
        s2 = tl.sum(tl.sum(a2, 1), 0)
        mean0, var0 = _plain_moments(s1, s2, shift, m, CENTERED)
        kept = m
        f1 = s1
        f2 = s2
        if FILTER:
            r0 = 1.0 / tl.sqrt(var0 + eps)
            b1 = tl.zeros((BLOCK_J, BLOCK_L), tl.float32)
            b2 = tl.zeros((BLOCK_J, BLOCK_L), tl.float32)
            b3 = tl.zeros((BLOCK_J, BLOCK_L), tl.float32)
            for j0 in range(0, JH, BLOCK_J):
                for l0 in range(0, L, BLOCK_L):
                    x, offs, mask, j = _load_tile(X, base, j0, l0, JH, L, sJ, sL, BLOCK_J, BLOCK_L)
                    f = tl.where(mask & (tl.abs((x - mean0) * r0) <= thr), 1.0, 0.0)
                    u = (x - mean0) * f  # shift by the plain mean: little cancellation
                    b1 += f
                    b2 += u
                    b3 += u * u
            kept = tl.sum(tl.sum(b1, 1), 0)
            f1 = tl.sum(tl.sum(b2, 1), 0)
            f2 = tl.sum(tl.sum(b3, 1), 0)
        mean, var, cnt = _final_moments(s1, s2, shift, m, mean0, kept, f1, f2, kap, CENTERED,
                                        FILTER)
        rstd = 1.0 / tl.sqrt(var + eps)
        for j0 in range(0, JH, BLOCK_J):
            for l0 in range(0, L, BLOCK_L):
                x, offs, mask, j = _load_tile(X, base, j0, l0, JH, L, sJ, sL, BLOCK_J, BLOCK_L)
                pidx = s_lo * P_MUL + j * P_J
                jm = j < JH
                if HAS_W:
                    w = tl.load(W + pidx, mask=jm, other=1.0).to(tl.float32)
                else:
                    w = tl.full((BLOCK_J,), 1.0, tl.float32)
                if HAS_B:
                    bb = tl.load(B + pidx, mask=jm, other=0.0).to(tl.float32)
                else:
                    bb = tl.zeros((BLOCK_J,), tl.float32)
                a = w * rstd
                c = bb - mean * a
                y = x * a[:, None] + c[:, None]
                if ACT == 1:
                    t = tl.load(TAU + pidx, mask=jm, other=0.0).to(tl.float32)
                    y = tl.maximum(y, t[:, None])
                if ACT == 2:
                    t = tl.load(TAU + pidx, mask=jm, other=0.0).to(tl.float32)
                    k = tl.load(AK + pidx, mask=jm, other=0.0).to(tl.float32)
                    h = k[:, None] * y + t[:, None]
                    y = tl.where(y >= h, y, h)
                tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(STATS + 0 * S + s, mean0)
        tl.store(STATS + 1 * S + s, var0)
        tl.store(STATS + 2 * S + s, mean)
        tl.store(STATS + 3 * S + s, var)
        tl.store(STATS + 4 * S + s, rstd)
        tl.store(STATS + 5 * S + s, cnt)

    @triton.jit
    def bwd_kernel(X, DZ, DX, W, B, TAU, AK, EPSX, STATS, WS, GX, S, G2, sA, sB, JH, L, sJ, sL,
                   dA, dB, dJ, dL, P_MUL, P_J, eps, thr, kap,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_EPSX: tl.constexpr,
                   ACT: tl.constexpr, CENTERED: tl.constexpr, FILTER: tl.constexpr,
                   NEED_DX: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr):
        s = tl.program_id(0)
        s_lo = s % G2
        s_hi = (s // G2).to(tl.int64)
        base = s_hi * sA + s_lo.to(tl.int64) * sB
        dbase = s_hi * dA + s_lo.to(tl.int64) * dB
        m = (JH * L).to(tl.float32)
        if HAS_EPSX:
            eps = eps + tl.load(EPSX).to(tl.float32)
        mean0 = tl.load(STATS + 0 * S + s)
        var0 = tl.load(STATS + 1 * S + s)
        mean = tl.load(STATS + 2 * S + s)
        rstd = tl.load(STATS + 4 * S + s)
        cnt = tl.load(STATS + 5 * S + s)
        sg = 0.0
        sgx = 0.0
        for j0 in range(0, JH, BLOCK_J):
            c1 = tl.zeros((BLOCK_J,), tl.float32)
            c2 = tl.zeros((BLOCK_J,), tl.float32)
            c3 = tl.zeros((BLOCK_J,), tl.float32)
            c4 = tl.zeros((BLOCK_J,), tl.float32)
            j = j0 + tl.arange(0, BLOCK_J)
            jm = j < JH
            pidx = s_lo * P_MUL + j * P_J
            if HAS_W:
                w = tl.load(W + pidx, mask=jm, other=1.0).to(tl.float32)
            else:
                w = tl.full((BLOCK_J,), 1.0, tl.float32)
            if HAS_B:
                bb = tl.load(B + pidx, mask=jm, other=0.0).to(tl.float32)
            else:
                bb = tl.zeros((BLOCK_J,), tl.float32)
            a = w * rstd
            c = bb - mean * a
            for l0 in range(0, L, BLOCK_L):
                x, offs, mask, j = _load_tile(X, base, j0, l0, JH, L, sJ, sL, BLOCK_J, BLOCK_L)
                dz, doffs, _m, _j = _load_tile(DZ, dbase, j0, l0, JH, L, dJ, dL, BLOCK_J, BLOCK_L)
                dy = dz
                if ACT == 1:
                    t = tl.load(TAU + pidx, mask=jm, other=0.0).to(tl.float32)
                    y = x * a[:, None] + c[:, None]
                    dy = tl.where(y >= t[:, None], dz, 0.0)
                    c3 += tl.sum(dz - dy, 1)
                if ACT == 2:
                    t = tl.load(TAU + pidx, mask=jm, other=0.0).to(tl.float32)
                    k = tl.load(AK + pidx, mask=jm, other=0.0).to(tl.float32)
                    y = x * a[:, None] + c[:, None]
                    keep = y >= k[:, None] * y + t[:, None]
                    dy = tl.where(keep, dz, dz * k[:, None])
                    rest = tl.where(keep, 0.0, dz)
                    c3 += tl.sum(rest, 1)
                    c4 += tl.sum(rest * y, 1)
                c1 += tl.sum(dy, 1)
                c2 += tl.sum(tl.where(mask, dy * (x - mean), 0.0), 1)
            c2 = c2 * rstd
            wsoff = (s.to(tl.int64) * JH + j) * 4
            tl.store(WS + wsoff + 0, c1, mask=jm)
            tl.store(WS + wsoff + 1, c2, mask=jm)
            tl.store(WS + wsoff + 2, c3, mask=jm)
            tl.store(WS + wsoff + 3, c4, mask=jm)
            sg += tl.sum(w * c1, 0)
            sgx += tl.sum(w * c2, 0)
        tl.store(GX + s, sgx)
        if NEED_DX:
            if FILTER:
                th = tl.where(cnt < m, thr, 3.0e38)  # all kept (or fallback): no mask
                kk = kap
            else:
                th = 3.0e38
                kk = 1.0
            r0 = 1.0 / tl.sqrt(var0 + eps)
            if CENTERED:
                Bc = rstd * sg / cnt
            else:
                Bc = 0.0
            Cc = rstd * rstd * sgx / (kk * cnt)
            for j0 in range(0, JH, BLOCK_J):
                j = j0 + tl.arange(0, BLOCK_J)
                jm = j < JH
                pidx = s_lo * P_MUL + j * P_J
                if HAS_W:
                    w = tl.load(W + pidx, mask=jm, other=1.0).to(tl.float32)
                else:
                    w = tl.full((BLOCK_J,), 1.0, tl.float32)
                if HAS_B:
                    bb = tl.load(B + pidx, mask=jm, other=0.0).to(tl.float32)
                else:
                    bb = tl.zeros((BLOCK_J,), tl.float32)
                a = w * rstd
                c = bb - mean * a
                for l0 in range(0, L, BLOCK_L):
                    x, offs, mask, j = _load_tile(X, base, j0, l0, JH, L, sJ, sL, BLOCK_J, BLOCK_L)
                    dz, doffs, _m, _j = _load_tile(DZ, dbase, j0, l0, JH, L, dJ, dL, BLOCK_J, BLOCK_L)
                    dy = dz
                    if ACT == 1:
                        t = tl.load(TAU + pidx, mask=jm, other=0.0).to(tl.float32)
                        y = x * a[:, None] + c[:, None]
                        dy = tl.where(y >= t[:, None], dz, 0.0)
                    if ACT == 2:
                        t = tl.load(TAU + pidx, mask=jm, other=0.0).to(tl.float32)
                        k = tl.load(AK + pidx, mask=jm, other=0.0).to(tl.float32)
                        y = x * a[:, None] + c[:, None]
                        dy = tl.where(y >= k[:, None] * y + t[:, None], dz, dz * k[:, None])
                    f = tl.where(tl.abs((x - mean0) * r0) <= th, 1.0, 0.0)
                    dx = a[:, None] * dy - f * (Bc + (x - mean) * Cc)
                    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


    # ---- rows of one channel each (FRN, IN, GN with C groups) on channels_last ----------
    # A row's L values are C apart, so one program per row would read a float per 32-byte
    # sector. Here a program owns BLOCK_S neighbouring rows (channels g of one sample n) and
    # reads (BLOCK_S, BLOCK_L) tiles that are contiguous along the channels.

    @triton.jit
    def _rows1_tile(X, base, l0, smask, L, sL, BLOCK_L: tl.constexpr):
        l = l0 + tl.arange(0, BLOCK_L)
        mask = smask[:, None] & (l[None, :] < L)
        offs = base[:, None] + l[None, :].to(tl.int64) * sL
        return tl.load(X + offs, mask=mask, other=0.0).to(tl.float32), offs, mask

    @triton.jit
    def _row_params(W, B, TAU, AK, g, smask, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    ACT: tl.constexpr, BLOCK_S: tl.constexpr):
        """γ, β, τ, κ of the rows' channels (1, 0, 0, 0 where absent)."""
        if HAS_W:
            w = tl.load(W + g, mask=smask, other=1.0).to(tl.float32)
        else:
            w = tl.full((BLOCK_S,), 1.0, tl.float32)
        if HAS_B:
            bb = tl.load(B + g, mask=smask, other=0.0).to(tl.float32)
        else:
            bb = tl.zeros((BLOCK_S,), tl.float32)
        t = tl.zeros((BLOCK_S,), tl.float32)
        k = tl.zeros((BLOCK_S,), tl.float32)
        if ACT >= 1:
            t = tl.load(TAU + g, mask=smask, other=0.0).to(tl.float32)
        if ACT == 2:
            k = tl.load(AK + g, mask=smask, other=0.0).to(tl.float32)
        return w, bb, t, k

    @triton.jit
    def rows1_fwd_kernel(X, Y, W, B, TAU, AK, EPSX, STATS, G, L, sN, sG, sL, eps, thr, kap,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_EPSX: tl.constexpr,
                         ACT: tl.constexpr, CENTERED: tl.constexpr, FILTER: tl.constexpr,
                         BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr):
        """Rows s = n·G + g for BLOCK_S channels g: moments, filter, z = act(γ x̂ + β)."""
        n = tl.program_id(0)
        g = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        smask = g < G
        s = n * G + g
        base = n.to(tl.int64) * sN + g.to(tl.int64) * sG
        m = L.to(tl.float32)
        if HAS_EPSX:
            eps = eps + tl.load(EPSX).to(tl.float32)
        if CENTERED:
            shift = tl.load(X + base, mask=smask, other=0.0).to(tl.float32)
        else:
            shift = tl.zeros((BLOCK_S,), tl.float32)
        a1 = tl.zeros((BLOCK_S, BLOCK_L), tl.float32)
        a2 = tl.zeros((BLOCK_S, BLOCK_L), tl.float32)
        for l0 in range(0, L, BLOCK_L):
            x, offs, mask = _rows1_tile(X, base, l0, smask, L, sL, BLOCK_L)
            u = tl.where(mask, x - shift[:, None], 0.0)
            a1 += u
            a2 += u * u
        s1 = tl.sum(a1, 1)
        s2 = tl.sum(a2, 1)
        mean0, var0 = _plain_moments(s1, s2, shift, m, CENTERED)
        kept = s1
        f1 = s1
        f2 = s2
        if FILTER:
            r0 = 1.0 / tl.sqrt(var0 + eps)
            b1 = tl.zeros((BLOCK_S, BLOCK_L), tl.float32)
            b2 = tl.zeros((BLOCK_S, BLOCK_L), tl.float32)
            b3 = tl.zeros((BLOCK_S, BLOCK_L), tl.float32)
            for l0 in range(0, L, BLOCK_L):
                x, offs, mask = _rows1_tile(X, base, l0, smask, L, sL, BLOCK_L)
                u = x - mean0[:, None]
                f = tl.where(mask & (tl.abs(u * r0[:, None]) <= thr), 1.0, 0.0)
                u = u * f
                b1 += f
                b2 += u
                b3 += u * u
            kept = tl.sum(b1, 1)
            f1 = tl.sum(b2, 1)
            f2 = tl.sum(b3, 1)
        mean, var, cnt = _final_moments(s1, s2, shift, m, mean0, kept, f1, f2, kap, CENTERED,
                                        FILTER)
        rstd = 1.0 / tl.sqrt(var + eps)
        w, bb, t, k = _row_params(W, B, TAU, AK, g, smask, HAS_W, HAS_B, ACT, BLOCK_S)
        a = w * rstd
        c = bb - mean * a
        for l0 in range(0, L, BLOCK_L):
            x, offs, mask = _rows1_tile(X, base, l0, smask, L, sL, BLOCK_L)
            y = x * a[:, None] + c[:, None]
            if ACT == 1:
                y = tl.maximum(y, t[:, None])
            if ACT == 2:
                h = k[:, None] * y + t[:, None]
                y = tl.where(y >= h, y, h)
            tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        S = tl.num_programs(0) * G
        tl.store(STATS + 0 * S + s, mean0, mask=smask)
        tl.store(STATS + 1 * S + s, var0, mask=smask)
        tl.store(STATS + 2 * S + s, mean, mask=smask)
        tl.store(STATS + 3 * S + s, var, mask=smask)
        tl.store(STATS + 4 * S + s, rstd, mask=smask)
        tl.store(STATS + 5 * S + s, cnt, mask=smask)

    @triton.jit
    def rows1_bwd_kernel(X, DZ, DX, W, B, TAU, AK, EPSX, STATS, WS, GX, G, L, sN, sG, sL,
                         dN, dG, dL, eps, thr, kap,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_EPSX: tl.constexpr,
                         ACT: tl.constexpr, CENTERED: tl.constexpr, FILTER: tl.constexpr,
                         NEED_DX: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr):
        """Backward of rows1_fwd_kernel: per-row Σ∂ℓ/∂y, Σ∂ℓ/∂y·x̂, TLU sums (→ WS), then
        ∂ℓ/∂x = r (g − f (Σg/M + x̂ Σg x̂/(κM))) with g = γ ∂ℓ/∂y (no Σg term uncentered)."""
        n = tl.program_id(0)
        g = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        smask = g < G
        s = n * G + g
        S = tl.num_programs(0) * G
        base = n.to(tl.int64) * sN + g.to(tl.int64) * sG
        dbase = n.to(tl.int64) * dN + g.to(tl.int64) * dG
        m = L.to(tl.float32)
        if HAS_EPSX:
            eps = eps + tl.load(EPSX).to(tl.float32)
        mean0 = tl.load(STATS + 0 * S + s, mask=smask, other=0.0)
        var0 = tl.load(STATS + 1 * S + s, mask=smask, other=1.0)
        mean = tl.load(STATS + 2 * S + s, mask=smask, other=0.0)
        rstd = tl.load(STATS + 4 * S + s, mask=smask, other=1.0)
        cnt = tl.load(STATS + 5 * S + s, mask=smask, other=1.0)
        w, bb, t, k = _row_params(W, B, TAU, AK, g, smask, HAS_W, HAS_B, ACT, BLOCK_S)
        a = w * rstd
        c = bb - mean * a
        c1 = tl.zeros((BLOCK_S, BLOCK_L), tl.float32)
        c2 = tl.zeros((BLOCK_S, BLOCK_L), tl.float32)
        c3 = tl.zeros((BLOCK_S, BLOCK_L), tl.float32)
        c4 = tl.zeros((BLOCK_S, BLOCK_L), tl.float32)
        for l0 in range(0, L, BLOCK_L):
            x, offs, mask = _rows1_tile(X, base, l0, smask, L, sL, BLOCK_L)
            dz, doffs, _m = _rows1_tile(DZ, dbase, l0, smask, L, dL, BLOCK_L)
            dy = dz
            if ACT == 1:
                y = x * a[:, None] + c[:, None]
                dy = tl.where(y >= t[:, None], dz, 0.0)
                c3 += dz - dy
            if ACT == 2:
                y = x * a[:, None] + c[:, None]
                keep = y >= k[:, None] * y + t[:, None]
                dy = tl.where(keep, dz, dz * k[:, None])
                rest = tl.where(keep, 0.0, dz)
                c3 += rest
                c4 += rest * y
            c1 += dy
            c2 += tl.where(mask, dy * (x - mean[:, None]), 0.0)
        s_dy = tl.sum(c1, 1)
        s_dyxhat = tl.sum(c2, 1) * rstd
        tl.store(WS + s.to(tl.int64) * 4 + 0, s_dy, mask=smask)
        tl.store(WS + s.to(tl.int64) * 4 + 1, s_dyxhat, mask=smask)
        tl.store(WS + s.to(tl.int64) * 4 + 2, tl.sum(c3, 1), mask=smask)
        tl.store(WS + s.to(tl.int64) * 4 + 3, tl.sum(c4, 1), mask=smask)
        sg = w * s_dy
        sgx = w * s_dyxhat
        tl.store(GX + s, sgx, mask=smask)
        if NEED_DX:
            if FILTER:
                th = tl.where(cnt < m, thr, 3.0e38)  # all kept (or the fallback): no mask
                kk = kap
            else:
                th = tl.full((BLOCK_S,), 3.0e38, tl.float32)
                kk = 1.0
            r0 = 1.0 / tl.sqrt(var0 + eps)
            if CENTERED:
                bc = rstd * sg / cnt
            else:
                bc = tl.zeros((BLOCK_S,), tl.float32)
            cc = rstd * rstd * sgx / (kk * cnt)
            for l0 in range(0, L, BLOCK_L):
                x, offs, mask = _rows1_tile(X, base, l0, smask, L, sL, BLOCK_L)
                dz, doffs, _m = _rows1_tile(DZ, dbase, l0, smask, L, dL, BLOCK_L)
                dy = dz
                if ACT == 1:
                    y = x * a[:, None] + c[:, None]
                    dy = tl.where(y >= t[:, None], dz, 0.0)
                if ACT == 2:
                    y = x * a[:, None] + c[:, None]
                    dy = tl.where(y >= k[:, None] * y + t[:, None], dz, dz * k[:, None])
                f = tl.where(tl.abs((x - mean0[:, None]) * r0[:, None]) <= th[:, None], 1.0, 0.0)
                dx = a[:, None] * dy - f * (bc[:, None] + (x - mean[:, None]) * cc[:, None])
                tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)

    # ---- batch norm (channel plan): split reductions over 2-D tiles ---------------------
    # x is (N, C, L) with any strides; rows r = n * L + l (R = N * L) form one channel's
    # set. A program owns BLOCK_C channels and one contiguous chunk of rows, so a channel's
    # reduction is spread over SPLIT programs (a few channels still fill the GPU) and a tile
    # is read along whichever axis is contiguous: rows for NCHW, channels for channels_last.
    # Partial sums go to PART/FPART/BPART of shape (K, C, SPLIT) and are combined, in a fixed
    # order (deterministic), by the next kernel.

    @triton.jit
    def _bn_tile(X, c, r0, C, R, L, sc, sn, sl, BLOCK_R: tl.constexpr):
        r = r0 + tl.arange(0, BLOCK_R)
        n = r // L
        mask = (c[:, None] < C) & (r[None, :] < R)
        offs = (c[:, None].to(tl.int64) * sc + n[None, :].to(tl.int64) * sn
                + (r - n * L)[None, :].to(tl.int64) * sl)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        return x, offs, mask

    @triton.jit
    def _bn_combine(PART, k, c, cmask, C, SPLIT, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """Sum over the SPLIT partials of quantity k for channels c."""
        acc = tl.zeros((BLOCK_C, BLOCK_P), tl.float32)
        for p0 in range(0, SPLIT, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            offs = (k * C + c[:, None]).to(tl.int64) * SPLIT + p[None, :]
            acc += tl.load(PART + offs, mask=cmask[:, None] & (p[None, :] < SPLIT), other=0.0)
        return tl.sum(acc, 1)

    @triton.jit
    def _bn_plain_moments(PART, X, c, cmask, C, SPLIT, sc, m, CENTERED: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """(shift, Σu, Σu², mean0, var0) of each channel from the pass-1 partials."""
        s1 = _bn_combine(PART, 0, c, cmask, C, SPLIT, BLOCK_C, BLOCK_P)
        s2 = _bn_combine(PART, 1, c, cmask, C, SPLIT, BLOCK_C, BLOCK_P)
        if CENTERED:
            shift = tl.load(X + c.to(tl.int64) * sc, mask=cmask, other=0.0).to(tl.float32)
        else:
            shift = tl.zeros((BLOCK_C,), tl.float32)
        mean0, var0 = _plain_moments(s1, s2, shift, m, CENTERED)
        return shift, s1, s2, mean0, var0

    @triton.jit
    def bn_sums_kernel(X, PART, C, R, L, sc, sn, sl, SPLIT, ROWS,
                       CENTERED: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
        """Pass 1: shifted partial sums Σu, Σu² with u = x − x[c, row 0] (centered) or x."""
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        p = tl.program_id(1)
        cmask = c < C
        if CENTERED:
            shift = tl.load(X + c.to(tl.int64) * sc, mask=cmask, other=0.0).to(tl.float32)
        else:
            shift = tl.zeros((BLOCK_C,), tl.float32)
        a1 = tl.zeros((BLOCK_C, BLOCK_R), tl.float32)
        a2 = tl.zeros((BLOCK_C, BLOCK_R), tl.float32)
        r_end = tl.minimum(R, (p + 1) * ROWS)
        for r0 in range(p * ROWS, r_end, BLOCK_R):
            x, offs, mask = _bn_tile(X, c, r0, C, r_end, L, sc, sn, sl, BLOCK_R)
            u = tl.where(mask, x - shift[:, None], 0.0)
            a1 += u
            a2 += u * u
        out = c.to(tl.int64) * SPLIT + p
        tl.store(PART + out, tl.sum(a1, 1), mask=cmask)
        tl.store(PART + C * SPLIT + out, tl.sum(a2, 1), mask=cmask)

    @triton.jit
    def bn_filter_sums_kernel(X, PART, FPART, EPSX, C, R, L, sc, sn, sl, SPLIT, ROWS, eps, thr,
                              HAS_EPSX: tl.constexpr, CENTERED: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                              BLOCK_P: tl.constexpr):
        """Pass 2: partial Σf, Σf·u, Σf·u² with f = [|x − μ0| r0 ≤ T], u = x − μ0 (eq. 4–7)."""
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        p = tl.program_id(1)
        cmask = c < C
        if HAS_EPSX:
            eps = eps + tl.load(EPSX).to(tl.float32)
        m = R.to(tl.float32)
        _shift, _s1, _s2, mean0, var0 = _bn_plain_moments(PART, X, c, cmask, C, SPLIT, sc, m,
                                                          CENTERED, BLOCK_C, BLOCK_P)
        r0 = 1.0 / tl.sqrt(var0 + eps)
        b1 = tl.zeros((BLOCK_C, BLOCK_R), tl.float32)
        b2 = tl.zeros((BLOCK_C, BLOCK_R), tl.float32)
        b3 = tl.zeros((BLOCK_C, BLOCK_R), tl.float32)
        r_end = tl.minimum(R, (p + 1) * ROWS)
        for r0_ in range(p * ROWS, r_end, BLOCK_R):
            x, offs, mask = _bn_tile(X, c, r0_, C, r_end, L, sc, sn, sl, BLOCK_R)
            u = x - mean0[:, None]
            f = tl.where(mask & (tl.abs(u * r0[:, None]) <= thr), 1.0, 0.0)
            u = u * f
            b1 += f
            b2 += u
            b3 += u * u
        out = c.to(tl.int64) * SPLIT + p
        tl.store(FPART + out, tl.sum(b1, 1), mask=cmask)
        tl.store(FPART + C * SPLIT + out, tl.sum(b2, 1), mask=cmask)
        tl.store(FPART + 2 * C * SPLIT + out, tl.sum(b3, 1), mask=cmask)

    @triton.jit
    def bn_apply_kernel(X, Y, W, B, EPSX, PART, FPART, STATS, RM, RV, C, R, L, sc, sn, sl,
                        SPLIT, ROWS, eps, thr, kap, factor,
                        HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_EPSX: tl.constexpr,
                        CENTERED: tl.constexpr, FILTER: tl.constexpr, HAS_RUN: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
        """Pass 3: combine the partials into (filtered) μ, σ², then y = γ (x − μ) r + β (eq. 8);
        the first program of each channel block also stores the statistics and, with
        HAS_RUN, updates the running averages (variance unbiased over the kept count)."""
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        p = tl.program_id(1)
        cmask = c < C
        if HAS_EPSX:
            eps = eps + tl.load(EPSX).to(tl.float32)
        m = R.to(tl.float32)
        shift, s1, s2, mean0, var0 = _bn_plain_moments(PART, X, c, cmask, C, SPLIT, sc, m,
                                                       CENTERED, BLOCK_C, BLOCK_P)
        kept = s1
        f1 = s1
        f2 = s2
        if FILTER:
            kept = _bn_combine(FPART, 0, c, cmask, C, SPLIT, BLOCK_C, BLOCK_P)
            f1 = _bn_combine(FPART, 1, c, cmask, C, SPLIT, BLOCK_C, BLOCK_P)
            f2 = _bn_combine(FPART, 2, c, cmask, C, SPLIT, BLOCK_C, BLOCK_P)
        mean, var, cnt = _final_moments(s1, s2, shift, m, mean0, kept, f1, f2, kap, CENTERED,
                                        FILTER)
        rstd = 1.0 / tl.sqrt(var + eps)
        if HAS_W:
            w = tl.load(W + c, mask=cmask, other=1.0).to(tl.float32)
        else:
            w = tl.full((BLOCK_C,), 1.0, tl.float32)
        if HAS_B:
            bb = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)
        else:
            bb = tl.zeros((BLOCK_C,), tl.float32)
        a = w * rstd
        b0 = bb - mean * a
        r_end = tl.minimum(R, (p + 1) * ROWS)
        for r0 in range(p * ROWS, r_end, BLOCK_R):
            x, offs, mask = _bn_tile(X, c, r0, C, r_end, L, sc, sn, sl, BLOCK_R)
            y = x * a[:, None] + b0[:, None]
            tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        if p == 0:
            tl.store(STATS + 0 * C + c, mean0, mask=cmask)
            tl.store(STATS + 1 * C + c, var0, mask=cmask)
            tl.store(STATS + 2 * C + c, mean, mask=cmask)
            tl.store(STATS + 3 * C + c, var, mask=cmask)
            tl.store(STATS + 4 * C + c, rstd, mask=cmask)
            tl.store(STATS + 5 * C + c, cnt, mask=cmask)
            if HAS_RUN:
                rm = tl.load(RM + c, mask=cmask, other=0.0).to(tl.float32)
                rv = tl.load(RV + c, mask=cmask, other=0.0).to(tl.float32)
                unbiased = var * (cnt / tl.maximum(cnt - 1.0, 1.0))
                tl.store(RM + c, (rm + factor * (mean - rm)).to(RM.dtype.element_ty), mask=cmask)
                tl.store(RV + c, (rv + factor * (unbiased - rv)).to(RV.dtype.element_ty),
                         mask=cmask)

    @triton.jit
    def bn_bwd_sums_kernel(X, DZ, STATS, BPART, C, R, L, sc, sn, sl, dsc, dsn, dsl, SPLIT, ROWS,
                           BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
        """Backward pass 1: partial Σ∂ℓ/∂y and Σ∂ℓ/∂y · (x − μ) per channel."""
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        p = tl.program_id(1)
        cmask = c < C
        mean = tl.load(STATS + 2 * C + c, mask=cmask, other=0.0)
        a1 = tl.zeros((BLOCK_C, BLOCK_R), tl.float32)
        a2 = tl.zeros((BLOCK_C, BLOCK_R), tl.float32)
        r_end = tl.minimum(R, (p + 1) * ROWS)
        for r0 in range(p * ROWS, r_end, BLOCK_R):
            x, offs, mask = _bn_tile(X, c, r0, C, r_end, L, sc, sn, sl, BLOCK_R)
            dy, doffs, _m = _bn_tile(DZ, c, r0, C, r_end, L, dsc, dsn, dsl, BLOCK_R)
            a1 += dy
            a2 += tl.where(mask, dy * (x - mean[:, None]), 0.0)
        out = c.to(tl.int64) * SPLIT + p
        tl.store(BPART + out, tl.sum(a1, 1), mask=cmask)
        tl.store(BPART + C * SPLIT + out, tl.sum(a2, 1), mask=cmask)

    @triton.jit
    def bn_bwd_dx_kernel(X, DZ, DX, W, EPSX, STATS, BPART, C, R, L, sc, sn, sl, dsc, dsn, dsl,
                         SPLIT, ROWS, eps, thr, kap,
                         HAS_W: tl.constexpr, HAS_EPSX: tl.constexpr, CENTERED: tl.constexpr,
                         FILTER: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_P: tl.constexpr):
        """Backward pass 2: ∂ℓ/∂x = r (g − f (Σg/M + x̂ Σg x̂ / (κM))), g = γ ∂ℓ/∂y."""
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        p = tl.program_id(1)
        cmask = c < C
        if HAS_EPSX:
            eps = eps + tl.load(EPSX).to(tl.float32)
        m = R.to(tl.float32)
        mean0 = tl.load(STATS + 0 * C + c, mask=cmask, other=0.0)
        var0 = tl.load(STATS + 1 * C + c, mask=cmask, other=1.0)
        mean = tl.load(STATS + 2 * C + c, mask=cmask, other=0.0)
        rstd = tl.load(STATS + 4 * C + c, mask=cmask, other=1.0)
        cnt = tl.load(STATS + 5 * C + c, mask=cmask, other=1.0)
        if HAS_W:
            w = tl.load(W + c, mask=cmask, other=1.0).to(tl.float32)
        else:
            w = tl.full((BLOCK_C,), 1.0, tl.float32)
        sg = w * _bn_combine(BPART, 0, c, cmask, C, SPLIT, BLOCK_C, BLOCK_P)
        sgx = w * rstd * _bn_combine(BPART, 1, c, cmask, C, SPLIT, BLOCK_C, BLOCK_P)
        if FILTER:
            th = tl.where(cnt < m, thr, 3.0e38)  # all kept (or the fallback): no mask
            kk = kap
        else:
            th = tl.full((BLOCK_C,), 3.0e38, tl.float32)
            kk = 1.0
        r0 = 1.0 / tl.sqrt(var0 + eps)
        a = w * rstd
        if CENTERED:
            bc = rstd * sg / cnt
        else:
            bc = tl.zeros((BLOCK_C,), tl.float32)
        cc = rstd * rstd * sgx / (kk * cnt)
        r_end = tl.minimum(R, (p + 1) * ROWS)
        for r0_ in range(p * ROWS, r_end, BLOCK_R):
            x, offs, mask = _bn_tile(X, c, r0_, C, r_end, L, sc, sn, sl, BLOCK_R)
            dy, doffs, _m = _bn_tile(DZ, c, r0_, C, r_end, L, dsc, dsn, dsl, BLOCK_R)
            f = tl.where(tl.abs((x - mean0[:, None]) * r0[:, None]) <= th[:, None], 1.0, 0.0)
            dx = a[:, None] * dy - f * (bc[:, None] + (x - mean[:, None]) * cc[:, None])
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)



def _geometry(x: Tensor, pl: Plan):
    """(S, G2, sA, sB, JH, L, sJ, sL, P_MUL, P_J) for ``x`` under a rows plan (strided view)."""
    x4 = x.view(pl.n, pl.g, pl.cg, pl.l)  # raises if the layout can't be viewed so
    sa, sb, sj, sl = x4.stride()
    return pl.n * pl.g, pl.g, sa, sb, pl.cg, pl.l, sj, sl, pl.cg, 1


class BNLaunch(NamedTuple):
    """How the batch-norm kernels split the work: a grid of (C / block_c, split) programs,
    each reducing ``rows`` consecutive rows of ``block_c`` channels, ``block_r`` at a time."""
    block_c: int
    block_r: int
    split: int
    rows: int
    block_p: int


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def bn_launch(x: Tensor) -> BNLaunch:
    """Launch configuration for ``x`` of shape (N, C, L).

    Tiles run along the contiguous axis: channels for channels_last (and (N, C) inputs),
    rows otherwise. ``split`` spreads one channel's rows over enough programs to fill the GPU
    (about four per streaming multiprocessor); ``NORMLAB_TRITON_BN_SPLIT`` forces it (tests,
    tuning).
    """
    n, c, l = x.shape
    rows_total = n * l
    if x.stride(1) == 1 and c > 1:       # channels contiguous: wide channel tiles
        block_c = min(_pow2(c), 64)
        block_r = max(1, min(_pow2(rows_total), 2048 // block_c))
    else:                                # rows contiguous (NCHW): one channel per program
        block_c = 1
        block_r = min(_pow2(rows_total), 2048)
    n_cblocks = -(-c // block_c)
    forced = os.environ.get("NORMLAB_TRITON_BN_SPLIT", "")
    if forced:
        split = max(1, min(int(forced), rows_total))
        rows = -(-rows_total // split)
    else:
        sms = (torch.cuda.get_device_properties(x.device).multi_processor_count
               if x.is_cuda else 2)
        split = max(1, min(-(-4 * sms // n_cblocks), -(-rows_total // block_r)))
        rows = -(-(-(-rows_total // split)) // block_r) * block_r
    split = -(-rows_total // rows)
    block_p = min(_pow2(split), max(1, 4096 // block_c))
    return BNLaunch(block_c, block_r, split, rows, block_p)


def _bn_forward(x, w, b, eps_extra, threshold, kap, centered, eps, running=None):
    """Batch norm forward with the split kernels; returns (y, stats (6, C) float32) and
    updates ``running`` (RunningStats or None) in the same launch."""
    n, c, l = x.shape
    cfg = bn_launch(x)
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    part = torch.empty(2, c, cfg.split, dtype=torch.float32, device=x.device)
    fpart = torch.empty(3, c, cfg.split, dtype=torch.float32, device=x.device) \
        if threshold is not None else part
    stats = torch.empty(6, c, dtype=torch.float32, device=x.device)
    grid = (-(-c // cfg.block_c), cfg.split)
    geo = (c, n * l, l, x.stride(1), x.stride(0), x.stride(2))
    epsx = eps_extra if eps_extra is not None else x
    warps = 8 if cfg.block_c * cfg.block_r >= 2048 else 4
    thr = -1.0 if threshold is None else float(threshold)
    bn_sums_kernel[grid](x, part, *geo, cfg.split, cfg.rows, CENTERED=bool(centered),
                         BLOCK_C=cfg.block_c, BLOCK_R=cfg.block_r, num_warps=warps)
    if threshold is not None:
        bn_filter_sums_kernel[grid](x, part, fpart, epsx, *geo, cfg.split, cfg.rows,
                                    float(eps), thr, HAS_EPSX=eps_extra is not None,
                                    CENTERED=bool(centered), BLOCK_C=cfg.block_c,
                                    BLOCK_R=cfg.block_r, BLOCK_P=cfg.block_p, num_warps=warps)
    rm, rv, factor = running if running is not None else (stats, stats, 0.0)
    bn_apply_kernel[grid](x, y, w if w is not None else x, b if b is not None else x, epsx,
                          part, fpart, stats, rm, rv, *geo, cfg.split, cfg.rows, float(eps), thr,
                          kap, float(factor), HAS_W=w is not None, HAS_B=b is not None,
                          HAS_EPSX=eps_extra is not None, CENTERED=bool(centered),
                          FILTER=threshold is not None, HAS_RUN=running is not None,
                          BLOCK_C=cfg.block_c,
                          BLOCK_R=cfg.block_r, BLOCK_P=cfg.block_p, num_warps=warps)
    return y, stats


def _bn_backward(x, dz, w, eps_extra, stats, threshold, kap, centered, eps, need_dx):
    """Batch norm backward with the split kernels; returns (dx or None, Σdy, Σdy·x̂) per channel."""
    n, c, l = x.shape
    cfg = bn_launch(x)
    bpart = torch.empty(2, c, cfg.split, dtype=torch.float32, device=x.device)
    grid = (-(-c // cfg.block_c), cfg.split)
    geo = (c, n * l, l, x.stride(1), x.stride(0), x.stride(2))
    dgeo = (dz.stride(1), dz.stride(0), dz.stride(2))
    warps = 8 if cfg.block_c * cfg.block_r >= 2048 else 4
    bn_bwd_sums_kernel[grid](x, dz, stats, bpart, *geo, *dgeo, cfg.split, cfg.rows,
                             BLOCK_C=cfg.block_c, BLOCK_R=cfg.block_r, num_warps=warps)
    dx = None
    if need_dx:
        dx = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        bn_bwd_dx_kernel[grid](x, dz, dx, w if w is not None else x,
                               eps_extra if eps_extra is not None else x, stats, bpart, *geo,
                               *dgeo, cfg.split, cfg.rows, float(eps),
                               -1.0 if threshold is None else float(threshold), kap,
                               HAS_W=w is not None, HAS_EPSX=eps_extra is not None,
                               CENTERED=bool(centered), FILTER=threshold is not None,
                               BLOCK_C=cfg.block_c, BLOCK_R=cfg.block_r,
                               BLOCK_P=cfg.block_p, num_warps=warps)
    sums = bpart.sum(2)
    return dx, sums[0], sums[1] * stats[4]


def _as_viewable(t: Tensor, pl: Plan) -> Tensor:
    if pl.kind == "rows":
        try:
            t.view(pl.n, pl.g, pl.cg, pl.l)
        except RuntimeError:
            return t.contiguous()
    return t


def _blocks(geo) -> tuple[int, int]:
    """(BLOCK_J, BLOCK_L) of the per-row kernels: tiles long along the contiguous axis —
    positions for NCHW, the group's channels for channels_last (GN)."""
    jh, l, s_j, s_l = geo[4], geo[5], geo[6], geo[7]
    if s_j == 1 and s_l != 1 and jh > 1:
        bj = min(_pow2(jh), 32)
        return bj, max(1, min(_pow2(l), 1024 // bj))
    bl = min(_pow2(l), 1024)
    return max(1, min(1024 // bl, _pow2(jh))), bl


def _one_channel_rows(geo) -> bool:
    """Rows of one channel each whose channels are contiguous (FRN/IN on channels_last):
    the multi-row kernels read those coalesced."""
    return geo[4] == 1 and geo[3] == 1 and geo[7] != 1 and geo[1] > 1


def _rows1_blocks(g: int, l: int) -> tuple[int, int]:
    bs = min(_pow2(g), 32)
    return bs, max(1, min(_pow2(l), 2048 // bs))


def _rows_forward(x, pl, w, b, t, k, eps_extra, threshold, kap, centered, eps, act):
    """Rows family (GN/IN/LN/FRN): one program per row, or per BLOCK_S one-channel rows on
    channels_last; returns (y, stats (6, rows))."""
    fwd, _ = _kernels()
    geo = _geometry(x, pl)
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    S = geo[0]
    stats = torch.empty(6, S, dtype=torch.float32, device=x.device)
    if _one_channel_rows(geo):
        G, L = geo[1], geo[5]
        bs, bl = _rows1_blocks(G, L)
        rows1_fwd_kernel[(S // G, -(-G // bs))](
            x, y, w if w is not None else x, b if b is not None else x,
            t if t is not None else x, k if k is not None else x,
            eps_extra if eps_extra is not None else x, stats, G, L, geo[2], geo[3], geo[7],
            float(eps), -1.0 if threshold is None else float(threshold), kap,
            HAS_W=w is not None, HAS_B=b is not None, HAS_EPSX=eps_extra is not None, ACT=act,
            CENTERED=bool(centered), FILTER=threshold is not None, BLOCK_S=bs, BLOCK_L=bl,
            num_warps=8 if bs * bl >= 2048 else 4)
        return y, stats
    bj, bl = _blocks(geo)
    dummy = x
    fwd[(S,)](x, y, w if w is not None else dummy, b if b is not None else dummy,
              t if t is not None else dummy, k if k is not None else dummy,
              eps_extra if eps_extra is not None else dummy, stats, *geo,
              float(eps), -1.0 if threshold is None else float(threshold), kap,
              HAS_W=w is not None, HAS_B=b is not None, HAS_EPSX=eps_extra is not None,
              ACT=act, CENTERED=bool(centered), FILTER=threshold is not None,
              BLOCK_J=bj, BLOCK_L=bl, num_warps=8 if bj * bl >= 1024 else 4)
    return y, stats


def _rows_backward(x, dz, pl, w, b, t, k, eps_extra, stats, threshold, kap, centered, eps,
                   act, need_dx):
    """Rows family backward; returns (dx or None, per-parameter sums (P, 4), Σg·x̂ per row)."""
    _, bwd = _kernels()
    geo = _geometry(x, pl)
    dgeo = _geometry(dz, pl)
    S, jh = geo[0], geo[4]
    dx = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device) \
        if need_dx else x
    ws = torch.empty(S, jh, 4, dtype=torch.float32, device=x.device)
    gx = torch.empty(S, dtype=torch.float32, device=x.device)
    dummy = x
    if _one_channel_rows(geo):
        G, L = geo[1], geo[5]
        bs, bl = _rows1_blocks(G, L)
        rows1_bwd_kernel[(S // G, -(-G // bs))](
            x, dz, dx, w if w is not None else dummy, b if b is not None else dummy,
            t if t is not None else dummy, k if k is not None else dummy,
            eps_extra if eps_extra is not None else dummy, stats, ws, gx, G, L,
            geo[2], geo[3], geo[7], dgeo[2], dgeo[3], dgeo[7], float(eps),
            -1.0 if threshold is None else float(threshold), kap,
            HAS_W=w is not None, HAS_B=b is not None, HAS_EPSX=eps_extra is not None, ACT=act,
            CENTERED=bool(centered), FILTER=threshold is not None, NEED_DX=need_dx,
            BLOCK_S=bs, BLOCK_L=bl, num_warps=8 if bs * bl >= 2048 else 4)
    else:
        _rows_backward_per_row(bwd, x, dz, dx, w, b, t, k, eps_extra, stats, ws, gx, geo, dgeo,
                               threshold, kap, centered, eps, act, need_dx)
    return _param_sums(x, pl, geo, ws, need_dx, dx, gx)


def _rows_backward_per_row(bwd, x, dz, dx, w, b, t, k, eps_extra, stats, ws, gx, geo, dgeo,
                           threshold, kap, centered, eps, act, need_dx):
    S = geo[0]
    bj, bl = _blocks(geo)
    dummy = x
    bwd[(S,)](x, dz, dx, w if w is not None else dummy, b if b is not None else dummy,
              t if t is not None else dummy, k if k is not None else dummy,
              eps_extra if eps_extra is not None else dummy, stats, ws, gx,
              *geo[:8], dgeo[2], dgeo[3], dgeo[6], dgeo[7], geo[8], geo[9],
              float(eps), -1.0 if threshold is None else float(threshold), kap,
              HAS_W=w is not None, HAS_B=b is not None, HAS_EPSX=eps_extra is not None,
              ACT=act, CENTERED=bool(centered), FILTER=threshold is not None,
              NEED_DX=need_dx, BLOCK_J=bj, BLOCK_L=bl,
              num_warps=8 if bj * bl >= 1024 else 4)


def _param_sums(x, pl, geo, ws, need_dx, dx, gx):
    """Per-parameter sums from the (rows, Cg, 4) workspace: value (s, j) feeds parameter
    (s % G) * Cg + j."""
    S, jh = geo[0], geo[4]
    g2, p_mul, p_j = geo[1], geo[8], geo[9]
    sidx = torch.arange(S, device=x.device) % g2
    pidx = (sidx[:, None] * p_mul + torch.arange(jh, device=x.device)[None, :] * p_j)
    per_param = torch.zeros(pl.g * pl.cg, 4, dtype=torch.float32, device=x.device)
    per_param.index_add_(0, pidx.reshape(-1), ws.reshape(-1, 4))
    return (dx if need_dx else None), per_param, gx


def forward(x, weight, bias, eps_extra, tau, akappa, pl: Plan, threshold, centered, eps,
            gaussian_consistent, act):
    """Triton twin of :func:`normlab.kernels.cpu.forward` (same inputs and outputs): the
    body of the ``normlab::normalize_triton`` op (:mod:`normlab.kernels.ops`).

    Batch norm (channel plans) runs the split kernels (:func:`bn_launch`); the rows family
    runs one program per row, with the TLU / affine TLU fused. Returns ``(y, stats (6, sets))``.
    """
    kap = (F.truncated_normal_variance_factor(threshold)
           if gaussian_consistent and threshold is not None else 1.0)
    w, b, t, k = (canonical_param(p, pl) for p in (weight, bias, tau, akappa))
    if pl.kind == "channel":
        if act != ACT_CODES["none"]:
            raise ValueError("the Triton batch-norm kernels fuse no activation; "
                             f"got act={act} (apply it after the normalization)")
        return _bn_forward(x, w, b, eps_extra, threshold, kap, centered, eps)
    x = _as_viewable(x, pl)
    if act == ACT_CODES["tlu"] and t is None:  # ReLU: TLU with τ = 0
        t = torch.zeros(pl.g * pl.cg, dtype=x.dtype, device=x.device)
    return _rows_forward(x, pl, w, b, t, k, eps_extra, threshold, kap, centered, eps, act)


def backward(x, grad_y, weight, bias, eps_extra, tau, akappa, stats, pl: Plan, threshold,
             centered, eps, gaussian_consistent, act, need_dx):
    """Triton twin of :func:`normlab.kernels.cpu.backward`: ``(dx or None, sums, gxhat)``."""
    kap = (F.truncated_normal_variance_factor(threshold)
           if gaussian_consistent and threshold is not None else 1.0)
    if pl.kind == "rows":
        x = _as_viewable(x, pl)
    w, b, t, k = (canonical_param(p, pl) for p in (weight, bias, tau, akappa))
    if pl.kind == "channel":
        dx, s_dy, s_dyxhat = _bn_backward(x, grad_y.to(x.dtype), w, eps_extra, stats,
                                          threshold, kap, centered, eps, need_dx)
        g_xhat = s_dyxhat * (w.float() if w is not None else 1.0)
        return dx, torch.stack([s_dy, s_dyxhat]), g_xhat
    if act == ACT_CODES["tlu"] and t is None:
        t = torch.zeros(pl.g * pl.cg, dtype=x.dtype, device=x.device)
    dz = _as_viewable(grad_y.to(x.dtype), pl)
    dx, per_param, g_xhat = _rows_backward(x, dz, pl, w, b, t, k, eps_extra, stats,
                                           threshold, kap, centered, eps, act, need_dx)
    return dx, per_param.t().contiguous(), g_xhat
