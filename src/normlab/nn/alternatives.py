"""Alternative BN scale formulations compared by [DF21] (§4.4, §4.5).

All keep BN's head — per-channel (optionally filtered) batch moments, running averages,
``x̂ = (x − μ) / sqrt(σ² + ε)`` — and change only the tail (the affine transformation):

================  =========================================  ==================================
name              tail                                       initialization [DF21]
================  =========================================  ==================================
A1 (eq. 26)       ``y = γ (x̂ + β)``                          γ = ``gamma_init``, β = 0
A2 (eq. 27)       ``y = γ (γ₀ x̂ + β)``                       γ = ``gamma_init``, γ₀ = 1, β = 0
RBN (eq. 28–29)   ``y = γ S x̂ + β``, S = sigmoid(w_v·GAP(x̂) + w_b)  γ=1, β=0, w_v=0, w_b=1
RBN⁻              ``S = sigmoid(w_b)``                        w_b = 1  (S ≈ 0.731)
IEBN (eq. 28–29)  ``y = γ S x̂ + β``, S = sigmoid(w_v·GAP(x) + w_b)   γ=1, β=0, w_v=0, w_b=−1
IEBN⁻             ``S = sigmoid(w_b)``                        w_b = −1 (S ≈ 0.269)
================  =========================================  ==================================

γ₀ is a second learnable per-channel scale ([DF21]: "A2 includes the extra γ₀ parameter",
initialized to 1). GAP is the global average over the positions of one sample and channel,
so for RBN/IEBN the scale S is per sample and channel; w_v and w_b are per channel. RBN's
GAP is taken of the normalized features x̂, IEBN's of the raw input x ([DF21] §4.5). In eval
mode x̂ uses the running statistics, as BN does.

Every class shares :class:`normlab.FilteredBatchNorm2d`'s machinery, so ``threshold``
(the filtered-BN robust filter), ``gaussian_consistent``, ``momentum=None`` and the
``state_dict`` names (``weight``, ``bias``, ``running_mean``, ...) behave as there. A1, A2,
RBN⁻ and IEBN⁻ are per-channel affine maps in eval mode (:meth:`inference_affine`) and fold
into a preceding convolution; RBN and IEBN are not (S depends on the sample).
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from ._common import channel_view
from .batch import _BatchStatsNorm, flat_view

__all__ = [
    "AltScaleBatchNorm1d",
    "AltScaleBatchNorm2d",
    "AltScaleBatchNorm3d",
    "ScaleCalibratedBatchNorm1d",
    "ScaleCalibratedBatchNorm2d",
    "ScaleCalibratedBatchNorm3d",
]

_FORMS = ("a1", "a2")
_SOURCES = ("normalized", "input", None)


class _TailBatchNorm(_BatchStatsNorm):
    """BN whose per-channel tail is ``effective_affine()`` instead of ``(weight, bias)``.

    Not a ``torch.nn.modules.batchnorm._BatchNorm``: torch's tools read ``weight``/``bias`` as
    BN's tail (``fuse_conv_bn_eval``, timm's ``FrozenBatchNorm2d``), which these are not.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, threshold: float | None = None, gaussian_consistent: bool = False,
                 gamma_init: float = 1.0) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=True, threshold=threshold, gaussian_consistent=gaussian_consistent,
                         gamma_init=gamma_init)

    def effective_affine(self) -> tuple[Tensor | None, Tensor | None]:
        """Per-channel ``(w, b)`` with ``y = w·x̂ + b``; ``None`` entries mean 1 / 0."""
        raise NotImplementedError

    def _affine_forward(self, x: Tensor) -> Tensor:
        """Same head as :class:`FilteredBatchNorm2d` with the effective tail."""
        w, b = self.effective_affine()
        return self._bn_forward(x, w, b)

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        return self._affine_forward(x)

    @torch.no_grad()
    def inference_affine(self) -> tuple[Tensor, Tensor] | None:
        """``(scale, shift)`` per channel, float64, with ``eval_output = scale·x + shift``.

        ``None`` when eval mode is not a fixed affine map (no running stats, or instance
        statistics as in RBN/IEBN).
        """
        from ..taxonomy import eval_affine  # lazy: taxonomy imports this module

        return eval_affine(self)


class _AltScaleBatchNorm(_TailBatchNorm):
    r"""BN with the alternative scale formulations A1 or A2 of [DF21] (eq. 26–27, §4.4).

    ``form="a1"``: ``y = γ (x̂ + β)`` — no extra parameters.
    ``form="a2"``: ``y = γ (γ₀ x̂ + β)`` — extra per-channel parameter ``gamma0`` (γ₀, init 1).

    Computed as BN with effective weight ``γ`` (A1) or ``γ γ₀`` (A2) and effective bias
    ``γ β``, so gradients reach γ, γ₀ and β by autograd and eval mode is a fixed affine map.

    From a standard BN (``y = γ_BN x̂ + β_BN``), :func:`normlab.convert` copies γ and the
    running statistics, leaves γ₀ = 1, and sets ``β = β_BN / γ_BN`` (a copied β would act as
    ``γ β_BN`` here), so the converted layer computes the BN's output; channels with
    ``γ_BN = 0 ≠ β_BN`` cannot be expressed (β = 0 there, reported).

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as
            ``torch.nn.BatchNorm2d``.
        form: ``"a1"`` or ``"a2"`` (keyword-only).
        gamma_init: initial γ ([DF21] uses 0 < γ ≤ 1).
        threshold, gaussian_consistent: the filtered-BN robust filter (default off).

    Example:
        >>> AltScaleBatchNorm2d(16, form="a2", gamma_init=0.1)(torch.randn(4, 16, 8, 8)).shape
        torch.Size([4, 16, 8, 8])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, form: str = "a1", threshold: float | None = None,
                 gaussian_consistent: bool = False, gamma_init: float = 1.0) -> None:
        if form not in _FORMS:
            raise ValueError(f"form must be 'a1' (y = γ(x̂ + β)) or 'a2' (y = γ(γ₀x̂ + β)), "
                             f"got {form!r}")
        if not affine:
            raise ValueError(f"the A1/A2 formulations need affine=True (got affine={affine!r}); "
                             f"without γ and β they are plain normalization")
        self.form = form
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         threshold=threshold, gaussian_consistent=gaussian_consistent,
                         gamma_init=gamma_init)
        if form == "a2":
            self.gamma0 = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("gamma0", None)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "gamma0", None) is not None:
            nn.init.ones_(self.gamma0)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", form={self.form!r}"

    def effective_affine(self) -> tuple[Tensor, Tensor]:
        w = self.weight if self.gamma0 is None else self.weight * self.gamma0
        return w, self.weight * self.bias


class _ScaleCalibratedBatchNorm(_TailBatchNorm):
    r"""BN with the RBN / IEBN extra scale S ([DF21] eq. 28–29, §4.5).

    ``y = γ · S · x̂ + β`` with
    ``S = sigmoid(w_v · GAP(𝒳) + w_b)`` per sample and channel, where ``𝒳 = x̂`` for RBN
    (``stats="normalized"``) and ``𝒳 = x`` for IEBN (``stats="input"``); with ``stats=None``
    (RBN⁻ / IEBN⁻) ``S = sigmoid(w_b)`` per channel. w_v is the parameter ``calib_weight``
    (init ``wv_init`` = 0), w_b is ``calib_bias`` (init ``wb_init``: +1 for RBN, −1 for IEBN).
    Only the scaling part of RBN/IEBN is implemented, as [DF21] compares (no RBN
    centering calibration).

    From a standard BN (``y = γ_BN x̂ + β_BN``), :func:`normlab.convert` copies β and the
    running statistics, leaves w_v, w_b at their init, and sets ``γ = γ_BN / sigmoid(w_b)``
    (a copied γ would give the effective scale ``γ_BN · S``, 0.731·γ_BN for RBN): with
    w_v = 0, S = sigmoid(w_b) for every sample, so the converted layer computes the BN's
    output. :func:`normlab.init_norm_` afterwards gives the initialization of [DF21] instead.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as
            ``torch.nn.BatchNorm2d``.
        stats: ``"normalized"`` (RBN), ``"input"`` (IEBN) or ``None`` (the ⁻ variants).
        wb_init: initial w_b (RBN 1.0, IEBN −1.0). wv_init: initial w_v (0).
        gamma_init: initial γ (1 in the baselines of [DF21]).
        threshold, gaussian_consistent: the filtered-BN robust filter (default off).

    Example:
        >>> rbn = ScaleCalibratedBatchNorm2d(16, stats="normalized", wb_init=1.0)
        >>> iebn_minus = ScaleCalibratedBatchNorm2d(16, stats=None, wb_init=-1.0)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, stats: str | None = "normalized", wb_init: float = 1.0, wv_init: float = 0.0,
                 threshold: float | None = None, gaussian_consistent: bool = False,
                 gamma_init: float = 1.0) -> None:
        if stats not in _SOURCES:
            raise ValueError(f"stats must be 'normalized' (RBN), 'input' (IEBN) or None "
                             f"(RBN-/IEBN-), got {stats!r}")
        for name, value in (("wb_init", wb_init), ("wv_init", wv_init)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r}")
        self.stats = stats
        self.wb_init, self.wv_init = float(wb_init), float(wv_init)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         threshold=threshold, gaussian_consistent=gaussian_consistent,
                         gamma_init=gamma_init)
        factory = {"device": device, "dtype": dtype}
        self.calib_bias = nn.Parameter(torch.full((num_features,), self.wb_init, **factory))
        if stats is None:
            self.register_parameter("calib_weight", None)
        else:
            self.calib_weight = nn.Parameter(torch.full((num_features,), self.wv_init, **factory))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "calib_bias", None) is not None:
            nn.init.constant_(self.calib_bias, self.wb_init)
        if getattr(self, "calib_weight", None) is not None:
            nn.init.constant_(self.calib_weight, self.wv_init)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", stats={self.stats!r}"

    def effective_affine(self) -> tuple[Tensor, Tensor | None]:
        """Only for ``stats=None``: ``(γ·sigmoid(w_b), β)``."""
        if self.stats is not None:
            raise RuntimeError("effective_affine() exists only for stats=None (RBN-/IEBN-): "
                               "with instance statistics S depends on the sample")
        s = torch.sigmoid(self.calib_bias)
        return (s if self.weight is None else self.weight * s), self.bias

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        if self.stats is None:
            return self._affine_forward(x)
        xv = flat_view(x)
        if self._uses_batch_stats():
            xhat = self._normalize_batch(xv, None, None, self._averaging_factor(x))
        else:
            xhat = flat_view(TF.batch_norm(x, self.running_mean, self.running_var, None, None,
                                           False, 0.0, self.eps))  # keeps x's memory format
        source = xhat if self.stats == "normalized" else xv
        gap = source.mean(dim=2, keepdim=True)  # (N, C, 1): GAP per sample and channel
        s = torch.sigmoid(channel_view(self.calib_weight, 3) * gap
                          + channel_view(self.calib_bias, 3))
        scale = s if self.weight is None else s * channel_view(self.weight, 3)
        y = xhat * scale
        if self.bias is not None:
            y = y + channel_view(self.bias, 3)
        return y.view(x.shape)


class AltScaleBatchNorm1d(_AltScaleBatchNorm):
    __doc__ = _AltScaleBatchNorm.__doc__ + "\n    Shape: ``(N, C)`` or ``(N, C, L)``.\n"
    _allowed_dims = (2, 3)


class AltScaleBatchNorm2d(_AltScaleBatchNorm):
    __doc__ = _AltScaleBatchNorm.__doc__ + "\n    Shape: ``(N, C, H, W)``.\n"
    _allowed_dims = (4,)


class AltScaleBatchNorm3d(_AltScaleBatchNorm):
    __doc__ = _AltScaleBatchNorm.__doc__ + "\n    Shape: ``(N, C, D, H, W)``.\n"
    _allowed_dims = (5,)


class ScaleCalibratedBatchNorm1d(_ScaleCalibratedBatchNorm):
    __doc__ = _ScaleCalibratedBatchNorm.__doc__ + "\n    Shape: ``(N, C)`` or ``(N, C, L)``.\n"
    _allowed_dims = (2, 3)


class ScaleCalibratedBatchNorm2d(_ScaleCalibratedBatchNorm):
    __doc__ = _ScaleCalibratedBatchNorm.__doc__ + "\n    Shape: ``(N, C, H, W)``.\n"
    _allowed_dims = (4,)


class ScaleCalibratedBatchNorm3d(_ScaleCalibratedBatchNorm):
    __doc__ = _ScaleCalibratedBatchNorm.__doc__ + "\n    Shape: ``(N, C, D, H, W)``.\n"
    _allowed_dims = (5,)
