"""The math of every normalization in normlab, as pure tensor functions.

This module is the single source of truth: modules (``normlab.nn``) and fast kernels
(``normlab.kernels``) are tested against it. Everything here is differentiable by plain
autograd (the robust filter's mask is piecewise constant and carries no gradient).

References (full entries in docs/references.md):

* **BN** – Ioffe & Szegedy 2015 [IS15] (arXiv 1502.03167) Alg. 1, written as Horváth &
  Al-afandi 2020 [HA20] (arXiv 2010.08251) eq. 1–3: ``y = γ (x − μ) / sqrt(σ² + ε) + β``.
* **Filtered moments** – [HA20] eq. 4–7: z-score every value with the plain
  moments, keep values with ``|z| ≤ T``, recompute mean and variance over the kept values;
  eq. 8 then normalizes **all** values with the filtered moments.
* **FRN** – Singh & Krishnan 2020 [SK20] (arXiv 1911.09737) eq. 1–2: ``x̂ = x / sqrt(ν² + ε)``,
  ``ν² = mean(x²)`` over the spatial axes of one sample and channel; eq. 3 TLU
  ``z = max(y, τ)``; §4.2 Table 5 Affine-TLU ``max(x, κx + τ)``.

Axes: every function takes ``dims``, the axes the statistics are reduced over; statistics
keep those axes (size 1) so they broadcast against ``x``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = [
    "Moments",
    "moments",
    "mean_square",
    "filter_mask",
    "filtered_moments",
    "truncated_normal_variance_factor",
    "variance_factor",
    "normalize",
    "normalized_moments_reference",
    "tlu",
    "affine_tlu",
    "stats_dtype",
]


class Moments(NamedTuple):
    """Statistics of one reduction set.

    ``mean`` is zero for uncentered moments; ``var`` is the (biased) variance for centered
    moments and the mean square ν² for uncentered ones; ``count`` is the number of values
    that entered the statistics (the kept count ``M`` for filtered moments).
    """

    mean: Tensor
    var: Tensor
    count: Tensor


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are computed in float32 for half-precision inputs (DESIGN conventions)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_dims(x: Tensor, dims: Sequence[int]) -> tuple[int, ...]:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    dims = tuple(d % x.dim() for d in dims)
    if not dims:
        raise ValueError("dims is empty: give at least one axis to reduce over")
    return dims


def _count(x: Tensor, dims: tuple[int, ...]) -> int:
    return math.prod([x.shape[d] for d in dims])


def moments(x: Tensor, dims: Sequence[int], *, centered: bool = True) -> Moments:
    """Plain moments over ``dims``.

    centered: ``μ = 1/m Σ x``, ``σ² = 1/m Σ (x − μ)²`` ([HA20] eq. 2–3, biased);
    uncentered: ``μ = 0``, ``ν² = 1/m Σ x²`` ([SK20] eq. 1).
    """
    dims = _check_dims(x, dims)
    x = x.to(stats_dtype(x.dtype))
    count = torch.full((), _count(x, dims), dtype=x.dtype, device=x.device)
    if x.numel() == 0:  # empty sets: NaN statistics, without var_mean's warning
        var = x.sum(dim=dims, keepdim=True) / count
        mean = var.clone() if centered else torch.zeros_like(var)
        return Moments(mean, var, count.expand_as(var))
    if centered:
        var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=0)
    else:
        var = x.square().mean(dim=dims, keepdim=True)
        mean = torch.zeros_like(var)
    return Moments(mean, var, count.expand_as(var))


def mean_square(x: Tensor, dims: Sequence[int]) -> Tensor:
    """``ν² = 1/m Σ x²`` over ``dims`` ([SK20] eq. 1)."""
    return moments(x, dims, centered=False).var


def truncated_normal_variance_factor(threshold: float) -> float:
    """κ(T) = 1 − 2Tφ(T) / (2Φ(T) − 1): variance of a unit Gaussian truncated to [−T, T].

    Dividing the filtered variance by κ(T) makes filtered moments of clean Gaussian input
    equal the plain moments (``gaussian_consistent=True``); κ(2) ≈ 0.774, κ(∞) = 1.
    """
    t = float(threshold)
    if not t > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    if math.isinf(t):
        return 1.0
    phi = math.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
    big_phi_centered = math.erf(t / math.sqrt(2.0))  # 2Φ(T) − 1
    return 1.0 - 2.0 * t * phi / big_phi_centered


def variance_factor(threshold: float | None, gaussian_consistent: bool) -> float:
    """What the filtered variance is divided by: κ(T) (:func:`truncated_normal_variance_factor`)
    when ``gaussian_consistent`` and a filter is on, else 1."""
    if gaussian_consistent and threshold is not None:
        return truncated_normal_variance_factor(threshold)
    return 1.0


def filter_mask(x: Tensor, plain: Moments, threshold: float, eps: float | Tensor) -> Tensor:
    """Mask ``f(x) = [|x − μ| / sqrt(σ² + ε) ≤ T]`` ([HA20] eq. 4–5).

    For uncentered moments (``μ = 0``, ``σ² = ν²``) this is ``|x| / sqrt(ν² + ε) ≤ T``.
    Where a reduction set would keep nothing (possible for small ``T``), every value of
    that set is kept, so its filtered moments fall back to the plain moments.
    """
    with torch.no_grad():
        x = x.detach().to(plain.var.dtype)
        z = (x - plain.mean) * torch.rsqrt(plain.var + eps)
        mask = z.abs() <= threshold
        dims = tuple(i for i in range(x.dim()) if plain.var.shape[i] == 1 and x.shape[i] != 1)
        kept_any = mask.any(dim=dims, keepdim=True) if dims else mask
        return mask | ~kept_any


def filtered_moments(
    x: Tensor,
    dims: Sequence[int],
    threshold: float | None,
    *,
    centered: bool = True,
    eps: float | Tensor = 1e-5,
    gaussian_consistent: bool = False,
    plain: Moments | None = None,
) -> Moments:
    """Moments over the values inside ±T plain standard deviations ([HA20] eq. 4–7).

    ``μ′ = Σ f x / Σ f``, ``σ′² = Σ f (x − μ′)² / Σ f`` with ``f`` from :func:`filter_mask`;
    uncentered: ``ν′² = Σ f x² / Σ f``. With ``gaussian_consistent`` the variance is divided
    by κ(T) (:func:`truncated_normal_variance_factor`). ``threshold=None`` or ``inf`` gives
    the plain moments. Differentiable in ``x`` (the mask is constant). ``plain`` may pass
    already computed plain moments of ``x`` to save a pass.
    """
    dims = _check_dims(x, dims)
    if threshold is not None and not threshold > 0:  # NaN included
        raise ValueError(f"threshold must be > 0 or None, got {threshold!r}")
    if plain is None:
        plain = moments(x, dims, centered=centered)
    if threshold is None or math.isinf(threshold):
        return plain
    xs = x.to(plain.var.dtype)
    mask = filter_mask(xs, plain, threshold, eps).to(xs.dtype)
    count = mask.sum(dim=dims, keepdim=True)
    if centered:
        mean = (mask * xs).sum(dim=dims, keepdim=True) / count
        var = (mask * (xs - mean).square()).sum(dim=dims, keepdim=True) / count
    else:
        mean = torch.zeros_like(count)
        var = (mask * xs.square()).sum(dim=dims, keepdim=True) / count
    if gaussian_consistent:
        var = var / truncated_normal_variance_factor(threshold)
    return Moments(mean, var, count)


def normalize(x: Tensor, stats: Moments, eps: float | Tensor) -> Tensor:
    """``x̂ = (x − μ) / sqrt(σ² + ε)`` ([HA20] eq. 1/8; [SK20] eq. 1 with μ = 0)."""
    return (x.to(stats.var.dtype) - stats.mean) * torch.rsqrt(stats.var + eps)


def normalized_moments_reference(
    x: Tensor,
    dims: Sequence[int],
    *,
    threshold: float | None = None,
    centered: bool = True,
    eps: float | Tensor = 1e-5,
    gaussian_consistent: bool = False,
) -> tuple[Tensor, Moments]:
    """Reference normalization by autograd: filtered moments, then normalize all values.

    Returns ``(x̂, moments)`` with ``x̂`` in float32 for half inputs. The analytic kernels
    in :mod:`normlab.kernels` must agree with this function, values and gradients.
    """
    stats = filtered_moments(
        x, dims, threshold, centered=centered, eps=eps, gaussian_consistent=gaussian_consistent
    )
    return normalize(x, stats, eps), stats


def tlu(y: Tensor, tau: Tensor) -> Tensor:
    """Thresholded linear unit ``z = max(y, τ)`` ([SK20] eq. 3).

    The gradient follows eq. 4: it reaches ``y`` where ``y ≥ τ`` and ``τ`` elsewhere. A NaN
    ``y`` stays NaN (as ``torch.relu`` and ``torch.maximum``), with the gradient to ``y``.
    """
    return torch.where(y < tau, tau.to(y.dtype).expand_as(y), y)


def affine_tlu(y: Tensor, kappa: Tensor, tau: Tensor) -> Tensor:
    """Affine-TLU ``z = max(y, κy + τ)`` ([SK20] Table 5: PReLU and TLU combined).

    A NaN ``y`` stays NaN and takes the ``y`` branch, as in :func:`tlu`.
    """
    threshold = kappa.to(y.dtype) * y + tau.to(y.dtype)  # keeps y's dtype (as tlu does)
    return torch.where(y < threshold, threshold, y)
