r"""One classification of normalization layers — torch's and normlab's — that every tool asks.

:func:`classify` maps a layer (or a layer class) to a :class:`NormKind`:

* ``family`` (:class:`Family`) — which statistics the layer normalizes with: ``batch``
  (one set per channel over the batch: BatchNorm*d, SyncBatchNorm, FilteredBatchNorm*,
  InputNorm, the revisiting-BN alternatives), ``renorm`` (batch renorm, [I17]), ``group``, ``layer``, ``instance``, ``frn`` (filter response norm and its
  group/layer forms, [SK20]) and ``rms``;
* ``tail`` (:class:`Tail`) — the formula from the normalized ``x̂`` to the output:
  ``standard`` ``γx̂ + β``, ``input`` ``γ̂x̂`` (InputNorm), ``alt_scale`` ``γ(γ₀x̂ + β)``
  (A1 without γ₀, A2 with it; [DF21] eq. 26–27), ``scaled`` ``γ·S·x̂ + β``
  (RBN/IEBN, [DF21] eq. 28–29);
* ``uses_batch_stats`` — training normalizes with statistics over the batch (so a batch of
  one value per channel cannot be normalized, and eval mode uses running averages);
* ``normlab`` — the class is (or extends) one of normlab's layers, else torch's (normlab's
  layers all share ``nn._common.AffineMixin``: γ/β, ``gamma_init``, the filter's options).

On top of it: :func:`affine_tail` (a layer's tail as one per-channel map ``w·x̂ + b``, with
where ``w`` and ``b`` come from) and :func:`eval_affine` (a layer's eval output as
``scale·x + shift``, or ``None`` when eval mode is not a fixed per-channel affine map).
The table :data:`_TABLE` is the one place a new layer class is classified (first match wins,
so subclasses come before their bases); ``optim``, ``convert``, ``fuse``, ``distributed``,
``precise_bn``, ``diagnostics`` and the registry's capabilities all read it.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .fold import eval_scale_shift
from .nn._common import AffineMixin
from .nn.alternatives import _AltScaleBatchNorm, _ScaleCalibratedBatchNorm
from .nn.batch import _BatchRenorm, _BatchStatsNorm
from .nn.input_norm import InputNorm
from .nn.response import GroupFilterResponseNorm

__all__ = ["Family", "Tail", "NormKind", "TailTerm", "classify", "is_norm", "uses_batch_stats",
           "affine_tail", "eval_affine", "scale_parameters", "NORM_TYPES"]


class Family(str, enum.Enum):
    """Which statistics a layer normalizes with (its value is the short name tools print)."""

    BATCH = "batch"
    RENORM = "renorm"
    GROUP = "group"
    LAYER = "layer"
    INSTANCE = "instance"
    FRN = "frn"
    RMS = "rms"

    @property
    def statistics(self) -> str:
        """The set the statistics (and running buffers) are over: batch renorm shares BN's."""
        return "batch" if self is Family.RENORM else self.value


class Tail(str, enum.Enum):
    """The formula from ``x̂`` to the output."""

    STANDARD = "standard"     # γ x̂ + β
    INPUT = "input"           # γ̂ x̂ (InputNorm: no shift)
    ALT_SCALE = "alt_scale"   # γ (γ₀ x̂ + β); A1 has no γ₀ (γ₀ = 1)
    SCALED = "scaled"         # γ S x̂ + β, S = sigmoid(w_v·GAP + w_b)


class NormKind(NamedTuple):
    family: Family
    tail: Tail
    normlab: bool

    @property
    def uses_batch_stats(self) -> bool:
        return self.family in (Family.BATCH, Family.RENORM)


_RMS = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()

#: ``(classes, family, tail)``; first match wins, so subclasses come before their bases.
_TABLE: tuple[tuple[tuple[type, ...], Family, Tail], ...] = (
    ((InputNorm,), Family.BATCH, Tail.INPUT),
    ((_AltScaleBatchNorm,), Family.BATCH, Tail.ALT_SCALE),
    ((_ScaleCalibratedBatchNorm,), Family.BATCH, Tail.SCALED),
    ((_BatchRenorm,), Family.RENORM, Tail.STANDARD),
    ((_BatchStatsNorm, _BatchNorm), Family.BATCH, Tail.STANDARD),   # + SyncBatchNorm, Lazy*
    ((GroupFilterResponseNorm,), Family.FRN, Tail.STANDARD),        # FRN*d, GFRN, LFRN
    ((nn.GroupNorm,), Family.GROUP, Tail.STANDARD),                 # + FilteredGroupNorm
    ((nn.LayerNorm,), Family.LAYER, Tail.STANDARD),                 # + FilteredLayerNorm
    (_RMS, Family.RMS, Tail.STANDARD),
    ((_InstanceNorm,), Family.INSTANCE, Tail.STANDARD),             # + FilteredInstanceNorm*
)

#: Every class :func:`classify` knows (subclasses included).
NORM_TYPES: tuple[type, ...] = tuple(t for types, _, _ in _TABLE for t in types)


def classify(layer: nn.Module | type) -> NormKind | None:
    """The :class:`NormKind` of a normalization layer or layer class, ``None`` for others."""
    cls = layer if isinstance(layer, type) else type(layer)
    for types, family, tail in _TABLE:
        if types and issubclass(cls, types):
            return NormKind(family, tail, issubclass(cls, AffineMixin))
    return None


def is_norm(layer: nn.Module | type) -> bool:
    """True for a normalization layer (class) of any supported type, torch's or normlab's."""
    return classify(layer) is not None


def uses_batch_stats(layer: nn.Module | type) -> bool:
    """True when training normalizes ``layer`` with statistics over the batch."""
    kind = classify(layer)
    return kind is not None and kind.uses_batch_stats


class TailTerm(NamedTuple):
    """One coefficient of a per-channel tail ``y = w·x̂ + b``.

    ``value``: float64 per channel, or ``None`` for "no such parameter" (1 for ``w``, 0 for
    ``b``); ``formula``: how it is computed from the layer's tensors (``"weight * gamma0"``);
    ``sources``: the names of those tensors.
    """

    value: Tensor | None
    formula: str
    sources: tuple[str, ...]


def _param64(module: nn.Module, name: str) -> Tensor | None:
    t = getattr(module, name, None)
    return t.detach().to(torch.float64) if isinstance(t, Tensor) else None


def affine_tail(module: nn.Module, tail: Tail | None = None) -> tuple[TailTerm, TailTerm] | str:
    """``(w, b)`` with ``y = w·x̂ + b`` per channel (float64), or why there is none.

    ``tail`` defaults to the layer's own (:func:`classify`); pass it to read a layer class
    the taxonomy does not know (``Tail.STANDARD``: ``weight``/``bias`` as γ, β).

    * ``standard`` ``γx̂ + β``: ``w = γ``, ``b = β``; ``input`` ``γ̂x̂``: ``w = γ̂``, ``b = 0``;
    * ``alt_scale`` ``γ(γ₀x̂ + β)``: ``w = γγ₀`` (A1: ``γ``), ``b = γβ``;
    * ``scaled`` ``γSx̂ + β``: ``w = γ·sigmoid(w_b)``, ``b = β`` — only while ``S`` does not
      depend on the sample (RBN⁻/IEBN⁻, or ``w_v = 0``); otherwise the reason (a string).
    """
    if tail is None:
        kind = classify(module)
        if kind is None:
            raise TypeError(f"{type(module).__name__} is not a normalization layer normlab "
                            f"knows; pass its tail (e.g. Tail.STANDARD)")
        tail = kind.tail
    w, b = _param64(module, "weight"), _param64(module, "bias")
    one, zero = TailTerm(None, "1", ()), TailTerm(None, "0", ())
    if tail is Tail.STANDARD:
        return (TailTerm(w, "weight", ("weight",)) if w is not None else one,
                TailTerm(b, "bias", ("bias",)) if b is not None else zero)
    if tail is Tail.INPUT:
        return TailTerm(w, "weight", ("weight",)), zero
    if tail is Tail.ALT_SCALE:
        gamma0 = _param64(module, "gamma0")
        scale = TailTerm(w, "weight", ("weight",)) if gamma0 is None else TailTerm(
            w * gamma0, "weight * gamma0", ("weight", "gamma0"))
        return scale, TailTerm(w * b, "weight * bias", ("weight", "bias"))
    calib_weight = getattr(module, "calib_weight", None)
    if calib_weight is not None and bool((calib_weight != 0).any()):
        return ("its scale S = sigmoid(w_v·GAP + w_b) depends on the sample (w_v ≠ 0), so no "
                "per-channel γ, β can stand for it")
    s = torch.sigmoid(_param64(module, "calib_bias"))
    scale = TailTerm(s * w, "weight * sigmoid(calib_bias)", ("weight", "calib_bias")) \
        if w is not None else TailTerm(s, "sigmoid(calib_bias)", ("calib_bias",))
    return scale, TailTerm(b, "bias", ("bias",)) if b is not None else zero


def eval_affine(module: nn.Module) -> tuple[Tensor, Tensor] | None:
    """Per-channel ``(scale, shift)`` (float64) with ``eval_output = scale·x + shift``, else None.

    Batch-statistics layers that keep running statistics, evaluated with them
    (:func:`normlab.fold.eval_scale_shift` over their :func:`affine_tail`). ``None`` for
    per-sample norms, layers without running statistics, and RBN/IEBN whose scale ``S`` is
    computed from each sample (``stats`` set: sample-dependent by construction).
    """
    kind = classify(module)
    if kind is None or not kind.uses_batch_stats:
        return None
    if getattr(module, "running_mean", None) is None or not module.track_running_stats:
        return None
    if kind.tail is Tail.SCALED and module.stats is not None:
        return None
    tail = affine_tail(module)
    if isinstance(tail, str):
        return None
    (w, _, _), (b, _, _) = tail
    return eval_scale_shift(module.running_mean, module.running_var, module.eps, w, b)


def scale_parameters(module: nn.Module) -> list[Tensor]:
    """The normalization scales γ of a norm layer: ``weight`` (and A2's ``gamma0``)."""
    scales = [module.weight] if isinstance(getattr(module, "weight", None), Tensor) else []
    kind = classify(module)
    if kind is not None and kind.tail is Tail.ALT_SCALE and module.gamma0 is not None:
        scales.append(module.gamma0)
    return scales
