"""Normalize + affine as one autograd Function with an exact analytic backward.

Works for every normalization in normlab: the caller passes ``x`` viewed so that the
statistics reduce over ``dims`` (BN: ``(N, C, L)`` over ``(0, 2)``; GN/FRN/IN:
``(N, G, L)`` over ``(2,)``; LN: ``(P, D)`` over ``(1,)``) and the affine parameters viewed
to broadcast against that view.

Forward ([HA20] eq. 4–8, [SK20] eq. 1–2)::

    plain moments μ, σ² (centered) or 0, ν² (uncentered)
    f  = [|x − μ| / sqrt(σ² + ε) ≤ T]            (all ones without a threshold)
    M  = Σ f,  μ′ = Σ f x / M,  σ′² = Σ f (x − μ′)² / (κ M)   (κ = 1 unless Gaussian-consistent)
    x̂  = (x − μ′) · r,  r = (σ′² + ε)^(-1/2)
    y  = γ x̂ + β

Backward — the true gradient of that forward, with g = γ · ∂ℓ/∂y and sums over the
whole reduction set S::

    ∂ℓ/∂x_j = r · (g_j − f_j/M · Σ_S g − f_j x̂_j /(κM) · Σ_S g x̂)     (centered)
    ∂ℓ/∂x_j = r · (g_j − f_j x̂_j /(κM) · Σ_S g x̂)                     (uncentered; [SK20] eq. 7)
    ∂ℓ/∂γ = Σ ∂ℓ/∂y · x̂,   ∂ℓ/∂β = Σ ∂ℓ/∂y,   ∂ℓ/∂ε = −½ Σ_S r² Σ g x̂

[HA20]'s printed backward (eq. 9–13) sums ``∂ℓ/∂y`` only over the kept
values (``f = 1``). That is not the derivative of its own eq. 8, which normalizes every value
with μ′, σ′: outliers still shift ``y`` and so contribute to ``∂ℓ/∂β``, ``∂ℓ/∂γ`` and to the
terms ``Σ_S g``, ``Σ_S g x̂``. normlab implements the true gradient above; ``gradcheck``
against autograd through :mod:`normlab.functional` confirms it.

Memory: the Function saves ``x`` and per-group statistics only; the mask and ``x̂`` are
recomputed in backward.

Higher derivatives: when a backward runs with ``create_graph=True`` (gradient penalties,
meta-learning, Hessian-vector products) every normlab Function — this one and the fused
CPU/Triton ones — hands over to :func:`composite_backward`, which rebuilds the forward from
differentiable :mod:`normlab.functional` ops and differentiates that graph, so gradients of
gradients are exact (the robust-filter mask is piecewise constant, so it carries no
derivative).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .. import functional as F
from .spec import Activation, NormSpec, Reduction

__all__ = ["normalize_affine", "NormalizeAffineFunction", "composite_normalize_affine_act",
           "composite_forward",
           "composite_backward", "RunningStats", "update_running_stats", "canonical_forward",
           "canonical_backward", "apply_activation", "broadcast_param"]


def _reduce_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``t`` over the axes where ``shape`` is 1 (autograd's broadcast reduction)."""
    dims = tuple(i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


class RunningStats(NamedTuple):
    """Running averages of a batch norm, updated in place from each training batch.

    ``mean ← mean + factor · (μ′ − mean)``, ``var ← var + factor · (σ′² M/(M − 1) − var)``
    with the batch's (filtered) moments and kept count ``M`` (Bessel's correction over the
    values actually used, as ``torch.nn.BatchNorm*d`` does over all of them). ``factor`` is
    the momentum, or ``1/num_batches_tracked`` for a cumulative average.
    """

    mean: Tensor
    var: Tensor
    factor: float


@torch.no_grad()
def update_running_stats(running: RunningStats, stats: F.Moments) -> None:
    """Apply :class:`RunningStats`' update with per-channel ``stats`` (any keepdim shape)."""
    update_running_stats_unchecked(running, stats)


def update_running_stats_unchecked(running: RunningStats, stats: F.Moments) -> None:
    """:func:`update_running_stats` for statistics that carry no gradient (the kernels'
    outputs): without the ``no_grad`` context, which costs more than the update on small
    layers."""
    mean, var, count = (t if t.dim() == 1 else t.reshape(-1) for t in stats)
    unbiased = var * count / (count - 1).clamp_min(1)
    if mean.dtype != running.mean.dtype:
        mean, unbiased = mean.to(running.mean.dtype), unbiased.to(running.var.dtype)
    if torch._C._are_functorch_transforms_active():
        _check_vmapped_update(running, mean)
        running.mean.lerp_(mean, running.factor)  # per buffer: _foreach_lerp_ has no vmap rule
        running.var.lerp_(unbiased, running.factor)
    else:
        torch._foreach_lerp_([running.mean, running.var], [mean, unbiased], running.factor)


def _check_vmapped_update(running: RunningStats, mean: Tensor) -> None:
    """Under ``torch.func.vmap`` the running buffers are updated per model when they are
    vmapped too (``functional_call`` over stacked states); one unbatched buffer cannot take
    every batch element's statistics — refused in one line naming the ways out, as torch's
    BatchNorm refuses it. (``grad``/``jacrev`` leave the statistics unbatched: updated.)"""
    from torch._C._functorch import is_batchedtensor

    if is_batchedtensor(mean) and not is_batchedtensor(running.mean):
        raise RuntimeError(
            "normlab: vmap over a layer that updates running_mean or running_var: each batch "
            "element has its own statistics and one buffer cannot take them; use "
            "torch.func.replace_all_batch_norm_modules_(model), track_running_stats=False, "
            "eval mode (as for torch's BatchNorm), or vmap over the buffers too "
            "(torch.func.functional_call over stacked model states)")


def composite_forward(x, weight, bias, eps_extra, tau, kappa, *, dims, threshold, centered,
                      eps, gaussian_consistent, activation) -> tuple[Tensor, F.Moments]:
    """The forward of every normlab kernel as plain autograd ops of :mod:`normlab.functional`.

    ``z = act(γ · (x − μ′)/sqrt(σ′² + ε) + β)`` with the (filtered) moments of
    :func:`normlab.functional.filtered_moments`; ``activation`` is ``"none"``, ``"relu"``,
    ``"tlu"`` (``max(y, τ)``) or ``"affine_tlu"`` (``max(y, κy + τ)``). Returns ``z`` and the
    statistics (keepdim). Differentiable any number of times and by every ``torch.func``
    transform; slower than the Functions, so used for higher derivatives and under
    ``torch.func`` only.
    """
    eps_total = _eps_total(eps, eps_extra, F.stats_dtype(x.dtype))
    stats = F.filtered_moments(x, dims, threshold, centered=centered, eps=eps_total,
                               gaussian_consistent=gaussian_consistent)
    y = _affine(F.normalize(x, stats, eps_total), weight, bias)
    y = apply_activation(y, Activation.parse(activation), tau, kappa)
    return y.to(x.dtype), stats


def composite_normalize_affine_act(x, weight, bias, eps_extra, tau, kappa, **config) -> Tensor:
    """``z`` of :func:`composite_forward`."""
    return composite_forward(x, weight, bias, eps_extra, tau, kappa, **config)[0]


def composite_backward(needs_input_grad, inputs, grad_y, **config):
    """Gradients of :func:`composite_normalize_affine_act` w.r.t. ``inputs`` with a graph.

    ``inputs`` are the Function's saved ``(x, weight, bias, eps_extra, tau, kappa)`` (still
    attached to the caller's graph), ``needs_input_grad`` their flags; returns one gradient
    (or ``None``) per input, themselves differentiable.
    """
    wanted = [i for i, t in enumerate(inputs) if t is not None and needs_input_grad[i]]
    grads: list = [None] * len(inputs)
    if not wanted:
        return grads
    with torch.enable_grad():
        z = composite_normalize_affine_act(*inputs, **config)
        found = torch.autograd.grad(z, [inputs[i] for i in wanted], grad_y, create_graph=True,
                                    allow_unused=True)
    for i, g in zip(wanted, found):
        grads[i] = g if g is not None else torch.zeros_like(inputs[i])
    return grads


def _eps_total(eps: float, eps_extra: Tensor | None, dtype: torch.dtype) -> float | Tensor:
    """ε + |ε_l| (FRN's learned ε arrives as the tensor ``eps_extra``)."""
    return eps if eps_extra is None else eps_extra.to(dtype) + eps


def _statistics(x, dims, threshold, centered, eps_total, gaussian_consistent):
    """``(plain, used, rstd)``: plain moments (they define the filter), the (filtered)
    moments used to normalize, and ``r = (σ′² + ε)^(-1/2)`` ([HA20] eq. 4–8)."""
    plain = F.moments(x, dims, centered=centered)
    if threshold is None:
        used = plain
    else:
        used = F.filtered_moments(x, dims, threshold, centered=centered, eps=eps_total,
                                  gaussian_consistent=gaussian_consistent, plain=plain)
    return plain, used, torch.rsqrt(used.var + eps_total)


def _normalized(xs: Tensor, mean: Tensor, rstd: Tensor, centered: bool) -> Tensor:
    return (xs - mean) * rstd if centered else xs * rstd


def _affine(xhat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    y = xhat
    if weight is not None:
        y = y * weight.to(xhat.dtype)
    if bias is not None:
        y = y + bias.to(xhat.dtype)
    return y


def _input_grad(g, xhat, rstd, xs, mean0, var0, count, dims, threshold, centered, eps_total,
                gaussian_consistent):
    """``∂ℓ/∂x = r (g − f/M Σ g − f x̂/(κM) Σ g x̂)`` (module docstring; no mean term when
    uncentered) in the statistics dtype."""
    sum_g_xhat = (g * xhat).sum(dim=dims, keepdim=True)
    kappa = F.variance_factor(threshold, gaussian_consistent)
    if threshold is None:
        keep = None
        m = float(math.prod([xs.shape[d] for d in dims]))
    else:
        keep = F.filter_mask(xs, F.Moments(mean0, var0, count), threshold, eps_total)
        keep = keep.to(rstd.dtype)
        m = count
    proj = xhat * (sum_g_xhat / (kappa * m))
    if centered:
        proj = proj + g.sum(dim=dims, keepdim=True) / m
    if keep is not None:
        proj = proj * keep
    return (g - proj) * rstd


class NormalizeAffineFunction(torch.autograd.Function):
    """See the module docstring. Inputs: x, weight|None, bias|None, eps_extra|None, config."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps_extra, dims, threshold, centered, eps, gaussian_consistent):
        eps_total = _eps_total(eps, eps_extra, F.stats_dtype(x.dtype))
        plain, stats, rstd = _statistics(x, dims, threshold, centered, eps_total,
                                         gaussian_consistent)
        xhat = _normalized(x.to(rstd.dtype), stats.mean, rstd, centered)
        y = _affine(xhat, weight, bias)
        ctx.save_for_backward(x, weight, bias, eps_extra, plain.mean, plain.var,
                              stats.mean, rstd, stats.count)
        ctx.config = (dims, threshold, centered, eps, gaussian_consistent)
        # the returned statistics are copies: callers may update buffers from them in place
        outputs = (stats.mean.clone(), stats.var.clone(), stats.count.clone())
        ctx.mark_non_differentiable(*outputs)
        return (y.to(x.dtype), *outputs)

    @staticmethod
    def backward(ctx, grad_y, _gm, _gv, _gc):
        x, weight, bias, eps_extra, mean0, var0, mean, rstd, count = ctx.saved_tensors
        dims, threshold, centered, eps, gaussian_consistent = ctx.config
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is differentiable
            grads = composite_backward(
                ctx.needs_input_grad[:4], (x, weight, bias, eps_extra, None, None), grad_y,
                dims=dims, threshold=threshold, centered=centered, eps=eps,
                gaussian_consistent=gaussian_consistent, activation="none")
            return (*grads[:4], None, None, None, None, None)
        eps_total = _eps_total(eps, eps_extra, rstd.dtype)
        xs = x.to(rstd.dtype)
        gy = grad_y.to(rstd.dtype)
        xhat = _normalized(xs, mean, rstd, centered)

        grad_w = _reduce_to(gy * xhat, weight.shape).to(weight.dtype) if (
            weight is not None and ctx.needs_input_grad[1]) else None
        grad_b = _reduce_to(gy, bias.shape).to(bias.dtype) if (
            bias is not None and ctx.needs_input_grad[2]) else None

        g = gy * weight.to(rstd.dtype) if weight is not None else gy
        grad_x = grad_eps = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(g, xhat, rstd, xs, mean0, var0, count, dims, threshold,
                                 centered, eps_total, gaussian_consistent).to(x.dtype)
        if eps_extra is not None and ctx.needs_input_grad[3]:
            sum_g_xhat = (g * xhat).sum(dim=dims, keepdim=True)
            grad_eps = (-0.5 * rstd.square() * sum_g_xhat).sum().to(eps_extra.dtype)
            grad_eps = grad_eps.reshape(eps_extra.shape)
        return grad_x, grad_w, grad_b, grad_eps, None, None, None, None, None


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
) -> tuple[Tensor, F.Moments]:
    """``y = γ · normalize(x) + β`` with (filtered) statistics over ``dims``; exact backward.

    Args:
        x: input viewed so the statistics reduce over ``dims``.
        weight, bias: γ and β viewed to broadcast against ``x`` (or ``None``).
        threshold: robust filter ``T`` ([HA20] eq. 5); ``None`` disables it.
        centered: subtract the mean (BN/GN/LN/IN) or not (FRN).
        eps: constant ε; ``eps_extra`` (a tensor, e.g. FRN's ``|ε_l|``) is added to it and
            receives a gradient.
        gaussian_consistent: divide the filtered variance by κ(T).

    Returns:
        ``y`` in ``x``'s dtype and the detached statistics used (mean, var, kept count),
        in float32 for half inputs, for running-average updates.
    """
    dims = tuple(d % x.dim() for d in dims)
    y, mean, var, count = NormalizeAffineFunction.apply(
        x, weight, bias, eps_extra, dims, threshold, centered, float(eps), gaussian_consistent
    )
    return y, F.Moments(mean, var, count)


# --------------------------------------------------------------------------------------
# the custom ops' contract (normlab.kernels.ops) in plain torch ops
# --------------------------------------------------------------------------------------
def broadcast_param(p: Tensor | None, spec: NormSpec, x: Tensor) -> Tensor | None:
    """A canonical ``(C,)`` / ``(G·Cg,)`` parameter viewed to broadcast against the canonical
    ``x``: ``(1, C, 1)`` for :attr:`Reduction.CHANNEL`, ``(1, G, Cg, 1)`` for rows."""
    if p is None:
        return None
    if spec.reduction is Reduction.CHANNEL:
        return p.view(1, -1, 1)
    return p.view(1, x.shape[1], x.shape[2], 1)


def _set_view(row: Tensor, spec: NormSpec, x: Tensor) -> Tensor:
    """One row of the ``(6, sets)`` statistics table viewed against the canonical ``x``."""
    if spec.reduction is Reduction.CHANNEL:
        return row.view(1, -1, 1)
    return row.view(x.shape[0], x.shape[1], 1, 1)


def apply_activation(y: Tensor, activation: Activation, tau: Tensor | None,
                     kappa: Tensor | None) -> Tensor:
    """``relu(y)``, ``max(y, τ)`` ([SK20] eq. 3) or ``max(y, κy + τ)`` (Table 5); τ, κ viewed
    to broadcast against ``y``."""
    if activation is Activation.RELU:
        return torch.relu(y)
    if activation is Activation.TLU:
        return F.tlu(y, tau.to(y.dtype))
    if activation is Activation.AFFINE_TLU:
        return F.affine_tlu(y, kappa.to(y.dtype), tau.to(y.dtype))
    return y


def _activation_backward(dz, y, activation, tau, kappa):
    """``(∂ℓ/∂y, ∂ℓ/∂τ per value, ∂ℓ/∂κ per value)`` of :func:`apply_activation` — the same
    derivatives autograd takes through ``torch.relu``, ``F.tlu`` and ``F.affine_tlu``."""
    zero = torch.zeros((), dtype=dz.dtype, device=dz.device)
    if activation is Activation.NONE:
        return dz, None, None
    if activation is Activation.RELU:
        return torch.where(y > 0, dz, zero), None, None
    if activation is Activation.TLU:
        passed = y >= tau
        return torch.where(passed, dz, zero), torch.where(passed, zero, dz), None
    floor = kappa * y + tau
    passed = y >= floor
    d_floor = torch.where(passed, zero, dz)
    return torch.where(passed, dz, dz * kappa), d_floor, d_floor * y


def canonical_forward(x: Tensor, weight, bias, eps_extra, tau, kappa, spec: NormSpec
                      ) -> tuple[Tensor, Tensor]:
    """What the ``normlab::normalize`` op computes, in torch ops: ``(z, stats)``.

    ``x`` is the canonical view of ``spec`` (:mod:`normlab.kernels.spec`), parameters are
    ``(P,)`` vectors. ``z`` has ``x``'s dtype; ``stats`` is ``(6, sets)`` in the
    statistics dtype with rows plain mean, plain variance, mean, variance, ``r`` and kept
    count (the fused kernels' table). Used where no fused kernel applies (no compiler,
    empty inputs) and as their specification in tests.
    """
    kdt = F.stats_dtype(x.dtype)
    eps_total = _eps_total(spec.eps, eps_extra, kdt)
    plain, used, rstd = _statistics(x, spec.dims, spec.optional_threshold, spec.centered,
                                    eps_total, spec.gaussian_consistent)
    xhat = _normalized(x.to(kdt), used.mean, rstd, spec.centered)
    y = _affine(xhat, broadcast_param(weight, spec, x), broadcast_param(bias, spec, x))
    z = apply_activation(y, spec.activation, broadcast_param(tau, spec, x),
                         broadcast_param(kappa, spec, x))
    rows = (plain.mean, plain.var, used.mean, used.var, rstd, used.count)
    table = torch.stack([r.to(kdt).expand_as(rstd).reshape(-1) for r in rows])
    return z.to(x.dtype), table


def canonical_backward(x: Tensor, grad_z: Tensor, weight, bias, eps_extra, tau, kappa,
                       stats: Tensor, spec: NormSpec, need_dx: bool
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """What ``normlab::normalize_backward`` computes, in torch ops: ``(dx, sums, gxhat)``.

    ``dx`` is ``∂ℓ/∂x`` in ``x``'s dtype (an empty tensor unless ``need_dx``);
    ``sums`` holds per parameter ``Σ ∂ℓ/∂y`` (β), ``Σ ∂ℓ/∂y x̂`` (γ) and for rows also
    ``∂ℓ/∂τ``, ``∂ℓ/∂κ``: ``(2, C)`` or ``(4, G·Cg)`` (the last two rows are defined only
    for the activations that take τ / κ); ``gxhat`` is ``Σ_S γ ∂ℓ/∂y x̂`` per
    set (``∂ℓ/∂ε = −½ Σ r² · gxhat``).
    """
    kdt = stats.dtype
    dims = spec.dims
    param_dims = (0, 2) if spec.reduction is Reduction.CHANNEL else (0, 3)
    # rows 0-5 are the contract; a backend may keep more (the C kernels' low parts)
    mean0, var0, mean, _var, rstd, count = (_set_view(r, spec, x) for r in stats[:6])
    xs = x.to(kdt)
    xhat = _normalized(xs, mean, rstd, spec.centered)
    w, b, t, k = (None if p is None else broadcast_param(p, spec, x).to(kdt)
                  for p in (weight, bias, tau, kappa))
    dz = grad_z.to(kdt)
    if spec.activation is Activation.NONE:
        dy, dtau, dkappa = dz, None, None
    else:
        dy, dtau, dkappa = _activation_backward(dz, _affine(xhat, w, b), spec.activation, t, k)
    per_param = [dy, dy * xhat]
    if spec.reduction is Reduction.ROWS or spec.activation is not Activation.NONE:
        per_param += [torch.zeros_like(dy) if d is None else d for d in (dtau, dkappa)]
    sums = torch.stack([s.sum(dim=param_dims).reshape(-1) for s in per_param])
    g = dy * w if w is not None else dy
    gxhat = (g * xhat).sum(dim=dims).reshape(-1)
    if not need_dx:
        return x.new_empty(0), sums, gxhat
    eps_total = _eps_total(spec.eps, eps_extra, kdt)
    dx = _input_grad(g, xhat, rstd, xs, mean0, var0, count, dims, spec.optional_threshold,
                     spec.centered, eps_total, spec.gaussian_consistent)
    return dx.to(x.dtype), sums, gxhat
