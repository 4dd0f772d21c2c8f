"""The kernel core: one description of a normalization call, one dispatcher, custom ops.

Modules describe their call with a :class:`~normlab.kernels.spec.NormSpec` and a canonical
view of ``x`` (:mod:`normlab.kernels.spec`) and call :func:`normalize` — once. It picks an
implementation by backend, device and dtype:

* ``"cpu"`` – the ``normlab::normalize`` custom op (:mod:`normlab.kernels.ops`) running the
  fused C/OpenMP kernels (:mod:`normlab.kernels.cpu`, built at first use; skipped if no
  compiler is available): float32/float64, bfloat16 (stored as is, float32 arithmetic),
  float16 (upcast around the float32 kernels); contiguous or channels_last views (other
  strides are copied to contiguous first); ``y`` and ``∂ℓ/∂x`` keep ``x``'s strides. In
  plain eager mode (:func:`normlab.kernels.eager.applies`) the same kernels are called
  without the op's dispatch, and the batch-norm kernel updates the running averages itself
  (:mod:`normlab.kernels.eager`).
* ``"triton"`` – the ``normlab::normalize_triton`` op (``torch.library.triton_op``) running
  the Triton kernels (:mod:`normlab.kernels.triton_kernels`) on CUDA tensors:
  float32/float16/bfloat16, any strides. The first call of each (family, dtype, layout) in
  a process is checked against the reference (:mod:`normlab.kernels.check`); on a
  mismatch normlab warns once and uses the reference for that key.
* ``"reference"`` – :class:`analytic.NormalizeAffineFunction`, the portable reference
  (exact backward) that every other path is tested against; used for everything else.
* ``"composite"`` – :func:`analytic.composite_forward`, the same formula as plain torch ops,
  under ``torch.func`` transforms and while a graph is recorded to run without Python:
  ``torch.onnx.export`` (both exporters) and ``torch.jit.trace``, which can hold neither an
  autograd Function nor a custom op that ONNX knows.

The ops are what ``torch.compile`` (zero graph breaks) and ``torch.export`` see. Choose globally with ``NORMLAB_KERNELS=auto|reference|triton`` or
:func:`set_backend`; check the choice for given inputs with :func:`selected_path`.

:func:`normalize_affine` / :func:`normalize_affine_act` keep the general entry point for
any view ``x`` with reduced ``dims`` (tests, extensions): they classify the view once
(:func:`normlab.kernels.layout.plan`) and call :func:`normalize`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .. import functional as F
from . import check, cpu, eager, ops
from .analytic import (
    NormalizeAffineFunction,
    composite_forward,
    RunningStats,
    apply_activation,
    broadcast_param,
    update_running_stats,
    update_running_stats_unchecked,
)
from .analytic import normalize_affine as reference_normalize_affine
from .layout import canonical_param, canonical_view, plan
from .spec import NO_FILTER, Activation, NormSpec, Reduction

__all__ = [
    "normalize",
    "NormSpec",
    "Reduction",
    "Activation",
    "NO_FILTER",
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
    "exporting_to_onnx",
]

BACKENDS = ("auto", "reference", "triton")
_backend = os.environ.get("NORMLAB_KERNELS", "auto")
if _backend not in BACKENDS:
    _backend = "auto"


def set_backend(name: str) -> None:
    """``"auto"`` (fused kernels where supported), ``"reference"`` (analytic Function only)
    or ``"triton"`` (the Triton op on any device: CPU tensors run in Triton's interpreter
    with ``TRITON_INTERPRET=1``; for tests and debugging)."""
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


@torch.compiler.assume_constant_result
def _cpu_kernels_available() -> bool:
    """Whether the C library is loaded (builds it on first call); a constant for dynamo."""
    return cpu.available()


@torch.compiler.assume_constant_result
def _triton_ops_available() -> bool:
    return ops.triton_ops() is not None


@torch.compiler.assume_constant_result
def exporting_to_onnx() -> bool:
    """``torch.onnx.export`` (either exporter) or ``torch.jit.trace`` is recording the model.

    The dynamo exporter's flag is read where torch sets it (``torch.onnx.is_in_onnx_export``
    is folded to ``False`` while dynamo traces, which that exporter's strict fallback does);
    a constant for ``torch.compile`` (read once, at trace time). Cheap in eager mode.
    """
    if torch._C._is_tracing():
        return True
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    return bool(getattr(flags, "_is_onnx_exporting", False))


def _path(x: Tensor, params: Sequence[Tensor | None], spec: NormSpec) -> str:
    """``"cpu"``, ``"triton"`` or ``"reference"`` for a canonical call."""
    if _backend != "auto":
        return "triton" if _backend == "triton" and _triton_ops_available() else "reference"
    device = x.device
    for p in params:  # parameters on x's device, any floating dtype (converted in-kernel)
        if p is not None and (p.device != device or not p.is_floating_point()):
            return "reference"
    if device.type == "cpu" and x.dtype in ops.CPU_DTYPES and _cpu_kernels_available():
        path = "cpu"
    elif device.type == "cuda" and x.dtype in ops.TRITON_DTYPES and _triton_ops_available():
        path = "triton"
    else:
        return "reference"
    if device.type in check.VERIFIED_DEVICES:  # first use on this device: checked once
        layout = ops.plan_of(x, spec).layout
        if not check.fast_path_verified(path, spec.reduction.value, x.dtype, layout,
                                        str(device)):
            return "reference"
    return path


def _set_shape(x: Tensor, spec: NormSpec) -> tuple[int, ...]:
    """Shape of per-set statistics: ``(C,)`` or ``(N, G)``."""
    return (x.shape[1],) if spec.reduction is Reduction.CHANNEL else (x.shape[0], spec.groups)


def _moments(stats: Tensor, x: Tensor, spec: NormSpec) -> F.Moments:
    """``(μ′, σ′², M)`` per set from the ops' ``(6, sets)`` table."""
    if spec.reduction is Reduction.CHANNEL:
        return F.Moments(stats[2], stats[3], stats[5])
    shape = _set_shape(x, spec)
    return F.Moments(stats[2].view(shape), stats[3].view(shape), stats[5].view(shape))


def _reference(x, weight, bias, spec, eps_extra, tau, kappa) -> tuple[Tensor, F.Moments]:
    """The analytic reference Function on the canonical view (plus the activation)."""
    xv = canonical_view(x, ops.plan_of(x, spec))
    y, mean, var, count = NormalizeAffineFunction.apply(
        xv, broadcast_param(weight, spec, xv), broadcast_param(bias, spec, xv), eps_extra,
        spec.dims, spec.optional_threshold, spec.centered, spec.eps, spec.gaussian_consistent)
    y = apply_activation(y, spec.activation, broadcast_param(tau, spec, xv),
                         broadcast_param(kappa, spec, xv))
    shape = _set_shape(x, spec)
    return y.reshape(x.shape), F.Moments(mean.reshape(shape), var.reshape(shape),
                                         count.reshape(shape))


def _composite(x, weight, bias, spec, eps_extra, tau, kappa) -> tuple[Tensor, F.Moments]:
    """:func:`analytic.composite_forward` on the canonical view, made by reshapes that hold
    for any size (``torch.jit.trace`` and the TorchScript ONNX exporter record sizes read
    in Python as values of the traced shape)."""
    xv = x.unsqueeze(-1)  # (N, C, *, 1): also (N, C) input, and zero-size batches
    xv = xv.flatten(2) if spec.reduction is Reduction.CHANNEL else xv.unflatten(
        1, (spec.groups, -1)).flatten(3)
    view = [broadcast_param(p, spec, xv) for p in (weight, bias, tau, kappa)]
    z, stats = composite_forward(
        xv, view[0], view[1], eps_extra, view[2], view[3], dims=spec.dims,
        threshold=spec.optional_threshold, centered=spec.centered, eps=spec.eps,
        gaussian_consistent=spec.gaussian_consistent, activation=spec.activation.label)
    shape = _set_shape(x, spec)
    return z.reshape(x.shape), F.Moments(
        *(t.detach().expand_as(stats.var).reshape(shape) for t in stats))


def normalize(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    spec: NormSpec,
    *,
    eps_extra: Tensor | None = None,
    tau: Tensor | None = None,
    kappa: Tensor | None = None,
    running: RunningStats | None = None,
) -> tuple[Tensor, F.Moments]:
    """``z = act(γ · (x − μ′)/sqrt(σ′² + ε) + β)`` as ``spec`` describes; exact backward.

    Args:
        x: ``(N, C, *)``; the sets are per channel over the batch (batch norm) or per sample
            and group of channels (``spec.groups``); see :mod:`normlab.kernels.spec`.
        weight, bias: γ and β as ``(C,)`` vectors, or ``None``.
        spec: the call (:class:`NormSpec`: reduction, threshold, centered, ε, κ(T), activation).
        eps_extra: a tensor added to ε that receives a gradient (FRN's ``|ε_l|``).
        tau, kappa: TLU τ and affine-TLU κ as ``(C,)`` vectors (for ``spec.activation``).
        running: batch-norm running averages to update from the batch statistics.

    Returns:
        ``z`` in ``x``'s dtype and strides, and the detached statistics used
        (:class:`~normlab.functional.Moments`: mean, variance, kept count) per set —
        ``(C,)`` or ``(N, G)`` — in float32 for half inputs.
    """
    if torch._C._are_functorch_transforms_active() or exporting_to_onnx():
        # torch.func (vmap, grad, jacrev, ...) over the forward: the composite of plain ops,
        # which every transform handles (the ops' autograd.Function does not support them);
        # ONNX and TorchScript graphs: plain ops export as they are (torch.export and
        # torch.compile keep the custom ops)
        y, moments = _composite(x, weight, bias, spec, eps_extra, tau, kappa)
    elif (path := _path(x, (weight, bias, tau, kappa), spec)) == "reference":
        y, moments = _reference(x, weight, bias, spec, eps_extra, tau, kappa)
    else:
        act_after = (path == "triton" and spec.reduction is Reduction.CHANNEL
                     and spec.activation is not Activation.NONE)
        if path == "cpu" and not x.is_contiguous() and ops.plan_of(x, spec).layout == "strided":
            x = x.contiguous()
        if path == "cpu" and x.numel() and eager.applies(x, (weight, bias, eps_extra, tau,
                                                              kappa)):
            # plain eager mode: the same kernels without the op's dispatch (see there)
            y, stats, updated = eager.normalize(x, weight, bias, eps_extra, tau, kappa, spec,
                                                running)
            if updated:  # by the kernel
                running = None
        else:
            args = ops.spec_args(spec)
            if act_after:  # the Triton batch-norm kernels fuse no activation: apply it after
                args = (*args[:-1], int(Activation.NONE))
            op = (torch.ops.normlab.normalize.default if path == "cpu"
                  else torch.ops.normlab.normalize_triton.default)
            y, stats = op(x, weight, bias, eps_extra, None if act_after else tau,
                          None if act_after else kappa, *args)
        moments = _moments(stats, x, spec)
        if act_after:
            shape = (1, -1) + (1,) * (x.dim() - 2)  # batch norm: per-channel τ, κ
            y = apply_activation(y, spec.activation, None if tau is None else tau.view(shape),
                                 None if kappa is None else kappa.view(shape))
    if running is not None:  # the statistics are detached outputs of the kernels
        # (under torch.func: one lerp_ per buffer, vmapped statistics checked; see there)
        update_running_stats_unchecked(running, moments)
    return y, moments


# --------------------------------------------------------------------------------------
# the general entry point: any view x with reduced dims
# --------------------------------------------------------------------------------------
def _canonical_call(x: Tensor, params: Sequence[Tensor | None], dims: tuple[int, ...]):
    """``(plan, canonical x)`` for a view the kernels implement, else ``None``."""
    pl = plan(x, params, dims, widen=True)
    if pl is None:
        return None
    if pl.kind == "channel":
        return pl, x
    return pl, x.reshape(pl.n, pl.g * pl.cg, pl.l)


def selected_path(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                  dims: Sequence[int]) -> str:
    """Which implementation :func:`normalize_affine` would use: cpu, triton or reference
    (the composite instead while exporting to ONNX or under ``torch.func``)."""
    dims = tuple(d % x.dim() for d in dims)
    found = _canonical_call(x, (weight, bias), dims) if x.dim() else None
    if found is None:
        return "reference"
    pl, xc = found
    spec = NormSpec(Reduction.CHANNEL if pl.kind == "channel" else Reduction.ROWS, groups=pl.g)
    return _path(xc, [canonical_param(p, pl) for p in (weight, bias)], spec)


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

    Same contract as :func:`normlab.kernels.analytic.normalize_affine` (see there; the
    statistics come back in keepdim shape), served by the fastest available implementation.
    ``running`` (batch norm): running averages to update from the batch statistics
    (:class:`RunningStats`).
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

    ``activation``: ``"none"``; ``"tlu"`` ``z = max(y, τ)`` ([SK20] eq. 3); ``"affine_tlu"``
    ``z = max(y, κy + τ)`` ([SK20] Table 5); ``"relu"``. ``tau``/``kappa`` are viewed to
    broadcast against ``x`` like ``weight``. Returns ``(z, moments)`` (keepdim statistics).
    """
    act = Activation.parse(activation)
    if act in (Activation.TLU, Activation.AFFINE_TLU) and tau is None:
        raise ValueError(f"activation={activation!r} needs tau (a tensor), got None")
    if act is Activation.AFFINE_TLU and kappa is None:
        raise ValueError("activation='affine_tlu' needs kappa (a tensor), got None")
    tau = tau if act in (Activation.TLU, Activation.AFFINE_TLU) else None
    kappa = kappa if act is Activation.AFFINE_TLU else None
    dims = tuple(d % x.dim() for d in dims)
    found = None if _backend == "reference" or x.dim() == 0 else _canonical_call(
        x, (weight, bias, tau, kappa), dims)
    if found is None:  # the reference on the view as given
        y, stats = reference_normalize_affine(
            x, weight, bias, dims, threshold=threshold, centered=centered, eps=eps,
            eps_extra=eps_extra, gaussian_consistent=gaussian_consistent)
        y = apply_activation(y, act, tau, kappa)
        if running is not None:
            update_running_stats(running, stats)
        return y, stats
    pl, xc = found
    spec = NormSpec(Reduction.CHANNEL if pl.kind == "channel" else Reduction.ROWS, threshold,
                    centered, eps, gaussian_consistent, act, groups=pl.g)
    w, b, t, k = (canonical_param(p, pl) for p in (weight, bias, tau, kappa))
    y, m = normalize(xc, w, b, spec, eps_extra=eps_extra, tau=t, kappa=k, running=running)
    shape = pl.stats_shape
    return y.reshape(x.shape), F.Moments(m.mean.reshape(shape), m.var.reshape(shape),
                                         m.count.reshape(shape))
