"""Per-sample centered normalizations with the optional robust filter: group, layer, instance.

Filtered GN is named in the filtered-BN seed (§IV.D: "our filtering method can be applied
with group normalization after element selection"); layer and instance norm are the same
pipeline with other reduction sets. ``threshold=None`` calls torch's own functional op, so
it equals ``torch.nn.GroupNorm`` / ``LayerNorm`` / ``InstanceNorm*d`` exactly.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from ..kernels import normalize_affine
from ._common import (
    AffineMixin,
    ChannelStatsNorm,
    check_eps,
    check_gaussian_consistent,
    check_input,
    check_positive_int,
    check_threshold,
)

__all__ = [
    "FilteredGroupNorm",
    "FilteredLayerNorm",
    "FilteredInstanceNorm1d",
    "FilteredInstanceNorm2d",
    "FilteredInstanceNorm3d",
]


class FilteredGroupNorm(AffineMixin, nn.Module):
    r"""Group normalization whose moments ignore values beyond ±T standard deviations.

    For each sample and group ``S`` of ``C/G`` channels × all positions: plain moments μ, σ²;
    mask ``f = [|x − μ| / sqrt(σ² + ε) ≤ T]``; ``μ′ = Σ f x / M``, ``σ′² = Σ f (x − μ′)² / M``
    (filtered-BN seed eq. 4–7 applied to GN's set, §IV.D); ``y = γ_c (x − μ′)/sqrt(σ′² + ε) + β_c``.
    ``threshold=None`` is exactly ``torch.nn.GroupNorm``; ``num_groups=1`` is layer norm over
    ``(C, *)`` with per-channel affine, ``num_groups=C`` instance norm.

    Args:
        num_groups: groups ``G`` (must divide ``num_channels``).
        num_channels, eps, affine, device, dtype: as ``torch.nn.GroupNorm``.
        threshold: ``T`` in standard deviations (default 2); ``None`` disables filtering.
        gaussian_consistent: divide the filtered variance by κ(T).
        gamma_init: initial γ.

    Shape: ``(N, C, *)``.

    Example:
        >>> FilteredGroupNorm(8, 64, threshold=3.0)(torch.randn(2, 64, 16, 16)).shape
        torch.Size([2, 64, 16, 16])
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, threshold: float | None = 2.0,
                 gaussian_consistent: bool = False, gamma_init: float = 1.0) -> None:
        super().__init__()
        self.num_groups = check_positive_int("num_groups", num_groups)
        self.num_channels = check_positive_int("num_channels", num_channels)
        if num_channels % num_groups:
            raise ValueError(
                f"num_groups ({num_groups}) must divide num_channels ({num_channels}); valid "
                f"group counts: {[g for g in range(1, num_channels + 1) if num_channels % g == 0]}"
            )
        self.eps = check_eps(eps)
        self.affine = bool(affine)
        self.threshold = check_threshold(threshold)
        self.gaussian_consistent = check_gaussian_consistent(gaussian_consistent, self.threshold)
        self._make_affine(num_channels, affine, gamma_init, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._reset_affine()

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"threshold={self.threshold}")

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, tuple(range(2, 9)), self.num_channels)
        if self.threshold is None:
            return TF.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        n, c = x.shape[:2]
        g = self.num_groups
        # (N, G, C/G, L): statistics over dims (2, 3); per-channel affine broadcasts on dim 2.
        xv = x.reshape(n, g, c // g, -1)
        w = self.weight.view(1, g, c // g, 1) if self.weight is not None else None
        b = self.bias.view(1, g, c // g, 1) if self.bias is not None else None
        y, _ = normalize_affine(xv, w, b, (2, 3), threshold=self.threshold, eps=self.eps,
                                gaussian_consistent=self.gaussian_consistent)
        return y.view(x.shape)


class FilteredLayerNorm(AffineMixin, nn.Module):
    r"""``torch.nn.LayerNorm`` with the robust filter: moments over the last dims, filtered.

    ``y = γ ⊙ (x − μ′)/sqrt(σ′² + ε) + β`` with μ′, σ′² the filtered moments (filtered-BN seed
    eq. 4–7) over the trailing ``normalized_shape`` dims; γ, β are elementwise like torch.
    ``threshold=None`` is exactly ``torch.nn.LayerNorm``. For conv feature maps with
    per-channel affine use ``FilteredGroupNorm(1, C)`` (registry name ``"ln"``).

    Args:
        normalized_shape, eps, elementwise_affine, bias, device, dtype: as torch.
        threshold, gaussian_consistent, gamma_init: as :class:`FilteredGroupNorm`.

    Example:
        >>> FilteredLayerNorm(512)(torch.randn(4, 10, 512)).shape
        torch.Size([4, 10, 512])
    """

    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, device=None, dtype=None,
                 *, threshold: float | None = 2.0, gaussian_consistent: bool = False,
                 gamma_init: float = 1.0) -> None:
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(check_positive_int("normalized_shape", int(s))
                                      for s in normalized_shape)
        if not self.normalized_shape:
            raise ValueError("normalized_shape must name at least one dimension, got ()")
        self.eps = check_eps(eps)
        self.elementwise_affine = bool(elementwise_affine)
        self.threshold = check_threshold(threshold)
        self.gaussian_consistent = check_gaussian_consistent(gaussian_consistent, self.threshold)
        self._make_affine(self.normalized_shape, elementwise_affine, gamma_init, bias=bias,
                          device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._reset_affine()

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}, threshold={self.threshold}")

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"FilteredLayerNorm expects a torch.Tensor, got {type(x).__name__}")
        k = len(self.normalized_shape)
        if tuple(x.shape[-k:]) != self.normalized_shape or x.dim() < k:
            raise ValueError(
                f"FilteredLayerNorm expects input whose last dims are {self.normalized_shape}, "
                f"got shape {tuple(x.shape)}"
            )
        if self.threshold is None:
            return TF.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        d = math.prod(self.normalized_shape)
        xv = x.reshape(-1, d)
        w = self.weight.reshape(1, d) if self.weight is not None else None
        b = self.bias.reshape(1, d) if self.bias is not None else None
        y, _ = normalize_affine(xv, w, b, (1,), threshold=self.threshold, eps=self.eps,
                                gaussian_consistent=self.gaussian_consistent)
        return y.view(x.shape)


class _FilteredInstanceNorm(ChannelStatsNorm):
    r"""``torch.nn.InstanceNorm*d`` with the robust filter: moments per sample and channel.

    Statistics over the spatial positions of one sample and channel, filtered as in the
    filtered-BN seed eq. 4–7. Signature and defaults follow torch (``affine=False``,
    ``track_running_stats=False``). With ``track_running_stats=True`` the running mean
    (variance) is the running average of the batch mean of the per-instance (unbiased)
    moments, as torch does, and eval mode uses them. ``threshold=None`` is exactly torch's.
    """

    _allowed_dims: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = False, track_running_stats: bool = False, device=None,
                 dtype=None, *, threshold: float | None = 2.0, gaussian_consistent: bool = False,
                 gamma_init: float = 1.0) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         threshold=threshold, gaussian_consistent=gaussian_consistent,
                         gamma_init=gamma_init)

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, self._allowed_dims, self.num_features,
                    channel_dim=0 if x.dim() == self._allowed_dims[0] else 1)
        unbatched = x.dim() == self._allowed_dims[0]
        if unbatched:
            x = x.unsqueeze(0)
        use_input_stats = self.training or not self.track_running_stats
        factor = self._averaging_factor()
        if self.threshold is None or not use_input_stats:
            y = TF.instance_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                 use_input_stats, factor, self.eps)
        else:
            n, c = x.shape[:2]
            xv = x.reshape(n, c, -1)
            w = self.weight.view(1, c, 1) if self.weight is not None else None
            b = self.bias.view(1, c, 1) if self.bias is not None else None
            y, stats = normalize_affine(xv, w, b, (2,), threshold=self.threshold, eps=self.eps,
                                        gaussian_consistent=self.gaussian_consistent)
            y = y.view(x.shape)
            if self.track_running_stats:
                with torch.no_grad():
                    count = stats.count.to(stats.var.dtype)
                    unbiased = stats.var * count / (count - 1).clamp_min(1)
                    self.running_mean.lerp_(stats.mean.mean(0).reshape(-1).to(self.running_mean.dtype), factor)
                    self.running_var.lerp_(unbiased.mean(0).reshape(-1).to(self.running_var.dtype), factor)
        return y.squeeze(0) if unbatched else y


class FilteredInstanceNorm1d(_FilteredInstanceNorm):
    __doc__ = _FilteredInstanceNorm.__doc__ + "\n    Shape: ``(N, C, L)`` or ``(C, L)``.\n"
    _allowed_dims = (2, 3)


class FilteredInstanceNorm2d(_FilteredInstanceNorm):
    __doc__ = _FilteredInstanceNorm.__doc__ + "\n    Shape: ``(N, C, H, W)`` or ``(C, H, W)``.\n"
    _allowed_dims = (3, 4)


class FilteredInstanceNorm3d(_FilteredInstanceNorm):
    __doc__ = _FilteredInstanceNorm.__doc__ + "\n    Shape: ``(N, C, D, H, W)`` or ``(C, D, H, W)``.\n"
    _allowed_dims = (4, 5)
