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

__all__ = ["create_norm", "create_norm_act", "list_norms", "parse_spec", "register_norm",
           "spec_activation", "NormEntry"]


@dataclass(frozen=True)
class NormEntry:
    """One registry name: ``factory(num_channels, dim, **options) -> nn.Module``."""

    name: str
    factory: Callable[..., nn.Module]
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    own_activation: str | None = None  # activation the layer applies itself by default


_REGISTRY: dict[str, NormEntry] = {}


def register_norm(name: str, factory: Callable[..., nn.Module], *, description: str,
                  options: dict[str, Any] | None = None, own_activation: str | None = None,
                  replace: bool = False) -> None:
    """Add ``name`` to the registry.

    Args:
        factory: called as ``factory(num_channels, dim, **options)``; ``dim`` is the number of
            spatial dims of the input (1 for ``(N, C)``/``(N, C, L)``, 2 for images, 3 for
            volumes).
        options: the accepted option names with their defaults (``act`` is added for all).
        own_activation: the activation the layer applies by itself (e.g. ``"tlu"`` for FRN).
    """
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"registry names are letters, digits, '-' and '_', got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"norm {name!r} is already registered; pass replace=True to override")
    _REGISTRY[name] = NormEntry(name, factory, description, dict(options or {}), own_activation)


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

def _by_dim(classes):
    def pick(dim: int):
        return classes[dim - 1]
    return pick


_BN = _by_dim((FilteredBatchNorm1d, FilteredBatchNorm2d, FilteredBatchNorm3d))
_BRN = _by_dim((BatchRenorm1d, BatchRenorm2d, BatchRenorm3d))
_FRN = _by_dim((FilterResponseNorm1d, FilterResponseNorm2d, FilterResponseNorm3d))
_ALT = _by_dim((AltScaleBatchNorm1d, AltScaleBatchNorm2d, AltScaleBatchNorm3d))
_CAL = _by_dim((ScaleCalibratedBatchNorm1d, ScaleCalibratedBatchNorm2d,
                ScaleCalibratedBatchNorm3d))


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


_BN_OPTS = {"eps": 1e-5, "momentum": 0.1, "affine": True, "track_running_stats": True,
            "gamma_init": 1.0}
_FILTER_OPTS = {"threshold": 2.0, "gaussian_consistent": False}
_GN_OPTS = {"groups": None, "eps": 1e-5, "affine": True, "gamma_init": 1.0}
_FRN_OPTS = {"eps": 1e-6, "learnable_eps": False, "affine": True, "threshold": None,
             "gaussian_consistent": False, "gamma_init": 1.0}
_BRN_OPTS = {"eps": 1e-5, "momentum": 0.01, "affine": True, "r_max": 3.0, "d_max": 5.0,
             "renorm_start": 5000, "r_max_full_at": 40000, "d_max_full_at": 25000,
             "threshold": None, "gaussian_consistent": False, "gamma_init": 1.0}


def _identity(num_channels: int, dim: int) -> nn.Module:
    return nn.Identity()


def _bn(num_channels: int, dim: int, **o) -> nn.Module:
    return _BN(dim)(num_channels, **o)


def _brn(num_channels: int, dim: int, **o) -> nn.Module:
    return _BRN(dim)(num_channels, **o)


def _group_factory(groups_of: Callable[[int, Any], int]):
    def build(num_channels: int, dim: int, groups: Any = None, **o) -> nn.Module:
        return FilteredGroupNorm(groups_of(num_channels, groups), num_channels, **o)
    return build


def _frn(num_channels: int, dim: int, **o) -> nn.Module:
    return _FRN(dim)(num_channels, **o)


def _gfrn(groups_of: Callable[[int, Any], int]):
    def build(num_channels: int, dim: int, groups: Any = None, **o) -> nn.Module:
        return GroupFilterResponseNorm(groups_of(num_channels, groups), num_channels, **o)
    return build


def _ln_groups(num_channels: int, groups: Any) -> int:
    return 1


def _in_groups(num_channels: int, groups: Any) -> int:
    return num_channels


def _register_builtins() -> None:
    plain = {"threshold": None}
    register_norm("none", _identity, description="no normalization (identity)")
    register_norm("bn", lambda c, d, **o: _bn(c, d, threshold=None, **o), options=dict(_BN_OPTS),
                  description="batch norm (identical to torch.nn.BatchNorm*d)")
    register_norm("fbn", _bn, options=dict(_BN_OPTS, **_FILTER_OPTS),
                  description="filtered batch norm: moments ignore |z| > threshold (default 2)")
    register_norm("brn", _brn, options=dict(_BRN_OPTS),
                  description="batch renormalization (Ioffe 2017), r/d clipping with warm-up")
    register_norm("gn", _group_factory(_groups), options=dict(_GN_OPTS, **plain),
                  description="group norm (groups default: largest divisor of C up to 32)")
    register_norm("fgn", _group_factory(_groups), options=dict(_GN_OPTS, **_FILTER_OPTS),
                  description="filtered group norm")
    ln_opts = {k: v for k, v in _GN_OPTS.items() if k != "groups"}
    register_norm("ln", _group_factory(_ln_groups), options=dict(ln_opts, **plain),
                  description="layer norm over (C, *) with per-channel affine (GN, 1 group)")
    register_norm("fln", _group_factory(_ln_groups), options=dict(ln_opts, **_FILTER_OPTS),
                  description="filtered layer norm")
    register_norm("in", _group_factory(_in_groups), options=dict(ln_opts, **plain),
                  description="instance norm with per-channel affine (GN, C groups)")
    register_norm("fin", _group_factory(_in_groups), options=dict(ln_opts, **_FILTER_OPTS),
                  description="filtered instance norm")
    register_norm("frn", _frn, options=dict(_FRN_OPTS), own_activation="tlu",
                  description="filter response norm + TLU (act= to change the activation)")
    register_norm("ffrn", _frn, options=dict(_FRN_OPTS, threshold=2.0), own_activation="tlu",
                  description="filtered FRN + TLU: nu^2 ignores |x|/nu > threshold")
    register_norm("gfrn", _gfrn(_groups), options=dict(_FRN_OPTS, groups=None),
                  own_activation="tlu", description="group FRN (uncentered group norm) + TLU")
    register_norm("lfrn", _gfrn(_ln_groups), options=dict(_FRN_OPTS), own_activation="tlu",
                  description="layer FRN (uncentered layer norm) + TLU")
    _register_revisiting_bn()


def _register_revisiting_bn() -> None:
    """[DF21]: A1/A2 (eq. 26-27), RBN/IEBN and their - forms (eq. 28-29), InputNorm."""
    bn_opts = dict(_BN_OPTS, threshold=None, gaussian_consistent=False)
    for form, eq in (("a1", "y = gamma (xhat + beta), eq. 26"),
                     ("a2", "y = gamma (gamma0 xhat + beta), eq. 27")):
        register_norm(f"bn_{form}", lambda c, d, _f=form, **o: _ALT(d)(c, form=_f, **o),
                      options=dict(bn_opts), description=f"BN with scale form {form.upper()}: {eq}")
    for name, stats, wb, text in (
            ("rbn", "normalized", 1.0, "RBN scale: y = gamma S xhat + beta, S = sigmoid(w_v GAP(xhat) + w_b)"),
            ("rbn_minus", None, 1.0, "RBN- scale: S = sigmoid(w_b), w_b init 1 (S = 0.731)"),
            ("iebn", "input", -1.0, "IEBN scale: y = gamma S xhat + beta, S = sigmoid(w_v GAP(x) + w_b)"),
            ("iebn_minus", None, -1.0, "IEBN- scale: S = sigmoid(w_b), w_b init -1 (S = 0.269)")):
        register_norm(name, lambda c, d, _s=stats, **o: _CAL(d)(c, stats=_s, **o),
                      options=dict(bn_opts, wb_init=wb, wv_init=0.0), description=text)
    register_norm("inputnorm", lambda c, d, **o: InputNorm(c, **o),
                  options={"activation": "relu", "gamma": 1.0, "eps": 1e-5, "momentum": 0.1,
                           "threshold": None},
                  description="BN-based input normalization: scale sigma_act*gamma, no shift")


_register_builtins()
