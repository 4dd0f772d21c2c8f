"""Filter response normalization (FRN) and its group/layer forms, with TLU.

[SK20] eq. 1–3: ``ν² = mean(x²)`` over the positions of one sample and channel,
``x̂ = x / sqrt(ν² + ε)``, ``y = γ x̂ + β``, ``z = max(y, τ)``. GFRN and LFRN ([SK20] Table 3)
take ν² over a group of channels or all channels of a sample.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx, nn

from ..kernels import NormSpec, Reduction, normalize
from ._common import (
    AffineMixin,
    check_bool,
    check_eps,
    check_gamma_init,
    check_gaussian_consistent,
    check_input,
    check_positive_int,
    check_threshold,
)
from .activation import ACTIVATIONS

__all__ = [
    "GroupFilterResponseNorm",
    "LayerFilterResponseNorm",
    "FilterResponseNorm1d",
    "FilterResponseNorm2d",
    "FilterResponseNorm3d",
]

LEARNED_EPS_INIT = 1e-4  # [SK20] §3.3: ε_l initialized at 1e-4

# calls kept as nodes by torch.fx.symbolic_trace (see normlab.nn._common)
for _name in ("check_input", "normalize"):
    fx.wrap(_name)


class GroupFilterResponseNorm(AffineMixin, nn.Module):
    r"""Uncentered normalization over groups of channels, then affine and TLU (GFRN).

    For each sample and group ``S`` (``C/G`` channels × all positions)::

        ν² = 1/|S| Σ_S x²                  ([SK20] eq. 1; filtered: Σ f x² / Σ f with
        x̂ = x / sqrt(ν² + ε)                 f = [|x| / sqrt(ν² + ε) ≤ T])
        y = γ_c x̂ + β_c                    (eq. 2)
        z = max(y, τ_c)                     (eq. 3, activation="tlu")

    ``num_groups = C`` is FRN, ``num_groups = 1`` is LFRN. With ``learnable_eps=True``,
    ``ε = eps + |ε_l|`` with the parameter ``learned_eps`` (ε_l) initialized to 1e-4
    ([SK20] §3.3); otherwise ε is the constant ``eps`` ([SK20]'s default 1e-6).

    Args:
        num_groups, num_channels: as ``torch.nn.GroupNorm``.
        eps: constant ε (default 1e-6).
        learnable_eps: learn ε as above (then ``eps`` may be 0; otherwise it must be > 0).
        activation: ``"tlu"`` (default, parameter ``tau``), ``"affine_tlu"`` (``kappa``,
            ``tau``: ``max(y, κy + τ)``), ``"relu"`` or ``"none"``.
        affine: learn γ (``weight``) and β (``bias``); ``bias=False``: no β (as torch's norms).
        threshold: robust filter on ``|x| / ν`` (default ``None``: the paper's FRN).
        gaussian_consistent: divide the filtered ν′² by κ(T) (exact for zero-mean Gaussians).
        gamma_init: initial γ.

    Shape: ``(N, C, *)``.
    """

    _allowed_dims: tuple[int, ...] = tuple(range(2, 9))

    def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-6,
                 learnable_eps: bool = False, activation: str | None = "tlu",
                 affine: bool = True, bias: bool = True, threshold: float | None = None,
                 gaussian_consistent: bool = False, gamma_init: float = 1.0,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.num_groups = check_positive_int("num_groups", num_groups)
        self.num_channels = check_positive_int("num_channels", num_channels)
        if num_channels % num_groups:
            raise ValueError(
                f"num_groups ({num_groups}) must divide num_channels ({num_channels})"
            )
        self.learnable_eps = check_bool("learnable_eps", learnable_eps)
        self.eps = check_eps(eps, allow_zero=self.learnable_eps)
        if activation is None:
            activation = "none"
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.affine = check_bool("affine", affine)
        self.threshold = check_threshold(threshold)
        self.gaussian_consistent = check_gaussian_consistent(gaussian_consistent)
        self.gamma_init = check_gamma_init(gamma_init)
        factory = {"device": device, "dtype": dtype}
        self._make_affine(num_channels, self.affine, check_bool("bias", bias), **factory)
        if self.learnable_eps:
            self.learned_eps = nn.Parameter(torch.full((), LEARNED_EPS_INIT, **factory))
        else:
            self.register_parameter("learned_eps", None)
        self.kappa = nn.Parameter(torch.zeros(num_channels, **factory)) if activation == "affine_tlu" else None
        self.tau = (nn.Parameter(torch.zeros(num_channels, **factory))
                    if activation in ("tlu", "affine_tlu") else None)
        self.reset_parameters()

    @property
    def num_features(self) -> int:
        return self.num_channels

    def reset_parameters(self) -> None:
        self._reset_affine()
        if self.learned_eps is not None:
            nn.init.constant_(self.learned_eps, LEARNED_EPS_INIT)
        if self.kappa is not None:
            nn.init.zeros_(self.kappa)
        if self.tau is not None:
            nn.init.zeros_(self.tau)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, "
                f"learnable_eps={self.learnable_eps}, activation={self.activation!r}, "
                f"affine={self.affine}, bias={self.bias is not None}, "
                f"threshold={self.threshold}")

    def effective_eps(self) -> Tensor | float:
        """``ε = eps + |ε_l|`` (learnable) or ``eps`` ([SK20] §3.3)."""
        if self.learned_eps is None:
            return self.eps
        return self.eps + self.learned_eps.abs()

    def forward(self, x: Tensor) -> Tensor:
        check_input(type(self).__name__, x, self._allowed_dims, self.num_channels)
        # per sample and group, uncentered; normalize + affine + activation in one fused call
        y, _ = normalize(
            x, self.weight, self.bias,
            NormSpec(Reduction.ROWS, self.threshold, centered=False, eps=self.eps,
                     gaussian_consistent=self.gaussian_consistent, activation=self.activation,
                     groups=self.num_groups),
            eps_extra=self.learned_eps.abs() if self.learned_eps is not None else None,
            tau=self.tau, kappa=self.kappa)
        return y


class LayerFilterResponseNorm(GroupFilterResponseNorm):
    """LFRN: uncentered layer norm (ν² over all channels and positions of a sample) + TLU.

    Same options as :class:`GroupFilterResponseNorm` with ``num_groups=1`` ([SK20] Table 3).
    """

    def __init__(self, num_channels: int, **kwargs) -> None:
        super().__init__(1, num_channels, **kwargs)


class _FilterResponseNorm(GroupFilterResponseNorm):
    r"""Filter response normalization with TLU ([SK20] eq. 1–3).

    Per sample and channel: ``ν² = mean(x²)`` over positions, ``x̂ = x / sqrt(ν² + ε)``,
    ``y = γ x̂ + β``, ``z = max(y, τ)``. For ``(N, C)`` input (a fully connected layer) the
    set has one value (``N = 1`` in [SK20] §3.3): use ``learnable_eps=True`` there, as
    [SK20] advises. Parameters ``weight``, ``bias``, ``tau`` match timm's
    ``FilterResponseNormTlu2d``, whose checkpoints load directly.

    Args:
        num_features: channels ``C``. Keyword-only: ``eps`` (1e-6), ``learnable_eps``,
            ``activation``, ``affine``, ``threshold``, ``gaussian_consistent``, ``gamma_init``,
            ``device``, ``dtype`` as in :class:`GroupFilterResponseNorm`.

    Example:
        >>> FilterResponseNorm2d(64)(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
    """

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(check_positive_int("num_features", num_features), num_features, **kwargs)

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, eps={self.eps}, learnable_eps={self.learnable_eps}, "
                f"activation={self.activation!r}, affine={self.affine}, "
                f"bias={self.bias is not None}, threshold={self.threshold}")


class FilterResponseNorm1d(_FilterResponseNorm):
    __doc__ = _FilterResponseNorm.__doc__ + "\n    Shape: ``(N, C)`` or ``(N, C, L)``.\n"
    _allowed_dims = (2, 3)


class FilterResponseNorm2d(_FilterResponseNorm):
    __doc__ = _FilterResponseNorm.__doc__ + "\n    Shape: ``(N, C, H, W)``.\n"
    _allowed_dims = (4,)


class FilterResponseNorm3d(_FilterResponseNorm):
    __doc__ = _FilterResponseNorm.__doc__ + "\n    Shape: ``(N, C, D, H, W)``.\n"
    _allowed_dims = (5,)
