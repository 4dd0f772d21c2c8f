"""Triton kernels for CUDA tensors: (filtered) normalize + affine (+ TLU), forward and backward.

The kernels are in :mod:`normlab.kernels._triton_source`; this module chooses their launch
configurations and launches them. Statistics and accumulation in float32; inputs float32,
float16 or bfloat16 with any strides (NCHW and channels_last views). Backward recomputes
the robust-filter mask and the TLU decision from ``x`` and the saved per-set statistics;
the math is that of :mod:`normlab.kernels.analytic`.

Exactness (see ``_triton_source`` and docs/performance.md): the plain and the filtered
moments are each accumulated as per-lane shifted sums merged with Chan's formula, the mean
carried as a float32 pair, so outliers up to 1e6, sets keeping one value and |μ|/σ of 1e8
cost no digits; a set holding NaN/Inf is NaN throughout, TLU and ReLU included.

Two families:

**Batch norm** (channel plans, ``x`` viewed ``(N, C, L)``, :class:`BNView`): a channel's
``N·L`` values are few and long, so its reduction is split over ``split`` programs
(:func:`bn_launch`), each owning a chunk of rows of ``block_c`` channels, read along the
contiguous axis (rows for NCHW, channels for channels_last). Forward: plain partials →
merge → filtered partials (skipped without a threshold) → merge (+ running averages) →
``y = γ (x − μ′) r + β`` ([HA20] eq. 8), five launches, three reads of ``x``; backward:
partial ``Σ∂ℓ/∂y``, ``Σ∂ℓ/∂y·(x − μ)`` → merge → ``∂ℓ/∂x``. Partials are merged in a
fixed order: results are deterministic.

**Rows** (GN/IN/LN/FRN family, :class:`RowsView`): one program per row runs every pass of
that row — plain moments, filter moments, then normalize with an optional TLU ([SK20] eq. 3)
or affine TLU — re-reading the row from L2 (:class:`RowsLaunch`); one-channel rows on
channels_last (FRN/IN) take up to 32 neighbouring channels per program
(:class:`Rows1Launch`).

Every launch goes through :func:`_launch`: ``torch.library.wrap_triton`` while torch traces
(so a ``torch.library.triton_op`` built on the launch helpers shows inductor its kernels),
a direct launch otherwise. The helpers (:func:`_bn_forward`, :func:`_bn_backward`,
:func:`_rows_forward`, :func:`_rows_backward`) hold no autograd.

``TRITON_INTERPRET=1`` runs these kernels on CPU tensors (how CI tests them).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import functional as F
from .layout import Plan, canonical_param
from .spec import KERNEL_ACT_CODES

__all__ = ["available", "forward", "backward", "ACT_CODES",
           "BNView", "BNLaunch", "bn_launch", "RowsView", "RowsLaunch", "Rows1Launch",
           "rows_launch", "STATS_ROWS"]

ACT_CODES = KERNEL_ACT_CODES  # the kernels' act argument (spec.py)
STATS_ROWS = 11  # rows of the statistics buffer; 0–5: mean0, var0, mean, var, rstd, count

try:  # Triton is optional: without it (or with a broken install) the reference path runs
    from . import _triton_source as _src
except Exception:  # noqa: BLE001
    _src = None

try:
    from torch.library import wrap_triton as _wrap_triton
except ImportError:  # torch < 2.6
    _wrap_triton = None


def available() -> bool:
    """Whether Triton is importable (CUDA dispatch also needs a CUDA tensor)."""
    return _src is not None


def _kernels():
    if _src is None:
        raise RuntimeError("triton is not installed: pip install triton")
    return _src


def _tracing() -> bool:
    """Whether torch is tracing this call (dynamo, or a dispatch mode such as the fake /
    functional tensor modes under which a triton_op is traced)."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def _launch(kernel, grid: tuple, num_warps: int, **args) -> None:
    """``kernel[grid](**args)`` — through ``torch.library.wrap_triton`` while torch traces, so
    the launch is recorded as a graph node; directly in eager mode, where wrap_triton's
    higher-order-op dispatch would add about a millisecond per launch."""
    runner = _wrap_triton(kernel) if _wrap_triton is not None and _tracing() else kernel
    runner[grid](**args, num_warps=num_warps)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ---- batch norm ------------------------------------------------------------------------

class BNView(NamedTuple):
    """A tensor viewed ``(N, C, L)``: channel ``c``'s set is rows ``r = n·L + l``."""
    channels: int
    rows: int          # N·L values per channel
    positions: int     # L
    stride_c: int
    stride_n: int
    stride_l: int


def _bn_view(t: Tensor) -> BNView:
    n, c, l = t.shape
    return BNView(c, n * l, l, t.stride(1), t.stride(0), t.stride(2))


class BNLaunch(NamedTuple):
    """How the batch-norm kernels split the work: a grid of (channel_blocks, split) programs,
    each reducing ``rows_per_program`` consecutive rows of ``block_c`` channels, ``block_r``
    at a time; the merge launches (grid (channel_blocks,)) read ``block_p`` partials at a
    time."""
    block_c: int
    block_r: int
    split: int
    rows_per_program: int
    block_p: int
    channel_blocks: int
    num_warps: int

    @property
    def grid(self) -> tuple[int, int]:
        return (self.channel_blocks, self.split)

    @property
    def merge_warps(self) -> int:
        """Warps of the merge launches, which hold (block_c, block_p) tiles."""
        return 8 if self.block_c * self.block_p >= 2048 else 4


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
    return BNLaunch(block_c=block_c, block_r=block_r, split=split, rows_per_program=rows,
                    block_p=block_p, channel_blocks=n_cblocks,
                    num_warps=8 if block_c * block_r >= 2048 else 4)


def _threshold_arg(threshold) -> float:
    return -1.0 if threshold is None else float(threshold)


def _bn_forward(x, w, b, eps_extra, threshold, kap, centered, eps, running=None):
    """Batch norm forward with the split kernels; returns ``(y, stats)`` with ``stats`` the
    (STATS_ROWS, C) float32 buffer (rows 0–5: mean0, var0, mean, var, rstd, count), and
    updates ``running`` (RunningStats or None: its mean/var are written in place) in the
    last merge launch."""
    src = _kernels()
    cfg = bn_launch(x)
    view = _bn_view(x)
    c = view.channels
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    part = torch.empty(4, c, cfg.split, dtype=torch.float32, device=x.device)
    stats = torch.empty(STATS_ROWS, c, dtype=torch.float32, device=x.device)
    rm, rv, factor = running if running is not None else (stats, stats, 0.0)
    tiles = dict(**view._asdict(), SPLIT=cfg.split, ROWS=cfg.rows_per_program,
                 CENTERED=bool(centered), BLOCK_C=cfg.block_c, BLOCK_R=cfg.block_r)
    merge = dict(PART=part, STATS=stats, EPSX=eps_extra if eps_extra is not None else stats,
                 RM=rm, RV=rv, channels=c, rows=view.rows, SPLIT=cfg.split, eps=float(eps),
                 kap=float(kap), factor=float(factor), HAS_EPSX=eps_extra is not None,
                 CENTERED=bool(centered), FILTER=threshold is not None,
                 HAS_RUN=running is not None, BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p)
    for filtered in (False, True) if threshold is not None else (False,):
        _launch(src.bn_moments_kernel, cfg.grid, cfg.num_warps, X=x, STATS=stats, PART=part,
                thr=_threshold_arg(threshold), FILTERED=filtered, **tiles)
        _launch(src.bn_finalize_kernel, (cfg.channel_blocks,), cfg.merge_warps,
                FILTERED=filtered, **merge)
    _launch(src.bn_apply_kernel, cfg.grid, cfg.num_warps, X=x, Y=y,
            W=w if w is not None else x, B=b if b is not None else x, STATS=stats,
            **view._asdict(), ROWS=cfg.rows_per_program, HAS_W=w is not None,
            HAS_B=b is not None, BLOCK_C=cfg.block_c, BLOCK_R=cfg.block_r)
    return y, stats


def _dz_strides(view) -> dict:
    """The stride fields of a view of ∂ℓ/∂z, named as the backward kernels take them."""
    return {f"dz_{name}": value for name, value in view._asdict().items()
            if name.startswith("stride")}


def _bn_backward(x, dz, w, eps_extra, stats, threshold, kap, centered, eps, need_dx):
    """Batch norm backward with the split kernels; returns (dx or None, Σdy, Σdy·x̂) per
    channel. ``stats`` is the buffer :func:`_bn_forward` returned (ε, ε_extra are in it)."""
    src = _kernels()
    cfg = bn_launch(x)
    view = _bn_view(x)
    c = view.channels
    part = torch.empty(2, c, cfg.split, dtype=torch.float32, device=x.device)
    sums = torch.empty(2, c, dtype=torch.float32, device=x.device)
    tiles = dict(**view._asdict(), **_dz_strides(_bn_view(dz)), ROWS=cfg.rows_per_program,
                 BLOCK_C=cfg.block_c, BLOCK_R=cfg.block_r)
    _launch(src.bn_bwd_sums_kernel, cfg.grid, cfg.num_warps, X=x, DZ=dz, STATS=stats,
            PART=part, SPLIT=cfg.split, **tiles)
    _launch(src.bn_bwd_finalize_kernel, (cfg.channel_blocks,), cfg.merge_warps, PART=part,
            STATS=stats, SUMS=sums, channels=c, SPLIT=cfg.split, BLOCK_C=cfg.block_c,
            BLOCK_P=cfg.block_p)
    dx = None
    if need_dx:
        dx = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        _launch(src.bn_bwd_dx_kernel, cfg.grid, cfg.num_warps, X=x, DZ=dz, DX=dx,
                W=w if w is not None else x, STATS=stats, SUMS=sums,
                thr=_threshold_arg(threshold), kap=float(kap), HAS_W=w is not None,
                CENTERED=bool(centered), FILTER=threshold is not None, **tiles)
    return dx, sums[0], sums[1]


# ---- rows (GN, LN, IN, FRN) ------------------------------------------------------------

class RowsView(NamedTuple):
    """A tensor read as ``(n, g, j, l)`` under a rows plan: row ``s = n·G + g`` holds the
    values ``(j, l)``, ``j < channels``, ``l < positions``, at
    ``n·stride_n + g·stride_g + j·stride_c + l·stride_l``; parameter index ``g·channels + j``."""
    rows: int
    groups: int
    stride_n: int
    stride_g: int
    channels: int
    positions: int
    stride_c: int
    stride_l: int


def _rows_view(t: Tensor, pl: Plan) -> RowsView:
    sn, sg, sc, sl = t.view(pl.n, pl.g, pl.cg, pl.l).stride()  # raises if not viewable so
    return RowsView(pl.n * pl.g, pl.g, sn, sg, pl.cg, pl.l, sc, sl)


class RowsLaunch(NamedTuple):
    """One program per row, reading (block_j, block_l) tiles: long along the contiguous axis —
    positions for NCHW, the group's channels for channels_last (GN)."""
    grid: tuple
    block_j: int
    block_l: int
    num_warps: int


class Rows1Launch(NamedTuple):
    """Rows of one channel each whose channels are contiguous (FRN/IN on channels_last): a
    program takes ``block_s`` neighbouring rows of one sample and reads (block_s, block_l)
    tiles contiguous along the channels."""
    grid: tuple
    block_s: int
    block_l: int
    num_warps: int


def rows_launch(view: RowsView) -> RowsLaunch | Rows1Launch:
    """Launch configuration of the rows kernels for ``view``."""
    if view.channels == 1 and view.stride_g == 1 and view.stride_l != 1 and view.groups > 1:
        bs = min(_pow2(view.groups), 32)
        bl = max(1, min(_pow2(view.positions), 2048 // bs))
        return Rows1Launch((view.rows // view.groups, -(-view.groups // bs)), bs, bl,
                           8 if bs * bl >= 2048 else 4)
    jh, l = view.channels, view.positions
    if view.stride_c == 1 and view.stride_l != 1 and jh > 1:
        bj = min(_pow2(jh), 32)
        bl = max(1, min(_pow2(l), 1024 // bj))
    else:
        bl = min(_pow2(l), 1024)
        bj = max(1, min(1024 // bl, _pow2(jh)))
    return RowsLaunch((view.rows,), bj, bl, 8 if bj * bl >= 1024 else 4)


def _rows_args(view: RowsView, cfg) -> dict:
    """The geometry arguments of the rows kernels for ``cfg``'s kernel shape."""
    if isinstance(cfg, Rows1Launch):
        return dict(groups=view.groups, positions=view.positions, stride_n=view.stride_n,
                    stride_g=view.stride_g, stride_l=view.stride_l, BLOCK_S=cfg.block_s,
                    BLOCK_L=cfg.block_l)
    return dict(**view._asdict(), BLOCK_J=cfg.block_j, BLOCK_L=cfg.block_l)


def _rows_forward(x, pl, w, b, t, k, eps_extra, threshold, kap, centered, eps, act):
    """Rows family (GN/IN/LN/FRN) forward; returns ``(y, stats (STATS_ROWS, rows))``."""
    src = _kernels()
    view = _rows_view(x, pl)
    cfg = rows_launch(view)
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    stats = torch.empty(STATS_ROWS, view.rows, dtype=torch.float32, device=x.device)
    kernel = src.rows1_fwd_kernel if isinstance(cfg, Rows1Launch) else src.rows_fwd_kernel
    _launch(kernel, cfg.grid, cfg.num_warps, X=x, Y=y,
            W=w if w is not None else x, B=b if b is not None else x,
            TAU=t if t is not None else x, AK=k if k is not None else x,
            EPSX=eps_extra if eps_extra is not None else x, STATS=stats,
            **_rows_args(view, cfg), eps=float(eps), thr=_threshold_arg(threshold),
            kap=float(kap), HAS_W=w is not None, HAS_B=b is not None,
            HAS_EPSX=eps_extra is not None, ACT=act, CENTERED=bool(centered),
            FILTER=threshold is not None)
    return y, stats


def _rows_backward(x, dz, pl, w, b, t, k, eps_extra, stats, threshold, kap, centered, eps,
                   act, need_dx):
    """Rows family backward; returns (dx or None, per-parameter sums (P, 4): Σdy, Σdy·x̂,
    Σ∂ℓ/∂τ, Σ∂ℓ/∂κ; Σg·x̂ per row). ε is in ``stats``."""
    src = _kernels()
    view = _rows_view(x, pl)
    cfg = rows_launch(view)
    dx = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device) \
        if need_dx else x
    ws = torch.empty(view.rows, view.channels, 4, dtype=torch.float32, device=x.device)
    gx = torch.empty(view.rows, dtype=torch.float32, device=x.device)
    kernel = src.rows1_bwd_kernel if isinstance(cfg, Rows1Launch) else src.rows_bwd_kernel
    dz_strides = _dz_strides(_rows_view(dz, pl))
    if isinstance(cfg, Rows1Launch):
        dz_strides.pop("dz_stride_c")
    _launch(kernel, cfg.grid, cfg.num_warps, X=x, DZ=dz, DX=dx,
            W=w if w is not None else x, B=b if b is not None else x,
            TAU=t if t is not None else x, AK=k if k is not None else x, STATS=stats, WS=ws,
            GX=gx, **_rows_args(view, cfg), **dz_strides, thr=_threshold_arg(threshold),
            kap=float(kap), HAS_W=w is not None, HAS_B=b is not None, ACT=act,
            CENTERED=bool(centered), FILTER=threshold is not None, NEED_DX=bool(need_dx))
    return (dx if need_dx else None), _param_sums(view, ws), gx


def _param_sums(view: RowsView, ws: Tensor) -> Tensor:
    """Per-parameter sums from the (rows, channels, 4) workspace: value (s, j) feeds
    parameter (s % G)·channels + j."""
    return ws.view(-1, view.groups * view.channels, 4).sum(0)


def _as_viewable(t: Tensor, pl: Plan) -> Tensor:
    if pl.kind == "rows":
        try:
            t.view(pl.n, pl.g, pl.cg, pl.l)
        except RuntimeError:
            return t.contiguous()
    return t


def forward(x, weight, bias, eps_extra, tau, akappa, pl: Plan, threshold, centered, eps,
            gaussian_consistent, act):
    """Triton twin of :func:`normlab.kernels.cpu.forward` (same inputs and outputs): the
    body of the ``normlab::normalize_triton`` op (:mod:`normlab.kernels.ops`).

    Batch norm (channel plans) runs the split kernels (:func:`bn_launch`); the rows family
    runs one program per row, with the TLU / affine TLU fused. Returns ``(y, stats)``, stats
    ``(STATS_ROWS, sets)`` float32 (rows 0–5 as the op's contract, the rest private).
    """
    kap = F.variance_factor(threshold, gaussian_consistent)
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
    kap = F.variance_factor(threshold, gaussian_consistent)
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
