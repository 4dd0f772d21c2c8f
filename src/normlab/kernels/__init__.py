"""Fast paths for normalization, each checked against :mod:`normlab.functional`.

:func:`normalize_affine` is the one entry point the modules call (and
:func:`normalize_affine_act` the one that also fuses FRN's TLU); they pick an implementation
by device, dtype and layout:

* ``"cpu"`` – fused C/OpenMP kernels (:mod:`normlab.kernels.cpu`), built at first use
  (skipped if no compiler is available): float32/float64, bfloat16 read and written as
  bfloat16 (float32 arithmetic), float16 upcast to float32 inside the Function; contiguous or channels_last inputs (NCHW and NHWC, for BN and
  for the per-sample norms); ``y`` and ``∂ℓ/∂x`` keep ``x``'s strides.
* ``"triton"`` – Triton kernels on CUDA tensors (:mod:`normlab.kernels.triton_kernels`),
  float32/float16/bfloat16, any strides (NCHW and channels_last).
* ``"reference"`` – :class:`analytic.NormalizeAffineFunction`, the portable reference
  (exact backward) that every other path is tested against; used for everything else
  and inside ``torch.compile``.

Choose globally with ``NORMLAB_KERNELS=auto|reference`` or :func:`set_backend`; check the
choice for given inputs with :func:`selected_path`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .. import functional as F
from .analytic import NormalizeAffineFunction, RunningStats, update_running_stats
from .analytic import normalize_affine as reference_normalize_affine
from .layout import Plan, plan

__all__ = [
    "normalize_affine",
    "normalize_affine_act",
    "RunningStats",
    "update_running_stats",
    "reference_normalize_affine",
    "NormalizeAffineFunction",
    "selected_path",
    "set_backend",
    "get_backend",
    "use_backend",
    "BACKENDS",
]

BACKENDS = ("auto", "reference")
_ACTIVATIONS = ("none", "tlu", "affine_tlu", "relu")
_backend = os.environ.get("NORMLAB_KERNELS", "auto")
if _backend not in BACKENDS:
    _backend = "auto"


def set_backend(name: str) -> None:
    """``"auto"`` (fused kernels where supported) or ``"reference"`` (analytic Function only)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily set the backend: ``with use_backend("reference"): ...``."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling")
                and compiler.is_compiling())


_HALF = (torch.float16, torch.bfloat16)


def _choose(x: Tensor, params: Sequence[Tensor | None], dims: tuple[int, ...]
            ) -> tuple[str, Plan | None]:
    if _backend == "reference" or _is_compiling() or x.dim() == 0:
        return "reference", None
    # parameters share x's device and dtype, or stay float32 for half inputs (autocast/AMP)
    if any(p is not None and (p.device != x.device or not (
            p.dtype == x.dtype or (p.dtype == torch.float32 and x.dtype in _HALF)))
           for p in params):
        return "reference", None
    # the CPU kernels need x contiguous or channels_last; widen finds the latter for
    # parameter-free GN/IN (the Triton kernels take any strides)
    pl = plan(x, params, dims, widen=x.device.type == "cpu")
    if pl is None or x.numel() == 0:
        return "reference", None
    if x.device.type == "cpu":
        if x.dtype not in (torch.float32, torch.float64, *_HALF) or pl.layout == "strided":
            return "reference", None
        from . import cpu
        return ("cpu", pl) if cpu.available() else ("reference", None)
    if x.device.type == "cuda":
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return "reference", None
        from . import triton_kernels
        return ("triton", pl) if triton_kernels.available() else ("reference", None)
    return "reference", None


def selected_path(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                  dims: Sequence[int]) -> str:
    """Which implementation :func:`normalize_affine` would use: cpu, triton or reference."""
    return _choose(x, (weight, bias), tuple(d % x.dim() for d in dims))[0]


def normalize_affine(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    dims: Sequence[int],
    *,
    threshold: float | None = None,
    centered: bool = True,
    eps: float = 1e-5,
    eps_extra: Tensor | None = None,
    gaussian_consistent: bool = False,
    running: RunningStats | None = None,
) -> tuple[Tensor, F.Moments]:
    """``y = γ · normalize(x) + β`` with (filtered) statistics over ``dims``; exact backward.

    Same contract as :func:`normlab.kernels.analytic.normalize_affine` (see there), served by
    the fastest available implementation. ``running`` (batch norm): running averages to
    update from the batch statistics (:class:`RunningStats`) — inside the kernel where the
    path supports it, else right after.
    """
    return normalize_affine_act(
        x, weight, bias, dims, activation="none", threshold=threshold, centered=centered,
        eps=eps, eps_extra=eps_extra, gaussian_consistent=gaussian_consistent, running=running,
    )


def normalize_affine_act(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    dims: Sequence[int],
    *,
    activation: str = "none",
    tau: Tensor | None = None,
    kappa: Tensor | None = None,
    threshold: float | None = None,
    centered: bool = True,
    eps: float = 1e-5,
    eps_extra: Tensor | None = None,
    gaussian_consistent: bool = False,
    running: RunningStats | None = None,
) -> tuple[Tensor, F.Moments]:
    """:func:`normalize_affine` followed by an activation, fused where possible.

    ``activation``: ``"none"``; ``"tlu"`` ``z = max(y, τ)`` (FRN seed eq. 3); ``"affine_tlu"``
    ``z = max(y, κy + τ)`` (FRN seed Table 5); ``"relu"``. ``tau``/``kappa`` are viewed to
    broadcast against ``x`` like ``weight``. Returns ``(z, moments)``.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if activation in ("tlu", "affine_tlu") and tau is None:
        raise ValueError(f"activation={activation!r} needs tau (a tensor), got None")
    if activation == "affine_tlu" and kappa is None:
        raise ValueError("activation='affine_tlu' needs kappa (a tensor), got None")
    if activation in ("none", "relu"):
        tau = kappa = None
    elif activation == "tlu":
        kappa = None
    dims = tuple(d % x.dim() for d in dims)
    path, pl = _choose(x, (weight, bias, tau, kappa), dims)
    if path == "reference" or (pl.kind == "channel" and activation != "none"):
        y, stats = reference_normalize_affine(
            x, weight, bias, dims, threshold=threshold, centered=centered, eps=eps,
            eps_extra=eps_extra, gaussian_consistent=gaussian_consistent)
        if activation == "tlu":
            y = F.tlu(y, tau)
        elif activation == "affine_tlu":
            y = F.affine_tlu(y, kappa, tau)
        elif activation == "relu":
            y = torch.relu(y)
        if running is not None:
            update_running_stats(running, stats)
        return y, stats
    if path == "cpu":
        from .cpu import ACT_CODES, FusedNormCPU
        fn = FusedNormCPU
        act = ACT_CODES[activation]
    else:
        from .triton_kernels import ACT_CODES, FusedNormTriton
        fn = FusedNormTriton
        act = ACT_CODES[activation]
    fused = running if running is not None and fn.fuses_running(running, x, pl) else None
    y, mean, var, count = fn.apply(x, weight, bias, eps_extra, tau, kappa, pl, threshold,
                                   centered, float(eps), gaussian_consistent, act, fused)
    stats = F.Moments(mean, var, count)
    if running is not None and fused is None:
        update_running_stats(running, stats)
    return y, stats
