"""Triton kernels for CUDA tensors: (filtered) normalize + affine (+ TLU), forward and backward.

One program per reduction set (a BN channel, or a GN/FRN/IN/LN row) runs every pass of
that set: plain moments (shifted sums), the robust-filter moments (filtered-BN seed
eq. 4–7), then ``y = γ (x − μ′) r + β`` (eq. 8) with an optional TLU (FRN seed eq. 3) or
affine TLU. The set's later passes re-read it from L2. Backward recomputes the mask and the
TLU decision from ``x`` and the saved per-set statistics; the math is that of
:mod:`normlab.kernels.analytic`. Statistics and accumulation in float32; inputs float32,
float16 or bfloat16 with any strides (NCHW and channels_last views).

Index scheme (both families): set ``s`` starts at ``(s // G2) * sA + (s % G2) * sB``; its
values are ``(j, l)`` with ``j < JH``, ``l < L`` at ``j * sJ + l * sL``; the parameter
index of a value is ``(s % G2) * P_MUL + j * P_J``. BN ``(N, C, L)``: ``G2 = C``, ``JH = N``,
``P_MUL = 1``, ``P_J = 0``. Rows ``(N, G, Cg, L)``: ``G2 = G``, ``JH = Cg``, ``P_MUL = Cg``,
``P_J = 1``.

``TRITON_INTERPRET=1`` runs these kernels on CPU tensors (how CI tests them).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import functional as F
from .layout import Plan, canonical_param, param_grad

__all__ = ["available", "FusedNormTriton", "ACT_CODES", "fused_normalize_affine_act"]

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
        d0 = s1 / m
        if CENTERED:
            mean0 = shift + d0
            var0 = tl.maximum(s2 / m - d0 * d0, 0.0)
        else:
            mean0 = 0.0
            var0 = s2 / m
        cnt = m
        sf = s1
        sff = s2
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
            none_kept = kept == 0.0
            cnt = tl.where(none_kept, m, kept)
            # sums of (x - mean0): from pass 1 when nothing was kept
            sf = tl.where(none_kept, s1 - m * (mean0 - shift), tl.sum(tl.sum(b2, 1), 0))
            sff = tl.where(none_kept, s2 - 2.0 * (mean0 - shift) * s1
                           + m * (mean0 - shift) * (mean0 - shift), tl.sum(tl.sum(b3, 1), 0))
            shift = mean0
        d = sf / cnt
        if CENTERED:
            mean = shift + d
            var = tl.maximum(sff / cnt - d * d, 0.0)
        else:
            mean = 0.0
            var = sff / cnt
        if FILTER:
            var = var / kap
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



def _geometry(x: Tensor, pl: Plan):
    """(S, G2, sA, sB, JH, L, sJ, sL, P_MUL, P_J) for ``x`` under plan ``pl`` (strided view)."""
    if pl.kind == "channel":
        sn, sc, sl = x.stride()
        return pl.g, pl.g, 0, sc, pl.n, pl.l, sn, sl, 1, 0
    x4 = x.view(pl.n, pl.g, pl.cg, pl.l)  # raises if the layout can't be viewed so
    sa, sb, sj, sl = x4.stride()
    return pl.n * pl.g, pl.g, sa, sb, pl.cg, pl.l, sj, sl, pl.cg, 1


def _as_viewable(t: Tensor, pl: Plan) -> Tensor:
    if pl.kind == "rows":
        try:
            t.view(pl.n, pl.g, pl.cg, pl.l)
        except RuntimeError:
            return t.contiguous()
    return t


def _blocks(jh: int, l: int) -> tuple[int, int]:
    bl = min(1 << max(0, (l - 1).bit_length()), 1024)
    bj = max(1, min(1024 // bl, 1 << max(0, (jh - 1).bit_length())))
    return bj, bl


class FusedNormTriton(torch.autograd.Function):
    """Triton twin of :class:`normlab.kernels.cpu.FusedNormCPU` (same inputs and outputs)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps_extra, tau, akappa, pl: Plan, threshold, centered,
                eps, gaussian_consistent, act):
        fwd, _ = _kernels()
        x = _as_viewable(x, pl)
        kap = (F.truncated_normal_variance_factor(threshold)
               if gaussian_consistent and threshold is not None else 1.0)
        w, b, t, k = (canonical_param(p, pl) for p in (weight, bias, tau, akappa))
        if act == ACT_CODES["tlu"] and t is None:  # ReLU: TLU with τ = 0
            t = torch.zeros(pl.g * pl.cg, dtype=x.dtype, device=x.device)
        y = torch.empty_like(x)  # keeps x's strides (channels_last stays channels_last)
        geo = _geometry(x, pl)
        y_geo = _geometry(y, pl)
        if geo[2:4] + geo[6:8] != y_geo[2:4] + y_geo[6:8]:
            y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        S = geo[0]
        stats = torch.empty(6, S, dtype=torch.float32, device=x.device)
        bj, bl = _blocks(geo[4], geo[5])
        dummy = x
        fwd[(S,)](x, y, w if w is not None else dummy, b if b is not None else dummy,
                  t if t is not None else dummy, k if k is not None else dummy,
                  eps_extra if eps_extra is not None else dummy, stats, *geo,
                  float(eps), -1.0 if threshold is None else float(threshold), kap,
                  HAS_W=w is not None, HAS_B=b is not None, HAS_EPSX=eps_extra is not None,
                  ACT=act, CENTERED=bool(centered), FILTER=threshold is not None,
                  BLOCK_J=bj, BLOCK_L=bl, num_warps=8 if bj * bl >= 1024 else 4)
        ctx.save_for_backward(x, weight, bias, eps_extra, tau, akappa, stats)
        ctx.config = (pl, threshold, kap, centered, eps, act)
        shape = pl.stats_shape
        out = (stats[2].view(shape), stats[3].view(shape), stats[5].view(shape))
        ctx.mark_non_differentiable(*out)
        return (y, *out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _gm, _gv, _gc):
        _, bwd = _kernels()
        x, weight, bias, eps_extra, tau, akappa, stats = ctx.saved_tensors
        pl, threshold, kap, centered, eps, act = ctx.config
        w, b, t, k = (canonical_param(p, pl) for p in (weight, bias, tau, akappa))
        if act == ACT_CODES["tlu"] and t is None:
            t = torch.zeros(pl.g * pl.cg, dtype=x.dtype, device=x.device)
        dz = _as_viewable(grad_y.to(x.dtype), pl)
        geo = _geometry(x, pl)
        dgeo = _geometry(dz, pl)
        S, jh = geo[0], geo[4]
        need_dx = ctx.needs_input_grad[0]
        dx = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device) \
            if need_dx else x
        ws = torch.empty(S, jh, 4, dtype=torch.float32, device=x.device)
        gx = torch.empty(S, dtype=torch.float32, device=x.device)
        bj, bl = _blocks(jh, geo[5])
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
        # per-parameter sums: value (s, j) feeds parameter (s % G2) * P_MUL + j * P_J
        g2, p_mul, p_j = geo[1], geo[8], geo[9]
        sidx = torch.arange(S, device=x.device) % g2
        pidx = (sidx[:, None] * p_mul + torch.arange(jh, device=x.device)[None, :] * p_j)
        nparam = pl.g * pl.cg if pl.kind == "rows" else pl.g
        per_param = torch.zeros(nparam, 4, dtype=torch.float32, device=x.device)
        per_param.index_add_(0, pidx.reshape(-1), ws.reshape(-1, 4))
        grads = [dx if need_dx else None, None, None, None, None, None]
        if weight is not None and ctx.needs_input_grad[1]:
            grads[1] = param_grad(per_param[:, 1], weight, pl)
        if bias is not None and ctx.needs_input_grad[2]:
            grads[2] = param_grad(per_param[:, 0], bias, pl)
        if eps_extra is not None and ctx.needs_input_grad[3]:
            g_eps = (-0.5 * stats[4].square() * gx).sum()
            grads[3] = g_eps.to(eps_extra.dtype).reshape(eps_extra.shape)
        if tau is not None and ctx.needs_input_grad[4]:
            grads[4] = param_grad(per_param[:, 2], tau, pl)
        if akappa is not None and ctx.needs_input_grad[5]:
            grads[5] = param_grad(per_param[:, 3], akappa, pl)
        return (*grads, None, None, None, None, None, None)


def fused_normalize_affine_act(x, weight, bias, dims, *, activation="none", tau=None,
                               kappa=None, threshold=None, centered=True, eps=1e-5,
                               eps_extra=None, gaussian_consistent=False):
    """Call the Triton Function directly, whatever the device (tests use it on CPU tensors
    with ``TRITON_INTERPRET=1``). Returns ``(z, Moments)``; raises ValueError for a layout
    the kernels don't cover."""
    from .layout import plan
    dims = tuple(d % x.dim() for d in dims)
    pl = plan(x, (weight, bias, tau, kappa), dims)
    if pl is None:
        raise ValueError(f"no fused layout for x of shape {tuple(x.shape)} with dims {dims}")
    y, mean, var, count = FusedNormTriton.apply(
        x, weight, bias, eps_extra, tau, kappa, pl, threshold, centered, float(eps),
        gaussian_consistent, ACT_CODES[activation])
    return y, F.Moments(mean, var, count)
