"""Recognize the two reduction layouts the fused kernels implement.

``normalize_affine`` receives ``x`` already viewed so that statistics reduce over ``dims``
and ``weight``/``bias`` viewed to broadcast against it. Every normlab module produces one of
two shapes of problem:

* **channel** (batch norm): ``x`` is ``(N, C, L)``, ``dims == (0, 2)``, parameters ``(1, C, 1)``.
* **rows** (group/instance/layer norm, FRN family): ``dims`` are the trailing axes of ``x``;
  flattened, ``x`` is ``(R, K)`` with one statistic per row, and the parameters vary over
  a contiguous block of axes around the split, i.e. ``x`` reads as ``(N, G, Cg, L)`` with
  rows ``(n, g)``, statistics over ``(Cg, L)`` and parameters indexed by ``(g, cg)``
  (GN: ``(N, G, C/G, HW)``; IN/FRN: ``(N, C, 1, L)``; LN: ``(P, 1, D, 1)``).

:func:`plan` returns a :class:`Plan` for those, or ``None`` (the caller then uses the
reference Function). ``Plan.layout`` says how ``x``, read as ``(n, g, cg, l)``, lies in memory:

* ``"contiguous"``: in that order (``x.is_contiguous()``);
* ``"channels_last"``: in the order ``(n, l, g, cg)`` with no gaps, i.e. strides
  ``(l·C, cg, 1, C)`` with ``C = g·cg`` — what a ``channels_last`` (NHWC) activation becomes
  after the modules' ``reshape`` (BN: ``(N, C, L)`` with strides ``(L·C, 1, C)``);
* ``"strided"``: anything else (only the Triton kernels and the reference take it).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["Plan", "plan", "canonical_plan", "canonical_view", "canonical_param"]


class Plan(NamedTuple):
    kind: str                 # "channel" or "rows"
    n: int                    # BN: N; rows: leading size N (rows = n * g)
    g: int                    # BN: C; rows: groups G (parameters vary with g)
    cg: int                   # BN: 1; rows: channels per group
    l: int                    # BN: L; rows: positions per channel
    param_shape: tuple        # shape a canonical (G*Cg,) parameter is viewed as to broadcast
    stats_shape: tuple        # keepdim shape of the statistics
    layout: str = "contiguous"  # memory order of x: "contiguous", "channels_last" or "strided"


def _param_span(p: Tensor | None, shape: torch.Size, split: int) -> tuple[int, int] | None:
    """Smallest [j, m) around ``split`` outside which ``p`` has size 1; None if not broadcastable."""
    nd = len(shape)
    if p is None:
        return (split, split)
    if p.dim() != nd:
        return None
    for a, b in zip(p.shape, shape):
        if a not in (1, b):
            return None
    j = next((i for i in range(split) if p.shape[i] != 1), split)
    m = next((i + 1 for i in reversed(range(split, nd)) if p.shape[i] != 1), split)
    return j, m


def _is_channels_last(x: Tensor, n: int, g: int, cg: int, l: int) -> bool:
    """Whether ``x`` read as ``(n, g, cg, l)`` is stored in the order ``(n, l, g, cg)``."""
    try:
        v = x.view(n, g, cg, l)
    except RuntimeError:  # the axes can't be merged into that view without a copy
        return False
    c = g * cg
    want = (l * c, cg, 1, c)
    return all(size == 1 or st == w for size, st, w in zip(v.shape, v.stride(), want))


def _rows_geometry(shape: torch.Size, split: int, j: int, m: int) -> tuple[int, int, int, int]:
    """``(n, g, cg, l)`` of a rows plan whose parameters span the axes ``[j, m)``."""
    return (math.prod(shape[:j]), math.prod(shape[j:split]), math.prod(shape[split:m]),
            math.prod(shape[m:]))


def _layout(x: Tensor, n: int, g: int, cg: int, l: int) -> str:
    if x.is_contiguous():
        return "contiguous"
    return "channels_last" if _is_channels_last(x, n, g, cg, l) else "strided"


def plan(x: Tensor, params: Sequence[Tensor | None], dims: tuple[int, ...], *,
         widen: bool = False) -> Plan | None:
    """Classify ``(x, params, dims)`` as a channel (BN) or rows problem; ``None`` if neither.

    ``widen=True`` (the CPU kernels): when a non-contiguous ``x`` is not channels_last with
    the smallest parameter span, try wider spans ``[j, m)`` (parameters are then expanded
    over the extra axes), so that e.g. a channels_last GN or IN without affine parameters,
    whose smallest span is empty, is still read as ``(N, G, Cg, L)`` in NHWC order.
    """
    nd = x.dim()
    shape = x.shape
    if nd == 3 and dims == (0, 2):
        for p in params:
            if p is not None and (p.dim() != 3 or p.shape[0] != 1 or p.shape[2] != 1
                                  or p.shape[1] not in (1, shape[1])):
                return None
        return Plan("channel", shape[0], shape[1], 1, shape[2], (1, shape[1], 1),
                    (1, shape[1], 1), _layout(x, shape[0], shape[1], 1, shape[2]))
    split = nd - len(dims)
    if split < 1 or dims != tuple(range(split, nd)):
        return None
    j, m = split, split
    for p in params:
        span = _param_span(p, shape, split)
        if span is None:
            return None
        if p is not None:
            j, m = min(j, span[0]), max(m, span[1])
    layout = _layout(x, *_rows_geometry(shape, split, j, m))
    if layout == "strided" and widen:
        wider = ((jj, mm) for jj in range(j, -1, -1) for mm in range(m, nd + 1))
        found = next((span for span in wider
                      if _is_channels_last(x, *_rows_geometry(shape, split, *span))), None)
        if found is not None:
            (j, m), layout = found, "channels_last"
    n, g, cg, l = _rows_geometry(shape, split, j, m)
    param_shape = (1,) * j + tuple(shape[j:m]) + (1,) * (nd - m)
    stats_shape = tuple(shape[:split]) + (1,) * (nd - split)
    return Plan("rows", n, g, cg, l, param_shape, stats_shape, layout)


def _nc_layout(x: Tensor, c: int, l: int) -> str:
    """Memory order of ``x`` (``(N, C, *)``) as the kernels read it.

    ``"contiguous"``, ``"channels_last"`` (stored as ``(N, *, C)``: rows of ``C`` contiguous
    channel values, the order of a channels_last activation) or ``"strided"``. With one
    position per channel (``L = 1``: ``(N, C)`` batch norm, LN rows) both orders describe the
    same memory; it is read as channels_last, whose kernels run along the contiguous
    channels (several times faster there than per-channel strided loops).
    """
    shape, strides = x.shape, x.stride()
    channels_last = shape[1] == 1 or strides[1] == 1
    expect = c
    for i in range(x.dim() - 1, 1, -1):  # positions in row-major order, C values apart
        if shape[i] != 1:
            channels_last = channels_last and strides[i] == expect
            expect *= shape[i]
    channels_last = channels_last and (shape[0] == 1 or strides[0] == c * l)
    if channels_last and (l == 1 or not x.is_contiguous()):
        return "channels_last"
    return "contiguous" if x.is_contiguous() else "strided"


def canonical_plan(x: Tensor, channel: bool, groups: int = 1) -> Plan:
    """The :class:`Plan` of a call on ``x`` (``(N, C, *)``): batch norm (``channel=True``),
    or rows of ``groups`` groups. Parameters are ``(C,)`` vectors. Reads shape and strides."""
    n, c = x.shape[0], x.shape[1]
    l = math.prod(x.shape[2:])
    layout = _nc_layout(x, c, l)
    if channel:
        return Plan("channel", n, c, 1, l, (c,), (c,), layout)
    return Plan("rows", n, groups, c // groups, l, (c,), (n, groups), layout)


def canonical_view(x: Tensor, pl: Plan) -> Tensor:
    """``x`` as the kernels read it: ``(N, C, L)`` or ``(N, G, C/G, L)`` (a view for
    contiguous and channels_last ``x``, else a copy)."""
    if pl.kind == "channel":
        return x.reshape(pl.n, pl.g, pl.l)
    return x.reshape(pl.n, pl.g, pl.cg, pl.l)


def canonical_param(p: Tensor | None, pl: Plan) -> Tensor | None:
    """A parameter as a contiguous ``(G * Cg,)`` vector (BN: ``(C,)``)."""
    if p is None:
        return None
    if p.dim() == 1 and p.is_contiguous() and p.shape[0] == pl.g * pl.cg:
        return p  # the canonical (P,) vector itself
    if p.shape == pl.param_shape and p.is_contiguous():
        return p.view(-1)  # a module's (C,) parameter viewed: no copy
    return p.expand(pl.param_shape).reshape(-1).contiguous()
