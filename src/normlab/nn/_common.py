"""Argument checks, the torch base classes' glue, and the trace-safe helpers of the modules.

Every normlab layer that extends a torch layer subclasses it (``FilteredBatchNorm2d`` is a
``torch.nn.BatchNorm2d``, ``FilteredGroupNorm`` a ``torch.nn.GroupNorm``, ...): torch's
constructor creates the parameters and buffers (``bias=``, ``device=``, ``dtype=``), and
torch's ``_NormBase`` keeps the state-dict rules (version 2, old checkpoints without
``num_batches_tracked``, the meta device with ``load_state_dict(assign=True)``). See
docs/ARCHITECTURE.md, "normlab layers are torch layers".

The module-level functions below that take tensors (``check_input``, ``check_values``,
``advance_running_average``, ``batch_running``) are what a forward calls around the kernel.
Each module file registers them with ``torch.fx.wrap``, so ``torch.fx.symbolic_trace`` keeps
them as calls in the graph — the checks and the buffer updates then run when the traced
graph runs, instead of failing on (or being frozen into the graph from) FX proxies. They
take names and numbers, never a module, because an FX graph cannot hold a module argument.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _NormBase

from ..kernels import RunningStats, exporting_to_onnx



# -- constructor arguments ------------------------------------------------------------------

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


def check_bool(name: str, value: Any) -> bool:
    """``True``/``False`` (or 0/1, as torch code often passes); anything else is an error."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_eps(eps: Any, *, allow_zero: bool = False) -> float:
    """ε > 0 (``allow_zero``: ≥ 0, for FRN's learned ε that is added to it).

    torch raises for ``eps <= 0`` only in a batch norm's training forward and accepts it in
    GN/LN/IN, which then return NaN on a constant set; normlab refuses it at construction.
    """
    ok = (not isinstance(eps, bool) and isinstance(eps, (int, float)) and math.isfinite(eps)
          and (eps > 0 or (allow_zero and eps == 0)))
    if not ok:
        bound = ">= 0" if allow_zero else "positive (> 0)"
        raise ValueError(
            f"eps must be {bound} and finite, got {eps!r}; it keeps 1/sqrt(var + eps) finite "
            f"on a constant set — use e.g. eps=1e-5"
        )
    return float(eps)


def check_momentum(momentum: Any) -> float | None:
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) \
            or not 0 <= momentum <= 1:
        raise ValueError(
            f"momentum must be in [0, 1] or None (cumulative average), got {momentum!r}"
        )
    return float(momentum)


def check_gaussian_consistent(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"gaussian_consistent must be True or False, got {value!r}")
    return value


def check_gamma_init(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"gamma_init must be a finite number, got {value!r}")
    return float(value)


# -- forward helpers (registered with torch.fx.wrap by the module files) ----------------------

def check_input(module: nn.Module | str, x: Any, allowed_dims: tuple[int, ...],
                channels: int | None, channel_dim: int = 1) -> None:
    """Raise a clear error for a wrong type, rank or channel count.

    ``module``: the module or its class name (the name, inside traced graphs).
    """
    name = module if isinstance(module, str) else type(module).__name__
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
    if not x.is_floating_point():
        raise TypeError(f"{name} expects a floating-point tensor, got dtype {x.dtype}")


def check_not_exporting_training(name: str, updates_running_stats: bool) -> None:
    """ONNX records an inference graph, which cannot update running statistics: a layer
    that would (training mode, running statistics tracked) refuses ``torch.onnx.export``
    instead of exporting something else (torch's BatchNorm exports its eval arithmetic)."""
    if updates_running_stats and exporting_to_onnx():
        raise ValueError(
            f"{name} is in training mode while torch.onnx.export records it: an ONNX graph is "
            f"for inference and cannot update running statistics; call model.eval() before "
            f"exporting (running statistics are then used, as in PyTorch's eval mode)"
        )


def check_values(name: str, x: Tensor, kind: str, groups: int = 1) -> None:
    """torch's rule: a statistic over exactly one value is refused (zero values are fine).

    ``kind``: ``"batch"`` (per channel over ``(N, *spatial)``, torch BN's check),
    ``"instance"`` (per sample and channel over the spatial dims, torch IN's) or ``"group"``
    (torch GN's check: ``N · C/G · spatial == 1``).
    """
    spatial = 1
    for size in x.shape[2:]:
        spatial *= size
    if kind == "batch":
        count, what = x.shape[0] * spatial, "value per channel when training"
    elif kind == "instance":
        count, what = spatial, "spatial element when training"
    else:
        count, what = x.shape[0] * (x.shape[1] // groups) * spatial, "value per group"
    if count == 1:
        raise ValueError(
            f"{name}: expected more than 1 {what}, got input of shape {tuple(x.shape)} (one "
            f"value normalizes to 0); use larger inputs, eval() mode with running "
            f"statistics, or another norm"
        )


def advance_running_average(num_batches_tracked: Tensor, momentum: float | None,
                            x: Tensor) -> float:
    """Count one training batch and return the running-average factor, exactly as torch BN.

    ``momentum=None``: the cumulative average, factor ``1 / num_batches_tracked``. ``x``, the
    batch, is not read: it makes the call a node of an FX trace (``torch.fx.wrap`` records
    a call only when an argument is a proxy — a buffer is not).
    """
    num_batches_tracked.add_(1)
    if momentum is None:
        return 1.0 / float(num_batches_tracked)
    return momentum


def batch_running(running_mean: Tensor | None, running_var: Tensor | None, factor: float,
                  x: Tensor) -> RunningStats | None:
    """The running averages the kernel should update, or ``None``.

    ``None`` without running statistics, and for a batch with no values: torch BN then
    leaves the running statistics as they are (only ``num_batches_tracked`` advances).
    """
    if running_mean is None or x.numel() == 0:
        return None
    return RunningStats(running_mean, running_var, factor)


def channel_view(param: Tensor | None, ndim: int, channel_dim: int = 1) -> Tensor | None:
    """View a per-channel parameter ``(C,)`` to broadcast against an ``ndim`` tensor."""
    if param is None:
        return None
    shape = [1] * ndim
    shape[channel_dim] = -1
    return param.view(shape)


# -- base classes -------------------------------------------------------------------------

class AffineMixin:
    """γ initialized to ``gamma_init`` (torch: 1) and β to 0, for layers built on torch's."""

    gamma_init: float = 1.0

    def _reset_affine(self) -> None:
        if self.weight is not None:
            nn.init.constant_(self.weight, self.gamma_init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _make_affine(self, shape, affine: bool, bias: bool, device=None, dtype=None) -> None:
        """``weight``/``bias`` for the layers without a torch base class (FRN)."""
        factory = {"device": device, "dtype": dtype}
        self.register_parameter(
            "weight", nn.Parameter(torch.empty(shape, **factory)) if affine else None)
        self.register_parameter(
            "bias", nn.Parameter(torch.empty(shape, **factory)) if affine and bias else None)


class ChannelStatsNorm(AffineMixin, _NormBase):
    """torch's ``_NormBase`` (BN, IN) with normlab's checks, ``gamma_init`` and the filter.

    torch creates ``weight``/``bias`` and the ``running_mean``, ``running_var``,
    ``num_batches_tracked`` buffers, and loads old state dicts (version 1 or none: no
    ``num_batches_tracked``, filled with 0). Subclasses put the torch class (``_BatchNorm``,
    ``_InstanceNorm`` or their per-dim forms) after this one in their bases.
    """

    def __init__(self, num_features: int, eps: float, momentum: float | None, affine: bool,
                 track_running_stats: bool, device, dtype, *, bias: bool,
                 threshold: float | None, gaussian_consistent: bool, gamma_init: float) -> None:
        check_positive_int("num_features", num_features)
        eps = check_eps(eps)
        momentum = check_momentum(momentum)
        affine = check_bool("affine", affine)
        track_running_stats = check_bool("track_running_stats", track_running_stats)
        bias = check_bool("bias", bias)
        # read by reset_parameters(), which torch's constructor calls
        self.gamma_init = check_gamma_init(gamma_init)
        self.threshold = check_threshold(threshold)
        self.gaussian_consistent = check_gaussian_consistent(gaussian_consistent)
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device, dtype, bias=bias)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        self._reset_affine()

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", threshold={self.threshold}"
        if self.gaussian_consistent:
            text += ", gaussian_consistent=True"
        if self.gamma_init != 1.0:
            text += f", gamma_init={self.gamma_init}"
        return text

    def _averaging_factor(self, x: Tensor | None = None) -> float:
        """Advance ``num_batches_tracked`` and return the running-average factor (as torch).

        Pass the batch ``x`` so that FX traces keep the count (see
        :func:`advance_running_average`).
        """
        if not (self.training and self.track_running_stats):
            return 0.0
        return advance_running_average(self.num_batches_tracked, self.momentum, x)


# the methods above call these helpers through this module's globals
for _name in ("check_input", "check_values", "advance_running_average", "batch_running"):
    fx.wrap(_name)
