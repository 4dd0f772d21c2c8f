"""One description of a normalization call: :class:`NormSpec`.

Every normlab layer computes ``z = act(γ · (x − μ′) / sqrt(σ′² + ε) + β)`` with (filtered)
statistics over a set of values ([HA20] eq. 4–8, [SK20] eq. 1–3). A module
describes its call once — which sets, the robust filter, centering, ε, the activation —
and hands that description with ``x`` as ``(N, C, *)`` to
:func:`normlab.kernels.normalize`. Nothing below the modules re-classifies shapes.

* ``Reduction.CHANNEL`` (batch norm): one set per channel over ``N`` and the positions;
  parameters are ``(C,)`` vectors.
* ``Reduction.ROWS`` (group/layer/instance norm, the FRN family): one set per sample and
  group of ``C/G`` channels (``groups = G``) over those channels and the positions;
  parameters are ``(C,)`` vectors (GN: ``G`` groups; IN and FRN: ``G = C``; LN over the last
  ``D`` values: ``x`` as ``(P, D)`` with ``G = 1``).

Inside the kernel core ``x`` is read as ``(N, C, L)`` or ``(N, G, C/G, L)`` (the *canonical
view*, :attr:`NormSpec.dims` are its reduced axes); for contiguous and channels_last
tensors that is a view, so ``torch.compile`` can hand the ops its own memory format.

Not to be confused with the registry's spec *strings* (``"fbn:threshold=2"``), which name
layers; a :class:`NormSpec` describes one call of a layer's kernel.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from .. import functional as F

__all__ = ["NormSpec", "Reduction", "Activation", "NO_FILTER"]

NO_FILTER = math.inf  # the one representation of "no robust filter": every value is kept


class Reduction(enum.Enum):
    """Which values form one set of statistics (see the module docstring for the views)."""

    CHANNEL = "channel"  # per channel over the batch: batch norm, x (N, C, L)
    ROWS = "rows"        # per sample and group: GN/LN/IN/FRN, x (N, G, Cg, L)


class Activation(enum.IntEnum):
    """The activation fused after the affine step ([SK20] eq. 3 and Table 5)."""

    NONE = 0
    RELU = 1        # max(y, 0)
    TLU = 2         # max(y, τ)
    AFFINE_TLU = 3  # max(y, κ y + τ)

    @classmethod
    def parse(cls, name: "str | Activation | None") -> "Activation":
        """``"none"``/``None``, ``"relu"``, ``"tlu"``, ``"affine_tlu"`` (or a member)."""
        if isinstance(name, cls):
            return name
        key = "none" if name is None else name
        try:
            return cls[key.upper()] if isinstance(key, str) else cls(key)
        except (KeyError, ValueError):
            names = tuple(m.name.lower() for m in cls)
            raise ValueError(f"activation must be one of {names}, got {name!r}") from None

    @property
    def label(self) -> str:
        return self.name.lower()


#: the C and Triton kernels' ``act`` argument per activation label: 0 none, 1 ``max(y, τ)``
#: (ReLU is TLU with τ = 0), 2 ``max(y, κy + τ)``
KERNEL_ACT_CODES = {"none": 0, "tlu": 1, "relu": 1, "affine_tlu": 2}


@dataclass(frozen=True, slots=True)
class NormSpec:
    """``z = act(γ · normalize(x) + β)`` with the statistics this spec names.

    Args:
        reduction: :class:`Reduction` — per channel over the batch, or per sample rows.
        threshold: robust filter ``T`` ([HA20] eq. 5: keep ``|x − μ|/sqrt(σ² + ε) ≤ T``);
            :data:`NO_FILTER` (``math.inf``) keeps every value. ``None`` is accepted at
            construction and stored as ``math.inf``, so there is one "no filter".
        centered: subtract the mean (BN/GN/LN/IN) or not (FRN: ν² = mean(x²)).
        eps: the constant ε (a module's learnable ε is passed to the call as a tensor).
        gaussian_consistent: divide the filtered variance by κ(T)
            (:func:`normlab.functional.truncated_normal_variance_factor`).
        activation: :class:`Activation` applied after the affine step.
        groups: ``G`` for :attr:`Reduction.ROWS` (it must divide ``C``); ignored for batch norm.
    """

    reduction: Reduction
    threshold: float = NO_FILTER
    centered: bool = True
    eps: float = 1e-5
    gaussian_consistent: bool = False
    activation: Activation = Activation.NONE
    groups: int = 1

    def __post_init__(self) -> None:
        # every call builds one: the common case (float threshold and eps, Activation
        # member) only compares
        if type(self.reduction) is not Reduction:
            raise TypeError(f"reduction must be a Reduction, got {self.reduction!r}")
        threshold, eps = self.threshold, self.eps
        if type(threshold) is not float:
            threshold = NO_FILTER if threshold is None else float(threshold)
            object.__setattr__(self, "threshold", threshold)
        if not threshold > 0:  # also rejects NaN
            raise ValueError(f"threshold must be > 0 (or None/math.inf for no filter), got "
                             f"{self.threshold!r}")
        if type(eps) is not float:
            eps = float(eps)
            object.__setattr__(self, "eps", eps)
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps!r}")
        if type(self.activation) is not Activation:
            object.__setattr__(self, "activation", Activation.parse(self.activation))
        if type(self.groups) is not int or self.groups < 1:
            raise ValueError(f"groups must be a positive int, got {self.groups!r}")

    @property
    def filtered(self) -> bool:
        """Whether the robust filter is on (``threshold`` finite)."""
        return self.threshold != NO_FILTER

    @property
    def optional_threshold(self) -> float | None:
        """``threshold``, or ``None`` without a filter (the functional core's convention)."""
        return self.threshold if self.filtered else None

    @property
    def variance_factor(self) -> float:
        """κ(T) for Gaussian-consistent filtered variances, else 1."""
        return F.variance_factor(self.optional_threshold, self.gaussian_consistent)

    @property
    def dims(self) -> tuple[int, ...]:
        """The reduced axes of the canonical view: ``(N, C, L)`` or ``(N, G, C/G, L)``."""
        return (0, 2) if self.reduction is Reduction.CHANNEL else (2, 3)
