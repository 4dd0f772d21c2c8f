"""The eager CPU call: the fused C kernels reached from Python without the op dispatcher.

``normlab::normalize`` (:mod:`normlab.kernels.ops`) is what ``torch.compile``,
``torch.export``, ``torch.func``, tracing modes and the profiler see of a normalization
call. In plain eager mode its dispatch costs more than the kernels on small layers (a
``(32, 120)`` batch norm: the C work is a few µs): the call enters the dispatcher and comes
back to Python twice (the op's Autograd kernel, then its implementation), the backward op
once more, and the running averages are updated by separate torch ops afterwards.

:func:`applies` says when none of that machinery can be watching — plain tensors, no
compile/trace, no dispatch or function mode, profiler off — and :func:`normalize` then runs
the same C kernels under one ``autograd.Function`` whose forward kernel also updates the
running averages (the C kernels take the buffers; in double precision, then rounded to the
buffer's dtype). Outputs and gradients are bit for bit the op's; the gradient of a gradient
(``create_graph=True``) takes the op's differentiable composite.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu, ops
from .analytic import RunningStats
from .layout import Plan
from .spec import NormSpec

__all__ = ["applies", "normalize"]


def _plain(t: Tensor) -> bool:
    """A tensor with storage of its own: not a subclass (fake, functional, DTensor, ...),
    not a batched tensor of ``torch.func.vmap`` or of the legacy vmap that
    ``gradcheck(check_batched_grad=True)`` and ``jacobian(vectorize=True)`` use."""
    return (type(t) is Tensor and not torch._C._are_functorch_transforms_active()
            and not torch._C._functorch.is_legacy_batchedtensor(t))


def _unwatched() -> bool:
    """No tracer, dispatch or function mode, or profiler that should see the op."""
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._is_torch_function_mode_enabled()
                or torch.autograd._profiler_enabled())


def applies(x: Tensor, params: tuple[Tensor | None, ...]) -> bool:
    """Whether the call on ``x`` (a CPU tensor the C kernels take) with ``params`` may skip
    the op: plain tensors, and nothing traces, transforms or records the call."""
    return (_unwatched() and _plain(x)  # is_compiling first: dynamo folds it, reads no further
            and all(p is None or type(p) in cpu.PLAIN_TENSORS for p in params))


_PLANS: dict[tuple, Plan] = {}


def _plan(x: Tensor, spec: NormSpec) -> Plan:
    """:func:`ops.plan_of`, remembered per (shape, strides, reduction, groups): a training
    loop repeats a handful of shapes."""
    key = (x.shape, x.stride(), spec.reduction, spec.groups)
    pl = _PLANS.get(key)
    if pl is None:
        if len(_PLANS) >= 512:
            _PLANS.clear()
        pl = _PLANS[key] = ops.plan_of(x, spec)
    return pl


class _EagerNormalize(torch.autograd.Function):
    """``z = act(γ · normalize(x) + β)`` by the C kernels; the op's backward rules."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps_extra, tau, kappa, spec: NormSpec, pl: Plan,
                running: RunningStats | None):
        z, stats = cpu.forward(x, weight, bias, eps_extra, tau, kappa, pl,
                               *ops._kernel_args(spec), running=running)
        ctx.save_for_backward(x, weight, bias, eps_extra, tau, kappa, stats)
        ctx.spec, ctx.pl = spec, pl
        ctx.mark_non_differentiable(stats)
        return z, stats

    @staticmethod
    def backward(ctx, grad_z, _grad_stats):
        if _plain(grad_z) and _unwatched():
            pl, kernel_args = ctx.pl, ops._kernel_args(ctx.spec)

            def backward_op(x, grad_z, weight, bias, eps_extra, tau, kappa, stats, *args):
                return cpu.backward(x, grad_z, weight, bias, eps_extra, tau, kappa, stats, pl,
                                    *kernel_args, args[-1], need_gxhat=eps_extra is not None)
        else:  # vmap over the backward (batched gradients, jacobian(vectorize=True)) or a
            # mode watching it: the backward op, which has the vmap rules
            backward_op = ops.normalize_backward
        grads = ops._backward(backward_op, ctx, grad_z, ctx.saved_tensors,
                              ops.spec_args(ctx.spec))
        return (*grads, None, None, None)


def normalize(x: Tensor, weight, bias, eps_extra, tau, kappa, spec: NormSpec,
              running: RunningStats | None) -> tuple[Tensor, Tensor, bool]:
    """The op's ``(z, stats)`` for a non-empty contiguous or channels_last ``x`` the C
    kernels take, and whether the kernel updated ``running`` (contiguous buffers of the
    kernel dtype, :func:`~normlab.kernels.cpu.running_supported`; otherwise the caller
    updates them from ``stats``)."""
    pl = _plan(x, spec)
    if running is not None and not cpu.running_supported(running, pl,
                                                         cpu._kernel_dtype(x.dtype)):
        running = None  # left to the caller
    if torch.is_grad_enabled() and torch._C._any_requires_grad(x, weight, bias, eps_extra,
                                                                tau, kappa):
        z, stats = _EagerNormalize.apply(x, weight, bias, eps_extra, tau, kappa, spec, pl,
                                         running)
    else:
        z, stats = cpu.forward(x, weight, bias, eps_extra, tau, kappa, pl,
                               *ops._kernel_args(spec), running=running)
    return z, stats, running is not None
