"""Names → normalization layers, and spec strings such as ``"fbn:threshold=2"``.

A *spec* is ``name`` or ``name:key=value,key=value``. Values are parsed as ``true``/``false``,
``none``, ints, floats, or left as strings. Every norm accepts ``act=`` (``tlu``,
``affine_tlu``, ``relu``, ``none``) to carry its own activation — TLU after *any*
normalization, as the ablation in [SK20] Table 3 does.

>>> create_norm("fbn:threshold=3", 64)          # FilteredBatchNorm2d(64, threshold=3.0)
>>> create_norm("gn:groups=8", 64)              # GroupNorm through normlab
>>> create_norm("bn", 128, dim=1)               # for (N, C) activations
>>> list_norms()                                # {"bn": "...", "fbn": "...", ...}

Extensions add names with :func:`register_norm`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .nn import (
    ACTIVATIONS,
    AltScaleBatchNorm1d,
    AltScaleBatchNorm2d,
    AltScaleBatchNorm3d,
    InputNorm,
    ScaleCalibratedBatchNorm1d,
    ScaleCalibratedBatchNorm2d,
    ScaleCalibratedBatchNorm3d,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    FilteredBatchNorm1d,
    FilteredBatchNorm2d,
    FilteredBatchNorm3d,
    FilteredGroupNorm,
    FilterResponseNorm1d,
    FilterResponseNorm2d,
    FilterResponseNorm3d,
    GroupFilterResponseNorm,
    NormActivation,
    make_activation,
)
from .taxonomy import NormKind, classify

__all__ = ["create_norm", "create_norm_act", "list_norms", "parse_spec", "register_norm",
           "spec_activation", "NormEntry", "norm_entry", "spec_kind", "uses_batch_stats",
           "signature_options"]


@dataclass(frozen=True)
class NormEntry:
    """One registry name: ``factory(num_channels, dim, **options) -> nn.Module``."""

    name: str
    factory: Callable[..., nn.Module]
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    own_activation: str | None = None  # activation the layer applies itself by default
    layer_type: type | None = None     # the class the factory builds (for images, dim=2)

    @property
    def kind(self) -> NormKind | None:
        """The layer's :class:`~normlab.taxonomy.NormKind` (``None``: not a normalization)."""
        layer_type = self.layer_type
        if layer_type is None:  # an extension registered without it: build one and look
            layer = self.factory(8, 2, **self.options)
            layer_type = type(layer.norm if isinstance(layer, NormActivation) else layer)
            object.__setattr__(self, "layer_type", layer_type)
        return classify(layer_type)

    @property
    def uses_batch_stats(self) -> bool:
        """Training normalizes with statistics over the batch (needs batches of 2 or more)."""
        kind = self.kind
        return kind is not None and kind.uses_batch_stats


_REGISTRY: dict[str, NormEntry] = {}


def register_norm(name: str, factory: Callable[..., nn.Module], *, description: str,
                  options: dict[str, Any] | None = None, own_activation: str | None = None,
                  layer_type: type | None = None, replace: bool = False) -> None:
    """Add ``name`` to the registry.

    Args:
        factory: called as ``factory(num_channels, dim, **options)``; ``dim`` is the number of
            spatial dims of the input (1 for ``(N, C)``/``(N, C, L)``, 2 for images, 3 for
            volumes).
        options: the accepted option names with their defaults (``act`` is added for all);
            :func:`signature_options` reads them from a layer class.
        own_activation: the activation the layer applies by itself (e.g. ``"tlu"`` for FRN).
        layer_type: the class ``factory`` builds, for the capabilities (:attr:`NormEntry.kind`,
            :func:`uses_batch_stats`); without it the first query builds one 8-channel layer.
    """
    if not isinstance(name, str) or not name or \
            not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"registry names are letters, digits, '-' and '_', got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"norm {name!r} is already registered; pass replace=True to override")
    if layer_type is not None and not (isinstance(layer_type, type)
                                       and issubclass(layer_type, nn.Module)):
        raise TypeError(f"layer_type must be an nn.Module class, got {layer_type!r}")
    _REGISTRY[name] = NormEntry(name, factory, description, dict(options or {}), own_activation,
                                layer_type)


def norm_entry(spec: str) -> NormEntry:
    """The :class:`NormEntry` a spec (``"fbn:threshold=3"``) or bare name refers to."""
    return _REGISTRY[parse_spec(spec)[0]]


def spec_kind(spec: str) -> NormKind | None:
    """The :class:`~normlab.taxonomy.NormKind` of the layer ``spec`` builds (``None``: none)."""
    return norm_entry(spec).kind


def uses_batch_stats(spec: str) -> bool:
    """True when the layer ``spec`` builds normalizes with batch statistics in training.

    ``"bn"``, ``"fbn"``, ``"brn"``, the revisiting-BN forms and ``"inputnorm"``: a training
    batch needs at least two values per channel. Asked of the taxonomy, so a registered
    extension answers too.
    """
    return norm_entry(spec).uses_batch_stats


def list_norms() -> dict[str, str]:
    """``{name: description}`` for every registered normalization."""
    return {name: entry.description for name, entry in sorted(_REGISTRY.items())}


_TRUE, _FALSE, _NONE = ("true", "yes", "on", "1"), ("false", "no", "off", "0"), ("none", "null")


def _parse_value(text: str, default: Any = None, *, key: str = "", spec: str = "") -> Any:
    """Parse one option value by the type of the option's default.

    Booleans accept true/false (yes/no, on/off, 1/0) and nothing else; numeric options
    accept numbers or ``none``; options whose default is ``None`` take ``none``, a number or
    a word (e.g. ``groups``, ``threshold`` of FRN).
    """
    value = text.strip()
    low = value.lower()
    where = f"option {key}={value!r} in spec {spec!r}" if spec else f"value {value!r}"
    if isinstance(default, bool):
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{where} is a boolean: use true or false")
    if low in _NONE:
        return None
    if isinstance(default, int) or isinstance(default, float) or default is None:
        for kind in ((int,) if isinstance(default, int) else (int, float)):
            try:
                number = kind(value)
            except ValueError:
                continue
            if number != number:  # NaN
                raise ValueError(f"{where} must be a number, not NaN")
            return number
        if default is not None:
            kind_name = "an integer" if isinstance(default, int) else "a number"
            raise ValueError(f"{where} must be {kind_name} (or none)")
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
    return value


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"name:key=value,..."`` into ``(name, {key: value})``, checking both."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a norm spec is a non-empty string like 'fbn:threshold=2', got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in _REGISTRY:
        raise ValueError(f"unknown norm {name!r} in spec {spec!r}; valid names: "
                         f"{', '.join(sorted(_REGISTRY))}")
    entry = _REGISTRY[name]
    valid = dict(entry.options, act=entry.own_activation)
    options: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"option {item!r} in spec {spec!r} needs the form key=value")
        if key not in valid:
            raise ValueError(f"unknown option {key!r} for norm {name!r} in spec {spec!r}; valid "
                             f"options: {', '.join(sorted(valid))}")
        options[key] = _parse_value(value, valid[key], key=key, spec=spec)
    act = options.get("act", entry.own_activation)
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r} in spec {spec!r}")
    return name, options


def spec_activation(spec: str) -> str | None:
    """The activation a spec's layer applies itself (``None`` if it applies none)."""
    name, options = parse_spec(spec)
    act = options.get("act", _REGISTRY[name].own_activation)
    return None if act == "none" else act


def create_norm(spec: str, num_channels: int, *, dim: int = 2, **overrides: Any) -> nn.Module:
    """Build the layer that ``spec`` names for ``num_channels`` channels.

    Args:
        spec: a registry name or ``"name:key=value,..."`` (see :func:`list_norms`).
        num_channels: channels ``C`` of the ``(N, C, *)`` input.
        dim: spatial dims of the input: 1 for ``(N, C)`` or ``(N, C, L)``, 2 for ``(N, C, H, W)``,
            3 for ``(N, C, D, H, W)``.
        overrides: options that take precedence over the spec's (same names).
    """
    if dim not in (1, 2, 3):
        raise ValueError(f"dim must be 1, 2 or 3 (spatial dims of the input), got {dim!r}")
    if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels <= 0:
        raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
    name, options = parse_spec(spec)
    entry = _REGISTRY[name]
    for key in overrides:
        if key not in entry.options and key != "act":
            raise ValueError(f"unknown option {key!r} for norm {name!r}; valid options: "
                             f"{', '.join(sorted(entry.options) + ['act'])}")
    options.update(overrides)
    act = options.pop("act", entry.own_activation)
    kwargs = dict(entry.options, **options)
    if entry.own_activation is not None:
        kwargs["activation"] = act
        return entry.factory(num_channels, dim, **kwargs)
    layer = entry.factory(num_channels, dim, **kwargs)
    activation = make_activation(act, num_channels)
    return NormActivation(layer, activation) if activation is not None else layer


def create_norm_act(spec: str, num_channels: int, *, dim: int = 2,
                    default_activation: Callable[[], nn.Module] = nn.ReLU) -> nn.Module:
    """A norm followed by its activation: the spec's own (TLU for FRN, ``act=``) or ReLU.

    This is what a ``conv → norm → activation`` block should call, so that ``"frn"`` replaces
    the ReLU by TLU while ``"bn"`` keeps it.
    """
    if spec_activation(spec) is not None:
        return create_norm(spec, num_channels, dim=dim)
    name, options = parse_spec(spec)
    if options.get("act") == "none":
        return create_norm(spec, num_channels, dim=dim)
    return NormActivation(create_norm(spec, num_channels, dim=dim), default_activation())


# -- built-in names -------------------------------------------------------------------------

def default_groups(num_channels: int, preferred: int = 32) -> int:
    """Largest divisor of ``num_channels`` that is at most ``preferred`` (GN's default 32)."""
    return max(g for g in range(1, min(preferred, num_channels) + 1) if num_channels % g == 0)


def _groups(num_channels: int, groups: int | None) -> int:
    if groups is None:
        return default_groups(num_channels)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if num_channels % groups:
        raise ValueError(f"groups={groups} does not divide num_channels={num_channels}; choose "
                         f"one of {[g for g in range(1, num_channels + 1) if num_channels % g == 0]}")
    return groups


def _ln_groups(num_channels: int, groups: Any) -> int:
    return 1


def _in_groups(num_channels: int, groups: Any) -> int:
    return num_channels


#: Constructor arguments that are never spec options: the channel count and where to put it.
_NOT_OPTIONS = frozenset({"num_features", "num_channels", "num_groups", "device", "dtype"})


def signature_options(cls: type, *, fixed: dict[str, Any] | None = None,
                      defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """A spec's options with their defaults, read from ``cls``'s constructor signature.

    Every argument with a default is an option, except the channel count, ``device``,
    ``dtype`` and the ``fixed`` ones (the spec sets them: ``"bn"`` is ``threshold=None``);
    ``defaults`` adds options the factory takes itself (``groups``) and replaces a default
    where the spec's differs from the class's (``"ffrn"``: ``threshold=2``).
    """
    fixed = fixed or {}
    options = {name: p.default for name, p in inspect.signature(cls).parameters.items()
               if p.default is not inspect.Parameter.empty and name not in _NOT_OPTIONS
               and name not in fixed}
    options.update(defaults or {})
    return options


def _identity(num_channels: int, dim: int) -> nn.Module:
    return nn.Identity()


def _per_dim(classes: tuple[type, type, type], fixed: dict[str, Any]):
    """``factory(c, dim, **o) = classes[dim - 1](c, **fixed, **o)``."""
    def build(num_channels: int, dim: int, **o) -> nn.Module:
        return classes[dim - 1](num_channels, **fixed, **o)
    return build


def _grouped(cls: type, groups_of: Callable[[int, Any], int], fixed: dict[str, Any]):
    """``factory(c, dim, groups=None, **o) = cls(groups_of(c, groups), c, **fixed, **o)``."""
    def build(num_channels: int, dim: int, groups: Any = None, **o) -> nn.Module:
        return cls(groups_of(num_channels, groups), num_channels, **fixed, **o)
    return build


def _spec(name: str, description: str, *, classes: tuple[type, type, type] | None = None,
          grouped: tuple[type, Callable[[int, Any], int]] | None = None,
          signature: type | None = None, fixed: dict[str, Any] | None = None,
          defaults: dict[str, Any] | None = None, own_activation: str | None = None) -> None:
    """Register a built-in spec: per-dim ``classes`` (1d, 2d, 3d) or a ``grouped``
    ``(class, groups_of)``; options by :func:`signature_options` over ``signature`` (default:
    the class; FRN*d take ``**kwargs`` and pass them to :class:`GroupFilterResponseNorm`)."""
    fixed = dict(fixed or {})
    if classes is not None:
        layer_type, factory = classes[1], _per_dim(classes, fixed)
    else:
        layer_type, factory = grouped[0], _grouped(grouped[0], grouped[1], fixed)
    not_options = dict(fixed)
    if own_activation is not None:  # the layer's own activation is the spec's act= option
        not_options["activation"] = own_activation
    options = signature_options(signature or layer_type, fixed=not_options, defaults=defaults)
    register_norm(name, factory, description=description, options=options,
                  own_activation=own_activation, layer_type=layer_type)


def _register_builtins() -> None:
    bn = (FilteredBatchNorm1d, FilteredBatchNorm2d, FilteredBatchNorm3d)
    frn = (FilterResponseNorm1d, FilterResponseNorm2d, FilterResponseNorm3d)
    unfiltered = {"threshold": None, "gaussian_consistent": False}
    register_norm("none", _identity, description="no normalization (identity)")
    _spec("bn", "batch norm (identical to torch.nn.BatchNorm*d)", classes=bn, fixed=unfiltered)
    _spec("fbn", "filtered batch norm: moments ignore |z| > threshold (default 2)", classes=bn)
    _spec("brn", "batch renormalization (Ioffe 2017), r/d clipping with warm-up",
          classes=(BatchRenorm1d, BatchRenorm2d, BatchRenorm3d))
    for short, groups_of, what, text, extra in (
            ("g", _groups, "group norm", "group norm (groups default: largest divisor of C up "
             "to 32)", {"groups": None}),
            ("l", _ln_groups, "layer norm", "layer norm over (C, *) with per-channel affine "
             "(GN, 1 group)", {}),
            ("i", _in_groups, "instance norm", "instance norm with per-channel affine (GN, C "
             "groups)", {})):
        grouped = (FilteredGroupNorm, groups_of)
        # "gn:threshold=2" is accepted (as before); the unfiltered spec has no Gaussian option
        _spec(f"{short}n", text, grouped=grouped, fixed={"gaussian_consistent": False},
              defaults=dict(extra, threshold=None))
        _spec(f"f{short}n", f"filtered {what}", grouped=grouped, defaults=extra)
    response = {"signature": GroupFilterResponseNorm, "own_activation": "tlu"}
    _spec("frn", "filter response norm + TLU (act= to change the activation)", classes=frn,
          **response)
    _spec("ffrn", "filtered FRN + TLU: nu^2 ignores |x|/nu > threshold", classes=frn,
          defaults={"threshold": 2.0}, **response)
    _spec("gfrn", "group FRN (uncentered group norm) + TLU",
          grouped=(GroupFilterResponseNorm, _groups), defaults={"groups": None}, **response)
    _spec("lfrn", "layer FRN (uncentered layer norm) + TLU",
          grouped=(GroupFilterResponseNorm, _ln_groups), **response)
    _register_revisiting_bn()


def _register_revisiting_bn() -> None:
    """[DF21]: A1/A2 (eq. 26-27), RBN/IEBN and their - forms (eq. 28-29), InputNorm."""
    alt = (AltScaleBatchNorm1d, AltScaleBatchNorm2d, AltScaleBatchNorm3d)
    for form, eq in (("a1", "y = gamma (xhat + beta), eq. 26"),
                     ("a2", "y = gamma (gamma0 xhat + beta), eq. 27")):
        _spec(f"bn_{form}", f"BN with scale form {form.upper()}: {eq}", classes=alt,
              fixed={"form": form})
    calibrated = (ScaleCalibratedBatchNorm1d, ScaleCalibratedBatchNorm2d,
                  ScaleCalibratedBatchNorm3d)
    for name, stats, wb, text in (
            ("rbn", "normalized", 1.0, "RBN scale: y = gamma S xhat + beta, S = sigmoid(w_v GAP(xhat) + w_b)"),
            ("rbn_minus", None, 1.0, "RBN- scale: S = sigmoid(w_b), w_b init 1 (S = 0.731)"),
            ("iebn", "input", -1.0, "IEBN scale: y = gamma S xhat + beta, S = sigmoid(w_v GAP(x) + w_b)"),
            ("iebn_minus", None, -1.0, "IEBN- scale: S = sigmoid(w_b), w_b init -1 (S = 0.269)")):
        _spec(name, text, classes=calibrated, fixed={"stats": stats}, defaults={"wb_init": wb})
    _spec("inputnorm", "BN-based input normalization: scale sigma_act*gamma, no shift",
          classes=(InputNorm, InputNorm, InputNorm))


_register_builtins()
