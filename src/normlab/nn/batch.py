"""Batch-dependent normalizations: filtered batch norm and batch renormalization.

Both keep torch's buffer and parameter names (``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``), so ``torch.nn.BatchNorm*d`` checkpoints load both
ways, and both use exactly ``torch.nn.functional.batch_norm`` in eval mode: inference
costs what BN costs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import functional as F
from ..kernels import NormSpec, Reduction, RunningStats, normalize, update_running_stats
from .activation import kernel_activation
from ._common import (
    ChannelStatsNorm,
    batch_running,
    check_bool,
    check_input,
    check_not_exporting_training,
    check_values,
)

__all__ = [
    "FilteredBatchNorm1d",
    "FilteredBatchNorm2d",
    "FilteredBatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
]

# calls kept as nodes by torch.fx.symbolic_trace (see normlab.nn._common)
for _name in ("check_input", "check_values", "batch_running", "normalize",
              "renorm_correction"):
    fx.wrap(_name)


def _then(act: nn.Module | None, y: Tensor) -> Tensor:
    """``act(y)``, or ``y`` without an activation."""
    return y if act is None else act(y)


def flat_view(x: Tensor) -> Tensor:
    """``(N, C, *)`` → ``(N, C, L)``: a view for contiguous and channels_last inputs.

    Written without ``reshape(…, -1)``, which cannot infer ``L`` for a zero-size batch.
    """
    return x.unsqueeze(-1).flatten(2)


class _BatchStatsNorm(ChannelStatsNorm):
    """Shared state of the batch-statistics norms (signature of ``torch.nn.BatchNorm2d``).

    Not a ``torch.nn.modules.batchnorm._BatchNorm`` by itself: the layers whose eval forward
    is BN's (``F.batch_norm`` with ``weight``/``bias`` and the running statistics) add
    ``_BatchNorm`` to their bases; the revisiting-BN alternatives, whose ``weight``/``bias``
    mean something else, do not (docs/ARCHITECTURE.md).
    """

    _allowed_dims: tuple[int, ...] = ()

    # -- helpers ---------------------------------------------------------------------
    def _check(self, x: Tensor) -> None:
        """Input checks as torch BN: rank and channels; one value per channel in training."""
        name = type(self).__name__
        check_input(name, x, self._allowed_dims, self.num_features)
        check_not_exporting_training(name, self.training and self.track_running_stats)
        if self._uses_batch_stats():
            check_values(name, x, "batch")

    def _check_input_dim(self, input: Tensor) -> None:  # torch's hook, same rule
        check_input(self, input, self._allowed_dims, None)

    def _uses_batch_stats(self) -> bool:
        """torch's rule: batch statistics in training, and in eval without running stats."""
        return self.training or (self.running_mean is None and self.running_var is None)

    def _eval_forward(self, x: Tensor, weight: Tensor | None = None,
                      bias: Tensor | None = None) -> Tensor:
        """``weight · (x − running mean)/sqrt(running var + ε) + bias`` (BN's eval)."""
        return TF.batch_norm(x, self.running_mean, self.running_var, weight, bias, False, 0.0,
                             self.eps)

    def _bn_forward(self, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                    act: nn.Module | None = None) -> Tensor:
        """BN with the tail ``(weight, bias)``, then ``act``: the running statistics when
        :meth:`_uses_batch_stats` is false; else the batch moments (filtered with a threshold),
        updating the running averages."""
        if not self._uses_batch_stats():
            return _then(act, self._eval_forward(x, weight, bias))
        factor = self._averaging_factor(x)
        if self.threshold is None:
            mean, var = self._tracked()
            return _then(act, TF.batch_norm(x, mean, var, weight, bias, True, factor, self.eps))
        return self._normalize_batch(x, weight, bias, factor, act)

    def _normalize_batch(self, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                         factor: float, act: nn.Module | None = None) -> Tensor:
        """``act(weight · x̂ + bias)`` with the (filtered) batch moments per channel; updates
        the running averages with ``factor``. ``act`` runs inside the kernel call when the
        kernels compute it (:func:`~normlab.nn.activation.kernel_activation`), else after."""
        fused = kernel_activation(act)
        activation, tau, kappa = fused or kernel_activation(None)
        y, _ = normalize(
            x, weight, bias,
            NormSpec(Reduction.CHANNEL, self.threshold, eps=self.eps,
                     gaussian_consistent=self.gaussian_consistent, activation=activation),
            tau=tau, kappa=kappa, running=self._running(factor, x))
        return y if fused is not None else act(y)

    def _tracked(self) -> tuple[Tensor | None, Tensor | None]:
        """The running buffers to update now (torch: only when training and tracking)."""
        if self.training and self.track_running_stats:
            return self.running_mean, self.running_var
        return None, None

    @torch.no_grad()
    def _update_running_stats(self, stats: F.Moments, factor: float) -> None:
        """``running ← (1 − a) running + a · batch``, variance unbiased over the kept count M."""
        if not self.track_running_stats:
            return
        update_running_stats(RunningStats(self.running_mean, self.running_var, factor), stats)

    def _running(self, factor: float, x: Tensor | None = None) -> RunningStats | None:
        """The running averages for the kernels to update (fused where they can)."""
        mean, var = self._tracked()
        if mean is None:
            return None
        return RunningStats(mean, var, factor) if x is None else batch_running(mean, var, factor, x)


class _FilteredBatchNorm(_BatchStatsNorm, _BatchNorm):
    r"""Filtered batch normalization ([HA20] eq. 4–8).

    Training: per channel, plain moments μ, σ² over ``(N, *spatial)``; mask
    ``f = [|x − μ| / sqrt(σ² + ε) ≤ T]``; filtered moments
    ``μ′ = Σ f x / M``, ``σ′² = Σ f (x − μ′)² / M`` with ``M = Σ f`` (eq. 6–7); then **every**
    value is normalized, ``y = γ (x − μ′) / sqrt(σ′² + ε) + β`` (eq. 8). Running stats take
    μ′ and the unbiased ``σ′² · M / (M − 1)``. Eval: the running stats, exactly as
    ``torch.nn.BatchNorm*d``. ``threshold=None`` (or ``inf``) *is* ``torch.nn.BatchNorm*d``.
    The class is a ``torch.nn.BatchNorm*d`` subclass, so torch's tools that look for batch
    norms by type (``torch.optim.swa_utils.update_bn``, ...) find it (docs/ecosystem.md).

    A channel whose filter would keep nothing (only possible for T < 1) uses its plain
    moments. With ``gaussian_consistent=True`` the filtered variance is divided by
    κ(T) = 1 − 2Tφ(T)/(2Φ(T) − 1) so that clean Gaussian input gets BN's statistics.

    Args:
        num_features: channels ``C``.
        eps, momentum, affine, track_running_stats, device, dtype, bias: as
            ``torch.nn.BatchNorm2d`` (``momentum=None``: cumulative average; ``bias=False``:
            no β, keyword-only as in torch).
        threshold: ``T_σ`` in standard deviations (keyword-only; default 2, [HA20]'s usual
            value); ``None`` disables filtering.
        gaussian_consistent: divide the filtered variance by κ(T) (default off = the paper).
        gamma_init: initial γ ([DF21] §3.2 suggests values below 1).

    Example:
        >>> norm = FilteredBatchNorm2d(64, threshold=3.0)
        >>> y = norm(torch.randn(8, 64, 16, 16))
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, bias: bool = True, threshold: float | None = 2.0,
                 gaussian_consistent: bool = False, gamma_init: float = 1.0) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, threshold=threshold, gaussian_consistent=gaussian_consistent,
                         gamma_init=gamma_init)

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        return self._bn_forward(x, self.weight, self.bias)

    def forward_with_activation(self, x: Tensor, act: nn.Module | None) -> Tensor:
        """``act(self(x))``, with ``act`` (``nn.ReLU``, TLU, affine TLU) fused into the kernel
        call where batch statistics are filtered (what :class:`NormActivation` calls).
        A subclass with a forward of its own (``SyncFilteredBatchNorm``) keeps it: its
        forward, then ``act``."""
        if type(self).forward is not _FilteredBatchNorm.forward:
            return _then(act, self.forward(x))
        self._check(x)
        return self._bn_forward(x, self.weight, self.bias, act)


class FilteredBatchNorm1d(_FilteredBatchNorm, nn.BatchNorm1d):
    __doc__ = _FilteredBatchNorm.__doc__.replace("2d(64", "1d(64").replace(
        "randn(8, 64, 16, 16)", "randn(8, 64)") + "\n    Shape: ``(N, C)`` or ``(N, C, L)``.\n"
    _allowed_dims = (2, 3)


class FilteredBatchNorm2d(_FilteredBatchNorm, nn.BatchNorm2d):
    __doc__ = _FilteredBatchNorm.__doc__ + "\n    Shape: ``(N, C, H, W)``.\n"
    _allowed_dims = (4,)


class FilteredBatchNorm3d(_FilteredBatchNorm, nn.BatchNorm3d):
    __doc__ = _FilteredBatchNorm.__doc__.replace("2d(64", "3d(64").replace(
        "randn(8, 64, 16, 16)", "randn(8, 64, 4, 8, 8)") + "\n    Shape: ``(N, C, D, H, W)``.\n"
    _allowed_dims = (5,)


def renorm_limits(step: int | Tensor, r_max: float, d_max: float, renorm_start: int,
                  r_max_full_at: int, d_max_full_at: int
                  ) -> tuple[float | Tensor, float | Tensor]:
    """(r_max, d_max) at training step ``step`` of batch renorm's warm-up (Ioffe 2017 §3).

    1 and 0 (plain BN) up to ``renorm_start``, then linear to the final values at
    ``r_max_full_at`` / ``d_max_full_at``. ``step`` may be the ``num_batches_tracked``
    tensor: the limits are then float64 tensors (no host sync, so ``torch.compile`` keeps
    one graph).
    """
    def ramp(full_at: int) -> float | Tensor:
        if isinstance(step, Tensor):
            if full_at <= renorm_start:
                return (step > renorm_start).to(torch.float64)
            return ((step.to(torch.float64) - renorm_start) / (full_at - renorm_start)).clamp(0, 1)
        if step <= renorm_start:
            return 0.0
        if full_at <= renorm_start:
            return 1.0
        return min(1.0, (step - renorm_start) / (full_at - renorm_start))

    return 1.0 + (r_max - 1.0) * ramp(r_max_full_at), d_max * ramp(d_max_full_at)


def renorm_factors(batch_mean: Tensor, batch_var: Tensor, running_mean: Tensor,
                   running_var: Tensor, eps: float, r_max: float, d_max: float
                   ) -> tuple[Tensor, Tensor]:
    """Ioffe 2017 eq. (r, d): ``r = clip(σ_B/σ, 1/r_max, r_max)``, ``d = clip((μ_B − μ)/σ, ±d_max)``.

    ``σ_B = sqrt(σ²_B + ε)`` from the batch, ``σ = sqrt(running_var + ε)``; shapes ``(C,)``.
    """
    sigma_batch = (batch_var + eps).sqrt()
    sigma_run = (running_var.to(sigma_batch.dtype) + eps).sqrt()
    r = (sigma_batch / sigma_run).clamp(1.0 / r_max, r_max)
    d = ((batch_mean - running_mean.to(sigma_batch.dtype)) / sigma_run).clamp(-d_max, d_max)
    return r, d


@torch.no_grad()
def renorm_correction(xv: Tensor, running_mean: Tensor, running_var: Tensor,
                      num_batches_tracked: Tensor, schedule: tuple[float, float, int, int, int],
                      threshold: float | None, eps: float, gaussian_consistent: bool
                      ) -> tuple[Tensor, Tensor]:
    """Batch renorm's (r, d) for the ``(N, C, L)`` batch ``xv`` at the current step.

    ``schedule``: ``(r_max, d_max, renorm_start, r_max_full_at, d_max_full_at)``. A batch with
    no values gets r = 1, d = 0 (it has no statistics; its output is empty anyway).
    """
    if xv.numel() == 0:
        ones = torch.ones(xv.shape[1], dtype=F.stats_dtype(xv.dtype), device=xv.device)
        return ones, torch.zeros_like(ones)
    batch = F.filtered_moments(xv, (0, 2), threshold, eps=eps,
                               gaussian_consistent=gaussian_consistent)
    r_max, d_max = (t.to(batch.var.dtype) for t in renorm_limits(num_batches_tracked, *schedule))
    return renorm_factors(batch.mean.reshape(-1), batch.var.reshape(-1), running_mean,
                          running_var, eps, r_max, d_max)


class _BatchRenorm(_BatchStatsNorm, _BatchNorm):
    r"""Batch renormalization (Ioffe 2017), optionally with the filtered-BN robust filter.

    Training: batch moments μ_B, σ_B = sqrt(σ²_B + ε) (filtered when ``threshold`` is set), and
    ``r = clip(σ_B / σ, 1/r_max, r_max)``, ``d = clip((μ_B − μ) / σ, −d_max, d_max)`` from the
    running ``μ``, ``σ = sqrt(running_var + ε)``; then
    ``y = γ ((x − μ_B) / σ_B · r + d) + β`` with r and d treated as constants for the
    gradient. Eval: the running stats, exactly like BN. A ``torch.nn.BatchNorm*d`` subclass,
    as :class:`FilteredBatchNorm2d`.

    Warm-up (the paper's schedule): ``r_max`` stays 1 and ``d_max`` 0 (plain BN) for
    ``renorm_start`` steps, then grow linearly to their final values at ``r_max_full_at`` and
    ``d_max_full_at`` steps (counted by ``num_batches_tracked``; defaults 5k, 40k, 25k).

    Args:
        num_features, eps, momentum, affine, device, dtype, bias: as ``torch.nn.BatchNorm2d``;
            running statistics are required (``track_running_stats=True``).
        r_max, d_max: final clipping limits (defaults 3 and 5).
        renorm_start, r_max_full_at, d_max_full_at: warm-up schedule in training steps.
        threshold, gaussian_consistent, gamma_init: as :class:`FilteredBatchNorm2d`
            (default ``threshold=None``: plain batch renorm).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.01,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, bias: bool = True, r_max: float = 3.0, d_max: float = 5.0,
                 renorm_start: int = 5000, r_max_full_at: int = 40000,
                 d_max_full_at: int = 25000, threshold: float | None = None,
                 gaussian_consistent: bool = False, gamma_init: float = 1.0) -> None:
        if not check_bool("track_running_stats", track_running_stats):
            raise ValueError(
                "BatchRenorm needs running statistics (r and d are computed from them), got "
                f"track_running_stats={track_running_stats!r}; use FilteredBatchNorm with "
                "threshold=None instead"
            )
        for name, value, low in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
                raise ValueError(f"{name} must be a number >= {low}, got {value!r}")
        for name, value in (("renorm_start", renorm_start), ("r_max_full_at", r_max_full_at),
                            ("d_max_full_at", d_max_full_at)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (training steps), got {value!r}")
        if r_max_full_at < renorm_start or d_max_full_at < renorm_start:
            raise ValueError(
                f"r_max_full_at ({r_max_full_at}) and d_max_full_at ({d_max_full_at}) must be "
                f">= renorm_start ({renorm_start})"
            )
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, threshold=threshold, gaussian_consistent=gaussian_consistent,
                         gamma_init=gamma_init)
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.renorm_start = renorm_start
        self.r_max_full_at, self.d_max_full_at = r_max_full_at, d_max_full_at

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}, "
                f"renorm_start={self.renorm_start}")

    def _schedule(self) -> tuple[float, float, int, int, int]:
        return (self.r_max, self.d_max, self.renorm_start, self.r_max_full_at,
                self.d_max_full_at)

    def current_limits(self) -> tuple[float, float]:
        """(r_max, d_max) in force at the current step of the warm-up schedule."""
        return renorm_limits(int(self.num_batches_tracked), *self._schedule())

    def _check(self, x: Tensor) -> None:
        if self.running_mean is None or self.running_var is None:
            raise ValueError(
                f"{type(self).__name__} has no running statistics (track_running_stats="
                f"{self.track_running_stats}; e.g. after torch.func."
                f"replace_all_batch_norm_modules_): batch renorm computes r and d from them. "
                f"Use FilteredBatchNorm with threshold=None for batch-statistics-only BN"
            )
        super()._check(x)

    def forward(self, x: Tensor) -> Tensor:
        return self._renorm_forward(x, None)

    def forward_with_activation(self, x: Tensor, act: nn.Module | None) -> Tensor:
        """``act(self(x))``, with ``act`` (``nn.ReLU``, TLU, affine TLU) fused into the kernel
        call in training (what :class:`NormActivation` calls). A subclass with a forward of
        its own (``SyncBatchRenorm``) keeps it: its forward, then ``act``."""
        if type(self).forward is not _BatchRenorm.forward:
            return _then(act, self.forward(x))
        return self._renorm_forward(x, act)

    def _renorm_forward(self, x: Tensor, act: nn.Module | None) -> Tensor:
        self._check(x)
        if not self.training:
            return _then(act, self._eval_forward(x, self.weight, self.bias))
        factor = self._averaging_factor(x)
        xv = flat_view(x)
        r, d = renorm_correction(xv, self.running_mean, self.running_var,
                                 self.num_batches_tracked, self._schedule(), self.threshold,
                                 self.eps, self.gaussian_consistent)
        weight = self.weight if self.weight is not None else torch.ones_like(r)
        bias = self.bias if self.bias is not None else torch.zeros_like(r)
        weight_eff = weight * r.to(weight.dtype)
        bias_eff = bias + weight * d.to(weight.dtype)
        return self._normalize_batch(x, weight_eff, bias_eff, factor, act)


class BatchRenorm1d(_BatchRenorm, nn.BatchNorm1d):
    __doc__ = _BatchRenorm.__doc__ + "\n    Shape: ``(N, C)`` or ``(N, C, L)``.\n"
    _allowed_dims = (2, 3)


class BatchRenorm2d(_BatchRenorm, nn.BatchNorm2d):
    __doc__ = _BatchRenorm.__doc__ + "\n    Shape: ``(N, C, H, W)``.\n"
    _allowed_dims = (4,)


class BatchRenorm3d(_BatchRenorm, nn.BatchNorm3d):
    __doc__ = _BatchRenorm.__doc__ + "\n    Shape: ``(N, C, D, H, W)``.\n"
    _allowed_dims = (5,)
