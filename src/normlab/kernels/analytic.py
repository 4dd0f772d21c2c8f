"""Normalize + affine as one autograd Function with an exact analytic backward.

Works for every normalization in normlab: the caller passes ``x`` viewed so that the
statistics reduce over ``dims`` (BN: ``(N, C, L)`` over ``(0, 2)``; GN/FRN/IN:
``(N, G, L)`` over ``(2,)``; LN: ``(P, D)`` over ``(1,)``) and the affine parameters viewed
to broadcast against that view.

Forward (filtered-BN seed eq. 4–8, FRN seed eq. 1–2)::

    plain moments μ, σ² (centered) or 0, ν² (uncentered)
    f  = [|x − μ| / sqrt(σ² + ε) ≤ T]            (all ones without a threshold)
    M  = Σ f,  μ′ = Σ f x / M,  σ′² = Σ f (x − μ′)² / (κ M)   (κ = 1 unless Gaussian-consistent)
    x̂  = (x − μ′) · r,  r = (σ′² + ε)^(-1/2)
    y  = γ x̂ + β

Backward — the true gradient of that forward, with g = γ · ∂ℓ/∂y and sums over the
whole reduction set S::

    ∂ℓ/∂x_j = r · (g_j − f_j/M · Σ_S g − f_j x̂_j /(κM) · Σ_S g x̂)     (centered)
    ∂ℓ/∂x_j = r · (g_j − f_j x̂_j /(κM) · Σ_S g x̂)                     (uncentered; FRN eq. 7)
    ∂ℓ/∂γ = Σ ∂ℓ/∂y · x̂,   ∂ℓ/∂β = Σ ∂ℓ/∂y,   ∂ℓ/∂ε = −½ Σ_S r² Σ g x̂

The filtered-BN seed's printed backward (eq. 9–13) sums ``∂ℓ/∂y`` only over the kept
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

__all__ = ["normalize_affine", "NormalizeAffineFunction", "composite_normalize_affine_act",
           "composite_backward", "RunningStats", "update_running_stats"]


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
    count = stats.count.reshape(-1).to(stats.var.dtype)
    unbiased = stats.var.reshape(-1) * (count / (count - 1).clamp_min_(1))
    torch._foreach_lerp_([running.mean, running.var],
                         [stats.mean.reshape(-1).to(running.mean.dtype),
                          unbiased.to(running.var.dtype)], running.factor)


def composite_normalize_affine_act(x, weight, bias, eps_extra, tau, kappa, *, dims, threshold,
                                   centered, eps, gaussian_consistent, activation):
    """The forward of every normlab kernel as plain autograd ops of :mod:`normlab.functional`.

    ``z = act(γ · (x − μ′)/sqrt(σ′² + ε) + β)`` with the (filtered) moments of
    :func:`normlab.functional.filtered_moments`; ``activation`` is ``"none"``, ``"relu"``,
    ``"tlu"`` (``max(y, τ)``) or ``"affine_tlu"`` (``max(y, κy + τ)``). Differentiable any
    number of times; slower than the Functions, so used only for higher derivatives.
    """
    eps_total = eps if eps_extra is None else eps_extra.to(F.stats_dtype(x.dtype)) + eps
    stats = F.filtered_moments(x, dims, threshold, centered=centered, eps=eps_total,
                               gaussian_consistent=gaussian_consistent)
    y = F.normalize(x, stats, eps_total)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    if activation == "relu":
        y = torch.relu(y)
    elif activation == "tlu":
        y = F.tlu(y, tau.to(y.dtype))
    elif activation == "affine_tlu":
        y = F.affine_tlu(y, kappa.to(y.dtype), tau.to(y.dtype))
    return y.to(x.dtype)


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


class NormalizeAffineFunction(torch.autograd.Function):
    """See the module docstring. Inputs: x, weight|None, bias|None, eps_extra|None, config."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps_extra, dims, threshold, centered, eps, gaussian_consistent):
        eps_total = eps if eps_extra is None else eps_extra.to(F.stats_dtype(x.dtype)) + eps
        plain = F.moments(x, dims, centered=centered)
        if threshold is None:
            stats = plain
        else:
            stats = F.filtered_moments(
                x, dims, threshold, centered=centered, eps=eps_total,
                gaussian_consistent=gaussian_consistent, plain=plain,
            )
        rstd = torch.rsqrt(stats.var + eps_total)
        xs = x.to(rstd.dtype)
        xhat = (xs - stats.mean) * rstd if centered else xs * rstd
        y = xhat
        if weight is not None:
            y = y * weight.to(rstd.dtype)
        if bias is not None:
            y = y + bias.to(rstd.dtype)
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
        eps_total = eps if eps_extra is None else eps_extra.to(rstd.dtype) + eps
        xs = x.to(rstd.dtype)
        gy = grad_y.to(rstd.dtype)
        xhat = (xs - mean) * rstd if centered else xs * rstd

        grad_w = _reduce_to(gy * xhat, weight.shape).to(weight.dtype) if (
            weight is not None and ctx.needs_input_grad[1]) else None
        grad_b = _reduce_to(gy, bias.shape).to(bias.dtype) if (
            bias is not None and ctx.needs_input_grad[2]) else None

        g = gy * weight.to(rstd.dtype) if weight is not None else gy
        sum_g_xhat = (g * xhat).sum(dim=dims, keepdim=True)
        grad_x = grad_eps = None
        if ctx.needs_input_grad[0]:
            kappa = F.truncated_normal_variance_factor(threshold) if (
                gaussian_consistent and threshold is not None) else 1.0
            if threshold is None:
                keep = None
                m = float(math.prod(x.shape[d] for d in dims))
            else:
                keep = F.filter_mask(xs, F.Moments(mean0, var0, count), threshold, eps_total)
                keep = keep.to(rstd.dtype)
                m = count
            proj = xhat * (sum_g_xhat / (kappa * m))
            if centered:
                proj = proj + g.sum(dim=dims, keepdim=True) / m
            if keep is not None:
                proj = proj * keep
            grad_x = ((g - proj) * rstd).to(x.dtype)
        if eps_extra is not None and ctx.needs_input_grad[3]:
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
        threshold: robust filter ``T`` (filtered-BN eq. 5); ``None`` disables it.
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
