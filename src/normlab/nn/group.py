"""Per-sample centered normalizations with the optional robust filter: group, layer, instance.

Filtered GN is named in [HA20] (§IV.D: "our filtering method can be applied
with group normalization after element selection"); layer and instance norm are the same
pipeline with other reduction sets. ``threshold=None`` calls torch's own functional op, so
it equals ``torch.nn.GroupNorm`` / ``LayerNorm`` / ``InstanceNorm*d`` exactly.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor, fx, nn

from ..kernels import NormSpec, Reduction, normalize
from ._common import (
    AffineMixin,
    ChannelStatsNorm,
    channel_view,
    check_bool,
    check_eps,
    check_gamma_init,
    check_gaussian_consistent,
    check_input,
    check_not_exporting_training,
    check_positive_int,
    check_threshold,
    check_values,
)

__all__ = [
    "FilteredGroupNorm",
    "FilteredLayerNorm",
    "FilteredInstanceNorm1d",
    "FilteredInstanceNorm2d",
    "FilteredInstanceNorm3d",
]

# calls kept as nodes by torch.fx.symbolic_trace (see normlab.nn._common)
for _name in ("check_input", "check_values", "normalize", "check_trailing_shape",
              "check_instance_channels", "update_instance_running_stats"):
    fx.wrap(_name)


def check_trailing_shape(name: str, x: Tensor, normalized_shape: tuple[int, ...]) -> None:
    """LayerNorm's input check: the last dims of ``x`` are ``normalized_shape``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    k = len(normalized_shape)
    if x.dim() < k or tuple(x.shape[-k:]) != normalized_shape:
        raise ValueError(
            f"{name} expects input whose last dims are {normalized_shape}, got shape "
            f"{tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} expects a floating-point tensor, got dtype {x.dtype}")


def check_instance_channels(name: str, x: Tensor, num_features: int, channel_dim: int,
                            strict: bool) -> None:
    """torch InstanceNorm's rule: a channel count that differs from ``num_features`` is an
    error when the layer has per-channel state (``strict``), otherwise a warning."""
    if x.shape[channel_dim] == num_features:
        return
    if strict:
        raise ValueError(
            f"{name} was built for {num_features} channels but the input has "
            f"{x.shape[channel_dim]} at dim {channel_dim} (shape {tuple(x.shape)}); build it "
            f"with num_features={x.shape[channel_dim]}"
        )
    warnings.warn(
        f"{name}: input's size at dim={channel_dim} does not match num_features "
        f"({num_features}); it is not used because affine=False and "
        f"track_running_stats=False", stacklevel=3)


@torch.no_grad()
def update_instance_running_stats(running_mean: Tensor, running_var: Tensor, stats,
                                  factor: float, x: Tensor) -> None:
    """torch InstanceNorm's running averages: batch mean of the per-instance mean and of the
    per-instance unbiased variance (here over the kept count M: ``σ′² M/(M − 1)``)."""
    if x.numel() == 0:  # a zero-size batch has no statistics: torch leaves them
        return
    count = stats.count.to(stats.var.dtype)
    unbiased = stats.var * count / (count - 1).clamp_min(1)
    running_mean.lerp_(stats.mean.mean(0).reshape(-1).to(running_mean.dtype), factor)
    running_var.lerp_(unbiased.mean(0).reshape(-1).to(running_var.dtype), factor)


class FilteredGroupNorm(AffineMixin, nn.GroupNorm):
    r"""Group normalization whose moments ignore values beyond ±T standard deviations.

    For each sample and group ``S`` of ``C/G`` channels × all positions: plain moments μ, σ²;
    mask ``f = [|x − μ| / sqrt(σ² + ε) ≤ T]``; ``μ′ = Σ f x / M``, ``σ′² = Σ f (x − μ′)² / M``
    ([HA20] eq. 4–7 applied to GN's set, §IV.D); ``y = γ_c (x − μ′)/sqrt(σ′² + ε) + β_c``.
    ``threshold=None`` is exactly ``torch.nn.GroupNorm`` (and the class is one);
    ``num_groups=1`` is layer norm over ``(C, *)`` with per-channel affine, ``num_groups=C``
    instance norm.

    Args:
        num_groups: groups ``G`` (must divide ``num_channels``).
        num_channels, eps, affine, device, dtype, bias: as ``torch.nn.GroupNorm``.
        threshold: ``T`` in standard deviations (default 2); ``None`` disables filtering.
        gaussian_consistent: divide the filtered variance by κ(T).
        gamma_init: initial γ.

    Shape: ``(N, C, *)``.

    Example:
        >>> FilteredGroupNorm(8, 64, threshold=3.0)(torch.randn(2, 64, 16, 16)).shape
        torch.Size([2, 64, 16, 16])
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, bias: bool = True, threshold: float | None = 2.0,
                 gaussian_consistent: bool = False, gamma_init: float = 1.0) -> None:
        check_positive_int("num_groups", num_groups)
        check_positive_int("num_channels", num_channels)
        if num_channels % num_groups:
            raise ValueError(
                f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups}); "
                f"valid group counts: "
                f"{[g for g in range(1, num_channels + 1) if num_channels % g == 0]}"
            )
        self.gamma_init = check_gamma_init(gamma_init)  # read by reset_parameters()
        self.threshold = check_threshold(threshold)
        self.gaussian_consistent = check_gaussian_consistent(gaussian_consistent)
        super().__init__(num_groups, num_channels, check_eps(eps), check_bool("affine", affine),
                         device, dtype, bias=check_bool("bias", bias))

    def reset_parameters(self) -> None:
        self._reset_affine()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", threshold={self.threshold}"

    def forward(self, x: Tensor) -> Tensor:
        name = type(self).__name__
        check_input(name, x, tuple(range(2, 9)), self.num_channels)
        if self.threshold is None:
            return TF.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        check_values(name, x, "group", self.num_groups)
        # statistics per sample and group of C/G channels, per-channel affine
        y, _ = normalize(x, self.weight, self.bias,
                         NormSpec(Reduction.ROWS, self.threshold, eps=self.eps,
                                  gaussian_consistent=self.gaussian_consistent,
                                  groups=self.num_groups))
        return y


class FilteredLayerNorm(AffineMixin, nn.LayerNorm):
    r"""``torch.nn.LayerNorm`` with the robust filter: moments over the last dims, filtered.

    ``y = γ ⊙ (x − μ′)/sqrt(σ′² + ε) + β`` with μ′, σ′² the filtered moments ([HA20]
    eq. 4–7) over the trailing ``normalized_shape`` dims; γ, β are elementwise like torch.
    ``threshold=None`` is exactly ``torch.nn.LayerNorm`` (and the class is one). For conv
    feature maps with per-channel affine use ``FilteredGroupNorm(1, C)`` (registry name
    ``"ln"``).

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
        shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) \
            else normalized_shape
        shape = tuple(check_positive_int("normalized_shape", int(s))
                      if isinstance(s, numbers.Integral) and not isinstance(s, bool)
                      else check_positive_int("normalized_shape", s) for s in shape)
        if not shape:
            raise ValueError("normalized_shape must name at least one dimension, got ()")
        self.gamma_init = check_gamma_init(gamma_init)  # read by reset_parameters()
        self.threshold = check_threshold(threshold)
        self.gaussian_consistent = check_gaussian_consistent(gaussian_consistent)
        super().__init__(shape, check_eps(eps), check_bool("elementwise_affine", elementwise_affine),
                         check_bool("bias", bias), device, dtype)

    def reset_parameters(self) -> None:
        self._reset_affine()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", threshold={self.threshold}"

    def forward(self, x: Tensor) -> Tensor:
        check_trailing_shape(type(self).__name__, x, self.normalized_shape)
        if self.threshold is None:
            return TF.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        d = math.prod(self.normalized_shape)
        # (P, D) with one group: one set per position, elementwise affine over D
        y, _ = normalize(x.reshape(-1, d),
                         self.weight.reshape(d) if self.weight is not None else None,
                         self.bias.reshape(d) if self.bias is not None else None,
                         NormSpec(Reduction.ROWS, self.threshold, eps=self.eps,
                                  gaussian_consistent=self.gaussian_consistent))
        return y.view(x.shape)


class _FilteredInstanceNorm(ChannelStatsNorm, nn.modules.instancenorm._InstanceNorm):
    r"""``torch.nn.InstanceNorm*d`` with the robust filter: moments per sample and channel.

    Statistics over the spatial positions of one sample and channel, filtered as in the
    [HA20] eq. 4–7. Signature, defaults and state rules follow torch
    (``affine=False``, ``track_running_stats=False``; the class is a
    ``torch.nn.InstanceNorm*d``). With ``track_running_stats=True`` the running mean
    (variance) is the running average of the batch mean of the per-instance (unbiased)
    moments, as torch does, and eval mode uses them; as in torch, ``num_batches_tracked``
    stays 0 and ``momentum=None`` leaves the running statistics unchanged.
    ``threshold=None`` is exactly torch's.
    """

    _allowed_dims: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = False, track_running_stats: bool = False, device=None,
                 dtype=None, *, bias: bool = True, threshold: float | None = 2.0,
                 gaussian_consistent: bool = False, gamma_init: float = 1.0) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, threshold=threshold, gaussian_consistent=gaussian_consistent,
                         gamma_init=gamma_init)

    def forward(self, x: Tensor) -> Tensor:
        name = type(self).__name__
        unbatched_dim, batched_dim = self._allowed_dims
        if isinstance(x, Tensor):  # an FX proxy has no rank yet: traced graphs take batches
            unbatched = x.dim() == unbatched_dim
            check_input(name, x, self._allowed_dims, None)
        else:
            unbatched = False
            check_input(name, x, (batched_dim,), None)
        check_instance_channels(name, x, self.num_features, 0 if unbatched else 1,
                                self.affine or self.running_mean is not None)
        if unbatched:
            x = x.unsqueeze(0)
        use_input_stats = self.training or not self.track_running_stats
        check_not_exporting_training(name, self.training and self.running_mean is not None)
        factor = self.momentum if self.momentum is not None else 0.0  # torch's rule
        if use_input_stats:
            check_values(name, x, "instance")
        # torch's instance_norm raises IndexError on a batch of 0 samples; the kernel path
        # returns the empty output (docs/layers.md, differences from torch)
        empty = isinstance(x, Tensor) and x.shape[0] == 0
        if self.threshold is None and not empty:
            y = TF.instance_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                 use_input_stats, factor, self.eps)
        elif not use_input_stats:  # eval with running statistics: BN's per-channel map,
            # which is instance_norm's eval arithmetic and keeps channels_last
            y = TF.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                              False, 0.0, self.eps)
        else:
            # one set per sample and channel (C groups); stats come back (N, C)
            y, stats = normalize(x, self.weight, self.bias,
                                 NormSpec(Reduction.ROWS, self.threshold, eps=self.eps,
                                          gaussian_consistent=self.gaussian_consistent,
                                          groups=self.num_features))
            if self.running_mean is not None:
                update_instance_running_stats(self.running_mean, self.running_var, stats, factor,
                                              x)
        return y.squeeze(0) if unbatched else y


class FilteredInstanceNorm1d(_FilteredInstanceNorm, nn.InstanceNorm1d):
    __doc__ = _FilteredInstanceNorm.__doc__ + "\n    Shape: ``(N, C, L)`` or ``(C, L)``.\n"
    _allowed_dims = (2, 3)


class FilteredInstanceNorm2d(_FilteredInstanceNorm, nn.InstanceNorm2d):
    __doc__ = _FilteredInstanceNorm.__doc__ + "\n    Shape: ``(N, C, H, W)`` or ``(C, H, W)``.\n"
    _allowed_dims = (3, 4)


class FilteredInstanceNorm3d(_FilteredInstanceNorm, nn.InstanceNorm3d):
    __doc__ = _FilteredInstanceNorm.__doc__ + "\n    Shape: ``(N, C, D, H, W)`` or ``(C, D, H, W)``.\n"
    _allowed_dims = (4, 5)
