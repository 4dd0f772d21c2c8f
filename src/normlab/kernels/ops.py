"""normlab's fused kernels as ``torch.library`` custom ops.

This is what ``torch.compile``, ``torch.export`` and ``torch.func`` see of a normalization
call. Two pairs of operators, with one schema (config arguments from
:func:`spec_args`, see :class:`~normlab.kernels.spec.NormSpec`)::

    normlab::normalize(Tensor x, Tensor? weight, Tensor? bias, Tensor? eps_extra,
                       Tensor? tau, Tensor? kappa, int reduction, int groups,
                       float threshold, bool centered, float eps, bool gaussian_consistent,
                       int activation) -> (Tensor z, Tensor stats)
    normlab::normalize_backward(Tensor x, Tensor grad_z, Tensor? weight, Tensor? bias,
                       Tensor? eps_extra, Tensor? tau, Tensor? kappa, Tensor stats,
                       <config>, bool need_dx) -> (Tensor dx, Tensor sums, Tensor gxhat)

* ``normlab::normalize`` / ``normalize_backward`` (:func:`torch.library.custom_op`): the
  fused C kernels (:mod:`normlab.kernels.cpu`) on CPU tensors, the same math in torch ops
  (:func:`~normlab.kernels.analytic.canonical_forward`) anywhere else; with a fake
  (meta) implementation for tracing.
* ``normlab::normalize_triton`` / ``normalize_triton_backward``
  (:func:`torch.library.triton_op`): the Triton kernels (:mod:`normlab.kernels.triton_kernels`),
  defined when CUDA is present (or on request, :func:`triton_ops`, for the interpreter);
  inductor decomposes them into their ``wrap_triton`` launches and sees the kernels.

``x`` is ``(N, C, *)`` (:mod:`normlab.kernels.spec`), parameters are ``(C,)`` vectors; the
ops read ``x`` as ``(N, C, L)`` or ``(N, G, C/G, L)`` themselves (a view for contiguous and
channels_last ``x``) and are tagged ``flexible_layout``, so inductor hands them its own memory
format instead of copying. ``z`` keeps ``x``'s strides (contiguous or channels_last; other
strides give a contiguous ``z``); ``stats`` is ``(rows, sets)``: rows 0–5 plain mean,
plain variance, mean, variance, ``r = (σ′² + ε)^(-1/2)`` and kept count, further rows the
backend's own (``cpu.STATS_ROWS``, ``triton_kernels.STATS_ROWS``: e.g. the low parts of
the means), passed back to the backward op as they are. The forward ops are functional
(running averages are updated by the dispatcher from ``stats``, so ``torch.compile`` and
``torch.export`` see an ordinary buffer mutation).

Every forward op has registered autograd — the backward op for first derivatives; with
``create_graph=True`` the differentiable composite
(:func:`~normlab.kernels.analytic.composite_backward`), so higher derivatives are exact —
and a vmap rule that folds the vmapped dimension into the channels (batch norm) or groups
(rows) and calls the same op once (``jacobian(vectorize=True)``,
``gradcheck(check_batched_grad=True)``, ``torch.func.vmap``).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor
from torch._subclasses import fake_tensor

from .. import functional as F
from . import analytic, cpu
from .layout import canonical_plan, canonical_view
from .spec import Activation, NormSpec, Reduction

__all__ = ["normalize", "normalize_backward", "spec_args", "spec_of", "plan_of", "triton_ops",
           "CPU_DTYPES", "TRITON_DTYPES"]

CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REDUCTIONS = (Reduction.CHANNEL, Reduction.ROWS)  # op argument `reduction` indexes this
_GROUPS = 1  # position of `groups` in the config arguments


def spec_args(spec: NormSpec) -> tuple[int, int, float, bool, float, bool, int]:
    """The config arguments of the ops for ``spec`` (ints, floats and bools only)."""
    return (_REDUCTIONS.index(spec.reduction), spec.groups, spec.threshold, spec.centered,
            spec.eps, spec.gaussian_consistent, int(spec.activation))


@functools.lru_cache(maxsize=256)
def spec_of(reduction: int, groups: int, threshold: float, centered: bool, eps: float,
            gaussian_consistent: bool, activation: int) -> NormSpec:
    """Inverse of :func:`spec_args`."""
    return NormSpec(_REDUCTIONS[reduction], threshold, centered, eps, gaussian_consistent,
                    Activation(activation), groups)


def plan_of(x: Tensor, spec: NormSpec):
    """The kernels' :class:`~normlab.kernels.layout.Plan` of ``x`` (``(N, C, *)``)."""
    return canonical_plan(x, spec.reduction is Reduction.CHANNEL, spec.groups)


def _empty_like(x: Tensor, layout: str) -> Tensor:
    """What the ops return for ``z``/``dx``: ``x``'s strides for a channels_last plan, else
    contiguous (the C kernels' rule, kept by the torch implementation)."""
    if layout != "channels_last":
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)


def _sets(x: Tensor, spec: NormSpec) -> int:
    return x.shape[1] if spec.reduction is Reduction.CHANNEL else x.shape[0] * spec.groups


def _sum_rows(spec: NormSpec) -> int:
    """Rows of the backward op's ``sums``: Σ∂ℓ/∂y, Σ∂ℓ/∂y·x̂, and ∂ℓ/∂τ, ∂ℓ/∂κ where they
    can exist (the row family; batch norm with a fused activation)."""
    plain_bn = spec.reduction is Reduction.CHANNEL and spec.activation is Activation.NONE
    return 2 if plain_bn else 4


def _fused_kernel_applies(x: Tensor, spec: NormSpec, pl, any_strides: bool = False) -> bool:
    """The fused kernels take non-empty views (the C ones contiguous or channels_last; the
    Triton ones, ``any_strides``, any view but no activation fused into batch norm — the
    dispatcher applies it after that op)."""
    if x.numel() == 0:
        return False
    if not any_strides:
        return pl.layout != "strided"
    return not (spec.reduction is Reduction.CHANNEL and spec.activation is not Activation.NONE)


def _act_code(spec: NormSpec) -> int:
    return cpu.ACT_CODES[spec.activation.label]


def _kernel_args(spec: NormSpec) -> tuple:
    return (spec.optional_threshold, spec.centered, spec.eps, spec.gaussian_consistent,
            _act_code(spec))


def _as_output(t: Tensor, shape) -> Tensor:
    """``t`` in ``shape``, as a tensor of its own rather than a view: autograd forbids
    in-place ops (``ReLU(inplace=True)``) on a custom Function's outputs that are views."""
    t = t.reshape(shape)
    if t._base is None or fake_tensor.is_fake(t):
        return t
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def _padded(stats: Tensor, rows: int) -> Tensor:
    """The torch implementation's ``(6, sets)`` statistics with the rows a backend keeps
    for itself (zeros: e.g. the low parts of the means) — one shape per op."""
    return torch.cat([stats, stats.new_zeros((rows - stats.shape[0], stats.shape[1]))])


def _forward(backend, any_strides, rows, x, weight, bias, eps_extra, tau, kappa, config):
    """One implementation of the forward ops: ``backend.forward``, or the same contract in
    torch ops where the fused kernels do not apply. The C kernels read any ``(N, C, *)``
    shape through the plan; the Triton and torch ones take the canonical view. ``stats``
    has ``rows`` rows: 0–5 the contract, the rest the op's backend's own."""
    spec = spec_of(*config)
    pl = plan_of(x, spec)
    if backend is cpu and _fused_kernel_applies(x, spec, pl, any_strides):
        return cpu.forward(x, weight, bias, eps_extra, tau, kappa, pl, *_kernel_args(spec))
    xv = canonical_view(x, pl)
    if backend is not None and _fused_kernel_applies(x, spec, pl, any_strides):
        z, stats = backend.forward(xv, weight, bias, eps_extra, tau, kappa, pl,
                                   *_kernel_args(spec))
        return _as_output(z, x.shape), stats
    z, stats = analytic.canonical_forward(xv, weight, bias, eps_extra, tau, kappa, spec)
    return _empty_like(x, pl.layout).copy_(z.reshape(x.shape)), _padded(stats, rows)


def _backward_impl(backend, any_strides, x, grad_z, weight, bias, eps_extra, tau, kappa, stats,
                   config, need_dx):
    """One implementation of the backward ops (see :func:`_forward`)."""
    spec = spec_of(*config)
    pl = plan_of(x, spec)
    fused = backend is not None and _fused_kernel_applies(x, spec, pl, any_strides)
    if fused and backend is cpu:
        dx, sums, gxhat = cpu.backward(x, grad_z, weight, bias, eps_extra, tau, kappa, stats,
                                       pl, *_kernel_args(spec), need_dx)
        return (x.new_empty(0) if dx is None else dx), sums, gxhat
    xv, gv = canonical_view(x, pl), canonical_view(grad_z, pl)
    if fused:
        dx, sums, gxhat = backend.backward(xv, gv, weight, bias, eps_extra, tau, kappa, stats,
                                           pl, *_kernel_args(spec), need_dx)
        return (x.new_empty(0) if dx is None else _as_output(dx, x.shape)), sums, gxhat
    dx, sums, gxhat = analytic.canonical_backward(xv, gv, weight, bias, eps_extra, tau, kappa,
                                                  stats, spec, need_dx)
    if not need_dx:
        return x.new_empty(0), sums, gxhat
    return _empty_like(x, pl.layout).copy_(dx.reshape(x.shape)), sums, gxhat


def _cpu_backend(x: Tensor):
    """The C kernels for CPU tensors they take, else ``None`` (the torch implementation)."""
    return cpu if x.device.type == "cpu" and x.dtype in CPU_DTYPES and cpu.available() else None


# --------------------------------------------------------------------------------------
# normlab::normalize — fused C kernels on CPU, torch ops elsewhere
# --------------------------------------------------------------------------------------
# Defined with the low-level torch.library API and an autograd kernel of our own rather than
# torch.library.custom_op + register_autograd: the latter costs ~100 µs of Python per call
# (torch._library.utils.fill_defaults walks the schema on every forward), which small layers
# (LeNet's) cannot afford. Registered: implementation (CompositeExplicitAutograd), fake,
# Autograd and vmap (FuncTorchBatched) kernels — what custom_op would register.
# flexible_layout: inductor may hand the ops its own memory format (e.g. the channels_last
# activations it picks for convolutions on CPU) instead of copying into the strides seen
# while tracing; the fake implementations give the output strides.
_CONFIG_SCHEMA = ("int reduction, int groups, float threshold, bool centered, float eps, "
                  "bool gaussian_consistent, int activation")
_TAGS = (torch.Tag.flexible_layout, torch.Tag.pt2_compliant_tag)
_LIB = torch.library.Library("normlab", "DEF")  # noqa: TOR901 — the ops' namespace
_LIB.define("normalize(Tensor x, Tensor? weight, Tensor? bias, Tensor? eps_extra, "
            f"Tensor? tau, Tensor? kappa, {_CONFIG_SCHEMA}) -> (Tensor, Tensor)", tags=_TAGS)
_LIB.define("normalize_backward(Tensor x, Tensor grad_z, Tensor? weight, Tensor? bias, "
            "Tensor? eps_extra, Tensor? tau, Tensor? kappa, Tensor stats, "
            f"{_CONFIG_SCHEMA}, bool need_dx) -> (Tensor, Tensor, Tensor)", tags=_TAGS)
normalize = torch.ops.normlab.normalize.default
normalize_backward = torch.ops.normlab.normalize_backward.default


def _normalize_impl(x, weight, bias, eps_extra, tau, kappa, *config):
    return _forward(_cpu_backend(x), False, cpu.STATS_ROWS, x, weight, bias, eps_extra, tau,
                    kappa, config)


def _normalize_fake(x, weight, bias, eps_extra, tau, kappa, *config):
    spec = spec_of(*config)
    return (_empty_like(x, plan_of(x, spec).layout),
            x.new_empty((cpu.STATS_ROWS, _sets(x, spec)), dtype=F.stats_dtype(x.dtype)))


def _normalize_backward_impl(x, grad_z, weight, bias, eps_extra, tau, kappa, stats, *args):
    *config, need_dx = args
    return _backward_impl(_cpu_backend(x), False, x, grad_z, weight, bias, eps_extra, tau,
                          kappa, stats, config, need_dx)


def _normalize_backward_fake(x, grad_z, weight, bias, eps_extra, tau, kappa, stats, *args):
    *config, need_dx = args
    spec = spec_of(*config)
    kdt = stats.dtype
    dx = _empty_like(x, plan_of(x, spec).layout) if need_dx else x.new_empty(0)
    return (dx, x.new_empty((_sum_rows(spec), x.shape[1]), dtype=kdt),
            x.new_empty((_sets(x, spec),), dtype=kdt))


_LIB.impl("normalize", _normalize_impl, "CompositeExplicitAutograd")
_LIB.impl("normalize_backward", _normalize_backward_impl, "CompositeExplicitAutograd")
torch.library.register_fake("normlab::normalize", _normalize_fake, lib=_LIB)
torch.library.register_fake("normlab::normalize_backward", _normalize_backward_fake, lib=_LIB)


# --------------------------------------------------------------------------------------
# autograd: the backward op; with create_graph=True the differentiable composite
# --------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, weight, bias, eps_extra, tau, kappa, *config = inputs
    ctx.save_for_backward(x, weight, bias, eps_extra, tau, kappa, output[1])
    ctx.config = tuple(config)
    ctx.mark_non_differentiable(output[1])


def _composite_grads(needs, x, params, grad_z, spec: NormSpec) -> list:
    """Differentiable gradients (create_graph=True) w.r.t. x and the ``(C,)`` parameters."""
    pl = plan_of(x, spec)
    xv = canonical_view(x, pl)
    views = [p if i == 2 else analytic.broadcast_param(p, spec, xv)  # eps_extra stays as is
             for i, p in enumerate(params)]
    grads = analytic.composite_backward(
        needs, (xv, *views), canonical_view(grad_z, pl), dims=spec.dims,
        threshold=spec.optional_threshold, centered=spec.centered, eps=spec.eps,
        gaussian_consistent=spec.gaussian_consistent, activation=spec.activation.label)
    return [g if g is None or t is None else g.reshape(t.shape)
            for g, t in zip(grads, (x, *params))]


def _backward(backward_op, ctx, grad_z, saved, config) -> list:
    """Gradients for ``(x, weight, bias, eps_extra, tau, kappa)``."""
    x, weight, bias, eps_extra, tau, kappa, stats = saved
    needs = ctx.needs_input_grad[:6]
    if grad_z is None:
        grad_z = torch.zeros_like(x)
    if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient
        return _composite_grads(needs, x, (weight, bias, eps_extra, tau, kappa), grad_z,
                                spec_of(*config))
    dx, sums, gxhat = backward_op(x, grad_z, weight, bias, eps_extra, tau, kappa, stats,
                                  *config, needs[0])
    grads = [dx if needs[0] else None, None, None, None, None, None]
    for i, row, p in ((1, 1, weight), (2, 0, bias), (4, 2, tau), (5, 3, kappa)):
        if p is not None and needs[i]:  # Σ ∂ℓ/∂y·x̂ → γ, Σ ∂ℓ/∂y → β, ∂ℓ/∂τ, ∂ℓ/∂κ
            grads[i] = sums[row] if sums.dtype == p.dtype else sums[row].to(p.dtype)
    if eps_extra is not None and needs[3]:  # ∂ℓ/∂ε = −½ Σ_sets r² Σ_S g x̂
        g_eps = (-0.5 * stats[4].square() * gxhat).sum()
        grads[3] = g_eps.to(eps_extra.dtype).reshape(eps_extra.shape)
    return grads


def _make_backward(backward_op: Callable) -> Callable:
    """``backward`` for ``register_autograd`` (the Triton ops)."""
    def backward(ctx, grad_z, _grad_stats):
        grads = _backward(backward_op, ctx, grad_z, ctx.saved_tensors, ctx.config)
        return (*grads, *(None,) * 7)  # config
    return backward


class _NormalizeFunction(torch.autograd.Function):
    """The Autograd kernel of ``normlab::normalize``: runs the op below autograd, saves
    ``x``, the parameters and the statistics block, differentiates with
    ``normlab::normalize_backward`` (or the composite under create_graph=True)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps_extra, tau, kappa, reduction, groups, threshold,
                centered, eps, gaussian_consistent, activation, keyset):
        config = (reduction, groups, threshold, centered, eps, gaussian_consistent, activation)
        with torch._C._AutoDispatchBelowAutograd():
            z, stats = normalize.redispatch(keyset & torch._C._after_autograd_keyset, x, weight,
                                            bias, eps_extra, tau, kappa, *config)
        ctx.save_for_backward(x, weight, bias, eps_extra, tau, kappa, stats)
        ctx.config = config
        ctx.mark_non_differentiable(stats)
        return z, stats

    @staticmethod
    def backward(ctx, grad_z, _grad_stats):
        grads = _backward(normalize_backward, ctx, grad_z, ctx.saved_tensors, ctx.config)
        return (*grads, *(None,) * 8)  # config and keyset


def _normalize_autograd(keyset, x, weight, bias, eps_extra, tau, kappa, *config):
    if torch.is_grad_enabled() and torch._C._any_requires_grad(x, weight, bias, eps_extra,
                                                                tau, kappa):
        return _NormalizeFunction.apply(x, weight, bias, eps_extra, tau, kappa, *config, keyset)
    with torch._C._AutoDispatchBelowAutograd():
        return normalize.redispatch(keyset & torch._C._after_autograd_keyset, x, weight, bias,
                                    eps_extra, tau, kappa, *config)


_LIB.impl("normalize", _normalize_autograd, "Autograd", with_keyset=True)


# --------------------------------------------------------------------------------------
# vmap: fold the vmapped dimension into the channels
# --------------------------------------------------------------------------------------
def _batched(t: Tensor, dim: int | None, size: int) -> Tensor:
    return t.movedim(dim, 0) if dim is not None else t.unsqueeze(0).expand(size, *t.shape)


def _fold_x(t: Tensor, dim: int | None, size: int) -> Tensor:
    """``(B, N, C, *)`` → ``(N, B·C, *)``: batch element ``b`` owns channels ``[bC, (b+1)C)``
    (and, for rows, groups ``[bG, (b+1)G)``)."""
    tb = _batched(t, dim, size).transpose(0, 1)
    return tb.reshape(tb.shape[0], -1, *tb.shape[3:])


def _unfold_x(t: Tensor, size: int) -> Tensor:
    """Inverse of :func:`_fold_x`, batched at dim 1."""
    return t.reshape(t.shape[0], size, -1, *t.shape[2:])


def _leading_size(t: Tensor, dim: int | None) -> int:
    """Size of the first axis of one batch element of ``t`` (vmapped at ``dim``)."""
    return t.shape[0] if dim != 0 else t.shape[1]


def _fold_param(p: Tensor | None, dim: int | None, size: int) -> Tensor | None:
    return None if p is None else _batched(p, dim, size).reshape(-1)


def _fold_sets(t: Tensor, dim: int | None, size: int, channel: bool, n: int) -> Tensor:
    """Per-set values ``(..., sets)`` of each batch element into the folded problem's sets:
    channel ``(B, k, C)`` → ``(k, B·C)``; rows ``(B, k, N·G)`` → ``(k, N·B·G)``."""
    tb = _batched(t, dim, size)
    lead = tb.shape[1:-1]
    if channel:
        return tb.movedim(0, -2).reshape(*lead, -1)
    tb = tb.reshape(size, *lead, n, -1).movedim(0, -2)  # (..., N, B, G)
    return tb.reshape(*lead, -1)


def _unfold_sets(t: Tensor, size: int, channel: bool, n: int) -> Tensor:
    """Inverse of :func:`_fold_sets`, batched at dim 0."""
    lead = t.shape[:-1]
    if channel:
        return t.reshape(*lead, size, -1).movedim(-2, 0)
    return t.reshape(*lead, n, size, -1).movedim(-2, 0).reshape(size, *lead, -1)


def _folded_config(config, size: int) -> tuple:
    """The config of the folded problem: ``size`` times the groups."""
    config = list(config)
    config[_GROUPS] *= size
    return tuple(config)


def _vmap_loop(op, info, in_dims, args):
    """One call per batch element (a batched ε, which the kernels take as one number)."""
    outs = [op(*[a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)])
            for i in range(info.batch_size)]
    return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])


def _make_forward_vmap(forward_op: Callable) -> Callable:
    def rule(info, in_dims, x, weight, bias, eps_extra, tau, kappa, *config):
        if in_dims[3] is not None:
            return _vmap_loop(forward_op, info, in_dims,
                              (x, weight, bias, eps_extra, tau, kappa, *config))
        size, channel = info.batch_size, _REDUCTIONS[config[0]] is Reduction.CHANNEL
        n = _leading_size(x, in_dims[0])
        params = [_fold_param(p, d, size) for p, d in zip((weight, bias), in_dims[1:3])]
        acts = [_fold_param(p, d, size) for p, d in zip((tau, kappa), in_dims[4:6])]
        z, stats = forward_op(_fold_x(x, in_dims[0], size), *params, eps_extra, *acts,
                              *_folded_config(config, size))
        return (_unfold_x(z, size), _unfold_sets(stats, size, channel, n)), (1, 0)
    return rule


def _make_backward_vmap(backward_op: Callable) -> Callable:
    def rule(info, in_dims, x, grad_z, weight, bias, eps_extra, tau, kappa, stats, *args):
        *config, need_dx = args
        if in_dims[4] is not None:
            return _vmap_loop(backward_op, info, in_dims,
                              (x, grad_z, weight, bias, eps_extra, tau, kappa, stats, *args))
        size, channel = info.batch_size, _REDUCTIONS[config[0]] is Reduction.CHANNEL
        n = _leading_size(x, in_dims[0])
        folded = [_fold_x(t, d, size) for t, d in zip((x, grad_z), in_dims[:2])]
        params = [_fold_param(p, d, size) for p, d in zip((weight, bias), in_dims[2:4])]
        acts = [_fold_param(p, d, size) for p, d in zip((tau, kappa), in_dims[5:7])]
        st = _fold_sets(stats, in_dims[7], size, channel, n)
        dx, sums, gxhat = backward_op(*folded, *params, eps_extra, *acts, st,
                                      *_folded_config(config, size), need_dx)
        dx = _unfold_x(dx, size) if need_dx else dx
        sums = sums.reshape(sums.shape[0], size, -1)
        return (dx, sums, _unfold_sets(gxhat, size, channel, n)), (1 if need_dx else None, 1, 0)
    return rule


def _register_vmap(forward_op, backward_op, lib=None) -> None:
    torch.library.register_vmap(forward_op, _make_forward_vmap(forward_op), lib=lib)
    torch.library.register_vmap(backward_op, _make_backward_vmap(backward_op), lib=lib)


_register_vmap(normalize, normalize_backward, _LIB)


# --------------------------------------------------------------------------------------
# normlab::normalize_triton — CUDA (Triton kernels visible to inductor)
# --------------------------------------------------------------------------------------
_TRITON: tuple | None = None


def triton_ops() -> tuple | None:
    """``(normalize_triton, normalize_triton_backward)``, defined on first call (and at import
    when CUDA is available); ``None`` without Triton."""
    global _TRITON
    if _TRITON is not None:
        return _TRITON
    from . import triton_kernels as TK  # lazy: optional dependency (triton)
    if not TK.available():
        return None

    @torch.library.triton_op("normlab::normalize_triton", mutates_args=())
    def normalize_triton(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                         eps_extra: Tensor | None, tau: Tensor | None, kappa: Tensor | None,
                         reduction: int, groups: int, threshold: float, centered: bool,
                         eps: float, gaussian_consistent: bool, activation: int
                         ) -> tuple[Tensor, Tensor]:
        config = (reduction, groups, threshold, centered, eps, gaussian_consistent, activation)
        return _forward(TK, True, TK.STATS_ROWS, x, weight, bias, eps_extra, tau, kappa,
                        config)

    @torch.library.triton_op("normlab::normalize_triton_backward", mutates_args=())
    def normalize_triton_backward(x: Tensor, grad_z: Tensor, weight: Tensor | None,
                                  bias: Tensor | None, eps_extra: Tensor | None,
                                  tau: Tensor | None, kappa: Tensor | None, stats: Tensor,
                                  reduction: int, groups: int, threshold: float,
                                  centered: bool, eps: float, gaussian_consistent: bool,
                                  activation: int, need_dx: bool
                                  ) -> tuple[Tensor, Tensor, Tensor]:
        config = (reduction, groups, threshold, centered, eps, gaussian_consistent, activation)
        return _backward_impl(TK, True, x, grad_z, weight, bias, eps_extra, tau, kappa, stats,
                              config, need_dx)

    normalize_triton.register_autograd(_make_backward(normalize_triton_backward),
                                       setup_context=_setup_context)
    _register_vmap(normalize_triton, normalize_triton_backward)
    _TRITON = (normalize_triton, normalize_triton_backward)
    return _TRITON


if torch.cuda.is_available():
    triton_ops()
