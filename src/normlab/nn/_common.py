"""Argument checks and the affine-parameter mixin shared by normlab's modules."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


def check_threshold(threshold: Any) -> float | None:
    """Return the robust-filter threshold as a float, or ``None`` for "no filter".

    ``None`` and ``inf`` both mean no filtering (plain statistics).
    """
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(
            f"threshold must be a positive number or None, got {threshold!r} "
            f"({type(threshold).__name__}); e.g. threshold=2.0, or None to disable filtering"
        )
    threshold = float(threshold)
    if math.isnan(threshold) or threshold <= 0:
        raise ValueError(
            f"threshold must be > 0 (values beyond T standard deviations are ignored), "
            f"got {threshold!r}; use e.g. threshold=2.0, or None to disable filtering"
        )
    return None if math.isinf(threshold) else threshold


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_eps(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    return float(eps)


def check_momentum(momentum: Any) -> float | None:
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
        raise ValueError(
            f"momentum must be in [0, 1] or None (cumulative average), got {momentum!r}"
        )
    return float(momentum)


def check_gaussian_consistent(value: Any, threshold: float | None) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"gaussian_consistent must be True or False, got {value!r}")
    return value


def check_input(module: nn.Module, x: Any, allowed_dims: tuple[int, ...], channels: int | None,
                channel_dim: int = 1) -> None:
    """Raise a clear error for a wrong type, rank or channel count."""
    name = type(module).__name__
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in allowed_dims:
        ranks = " or ".join(f"{d}D" for d in allowed_dims)
        raise ValueError(
            f"{name} expects {ranks} input, got {x.dim()}D input of shape {tuple(x.shape)}"
        )
    if channels is not None and x.shape[channel_dim] != channels:
        raise ValueError(
            f"{name} was built for {channels} channels but the input has "
            f"{x.shape[channel_dim]} at dim {channel_dim} (shape {tuple(x.shape)}); "
            f"build it with num_features={x.shape[channel_dim]}"
        )
    if not (x.is_floating_point()):
        raise TypeError(f"{name} expects a floating-point tensor, got dtype {x.dtype}")


class AffineMixin:
    """Creates ``weight`` (γ, init ``gamma_init``) and ``bias`` (β, init 0) like torch."""

    def _make_affine(self, shape, affine: bool, gamma_init: float, bias: bool = True,
                     device=None, dtype=None) -> None:
        if isinstance(gamma_init, bool) or not isinstance(gamma_init, (int, float)):
            raise TypeError(f"gamma_init must be a number, got {gamma_init!r}")
        self.gamma_init = float(gamma_init)
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty(shape, **factory))
            self.bias = nn.Parameter(torch.empty(shape, **factory)) if bias else None
            if not bias:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def _reset_affine(self) -> None:
        if self.weight is not None:
            nn.init.constant_(self.weight, self.gamma_init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class ChannelStatsNorm(AffineMixin, nn.Module):
    """State shared by per-channel norms with optional running statistics (BN, IN).

    Validates torch's arguments (``num_features, eps, momentum, affine,
    track_running_stats``) and the keyword-only extras, creates ``weight``/``bias`` and the
    ``running_mean``, ``running_var``, ``num_batches_tracked`` buffers named as torch's, and
    advances the running-average bookkeeping exactly as torch does.
    """

    def __init__(self, num_features: int, eps: float, momentum: float | None, affine: bool,
                 track_running_stats: bool, device, dtype, *, threshold: float | None,
                 gaussian_consistent: bool, gamma_init: float) -> None:
        super().__init__()
        self.num_features = check_positive_int("num_features", num_features)
        self.eps = check_eps(eps)
        self.momentum = check_momentum(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.threshold = check_threshold(threshold)
        self.gaussian_consistent = check_gaussian_consistent(gaussian_consistent, self.threshold)
        self._make_affine(num_features, affine, gamma_init, device=device, dtype=dtype)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))
            self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=dtype))
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long, device=device))
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        self._reset_affine()

    def extra_repr(self) -> str:
        text = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"threshold={self.threshold}")
        if self.gaussian_consistent:
            text += ", gaussian_consistent=True"
        return text

    def _averaging_factor(self) -> float:
        """Advance ``num_batches_tracked`` and return the running-average factor (as torch)."""
        if not (self.training and self.track_running_stats):
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum


def channel_view(param: Tensor | None, ndim: int, channel_dim: int = 1) -> Tensor | None:
    """View a per-channel parameter ``(C,)`` to broadcast against an ``ndim`` tensor."""
    if param is None:
        return None
    shape = [1] * ndim
    shape[channel_dim] = -1
    return param.view(shape)
