"""Model surgery: swap the normalization layers of any model.

:func:`convert` replaces every normalization layer of the chosen types in an ``nn.Module``
by the layer a registry spec names (``"fbn:threshold=2"``, ``"gn:groups=8"``, ``"frn"``, ...),
keeping what means the same thing in both layers (γ, β translated where the formulas
differ, so that the new layer computes the old one's per-channel tail). Folding norms into
convolutions for inference lives in :mod:`normlab.fuse` (:func:`fuse_for_inference`,
re-exported here).

Supported patterns:

* ``nn.Sequential`` children in order: ``[..., norm, nn.ReLU, ...]``.
* attribute patterns inside any other module (``self.conv1``, ``self.bn1``, ``self.relu``
  used as ``self.relu(self.bn1(self.conv1(x)))`` in a ResNet block), found by tracing that
  module's own ``forward`` one level deep with ``torch.fx`` (children are not traced into,
  so their code may be arbitrary). Modules whose ``forward`` cannot be traced (data-dependent
  Python control flow) are reported, never silently changed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor, fx, nn

from ._surgery import (_join, _module_calls, _refuse_torchscript, _set_submodule,
                       _shallow_graph, _split)
from .fold import tail_to_alt_scale, tail_to_scaled
from .fuse import FuseReport, fuse_for_inference  # re-exported: normlab.convert.fuse_for_inference
from .nn.activation import TLU, AffineTLU, NormActivation
from .nn.group import FilteredLayerNorm
from .nn.input_norm import InputNorm
from .registry import create_norm, norm_entry, parse_spec, spec_activation
from .taxonomy import NORM_TYPES, Family, Tail, affine_tail, classify

__all__ = ["convert", "fuse_for_inference", "ConversionReport", "FuseReport",
           "DEFAULT_CONVERT_TYPES"]

#: What :func:`convert` replaces by default (subclasses included; InputNorm only if named):
#: every class of :data:`normlab.taxonomy.NORM_TYPES` but RMSNorm (no channel-first target).
DEFAULT_CONVERT_TYPES: tuple[type, ...] = tuple(
    t for t in NORM_TYPES if classify(t).family is not Family.RMS)

_RELU_FUNCTIONS = (torch.relu, TF.relu, torch.relu_)


@dataclass
class ConversionReport:
    """What :func:`convert` did. Every candidate layer is in ``replaced`` or ``unconverted``.

    For every replaced layer, each tensor (parameter or buffer) of the new layer is in
    ``carried`` or ``at_init``, and each tensor of the old layer that was not used is in
    ``dropped``.

    Attributes:
        spec: the target spec.
        replaced: ``(path, old type, new type)`` per converted layer.
        unconverted: ``(path, type, reason)`` per layer of an included type left in place.
        carried: ``(path, new tensor, source)``: the new layer's tensor was set from the old
            layer. ``source`` is the old tensor's name when it was copied unchanged
            (``("layer1.bn1", "weight", "weight")``), else the formula it was computed by
            (``("layer1.bn1", "bias", "bias / weight")`` for an A1 target).
        at_init: ``(path, new tensor, reason)``: left at the new layer's initialization.
        dropped: ``(path, old tensor, reason)``: old tensors with no place in the new layer
            (e.g. β when the target has no shift parameter).
        activations_removed: ``(path, how)`` per ReLU made redundant by a spec's own activation.
        notes: other facts worth knowing (outputs that cannot match, activations kept, ...).
    """

    spec: str
    replaced: list[tuple[str, str, str]] = field(default_factory=list)
    unconverted: list[tuple[str, str, str]] = field(default_factory=list)
    carried: list[tuple[str, str, str]] = field(default_factory=list)
    at_init: list[tuple[str, str, str]] = field(default_factory=list)
    dropped: list[tuple[str, str, str]] = field(default_factory=list)
    activations_removed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def state_of(self, path: str) -> dict[str, dict[str, str]]:
        """``{"carried": {tensor: source}, "at_init": {tensor: reason}, "dropped": {...}}``
        for the layer at ``path``."""
        return {kind: {name: text for p, name, text in getattr(self, kind) if p == path}
                for kind in ("carried", "at_init", "dropped")}

    def __str__(self) -> str:
        lines = [f"convert to {self.spec!r}: {len(self.replaced)} replaced, "
                 f"{len(self.unconverted)} unconverted, "
                 f"{len(self.activations_removed)} activations removed"]
        lines += [f"  replaced    {p or '<root>'}: {a} -> {b}" for p, a, b in self.replaced]
        lines += [f"  UNCONVERTED {p or '<root>'} ({t}): {r}" for p, t, r in self.unconverted]
        for path in dict.fromkeys(p for p, _, _ in self.carried):
            items = [name if src == name else f"{name} = {src}"
                     for p, name, src in self.carried if p == path]
            lines.append(f"  carried     {path or '<root>'}: {', '.join(items)}")
        lines += [f"  at init     {_join(p, n)}: {r}" for p, n, r in self.at_init]
        lines += [f"  dropped     {_join(p, n)} (old layer): {r}" for p, n, r in self.dropped]
        lines += [f"  removed     {p}: {h}" for p, h in self.activations_removed]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# -- helpers ----------------------------------------------------------------------------------

def _statistics(module: nn.Module) -> str:
    """Which statistics a layer's running buffers mean (:attr:`Family.statistics`)."""
    kind = classify(module)
    return kind.family.statistics if kind is not None else "other"


def _tail(module: nn.Module) -> Tail:
    """Which formula maps the normalized ``x̂`` to the output (what :func:`convert` translates)."""
    kind = classify(module)
    return kind.tail if kind is not None else Tail.STANDARD


def _same_tail(src: nn.Module, dst: nn.Module) -> bool:
    """Both layers compute their output from x̂ by the same formula with the same parameters."""
    tail = _tail(src)
    if tail is not _tail(dst) or tail is Tail.STANDARD:
        return False
    if tail is Tail.ALT_SCALE:
        return src.form == dst.form
    if tail is Tail.SCALED:
        return src.stats == dst.stats
    return True


def _channels(module: nn.Module) -> int | None:
    for attr in ("num_features", "num_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _declared_dim(module: nn.Module) -> int | None:
    """Spatial dims implied by the layer's class (BatchNorm2d → 2), or None if any."""
    name = type(module).__name__
    for d in (1, 2, 3):
        if name.endswith(f"{d}d"):
            return d
    return None


def _reference_tensor(module: nn.Module) -> Tensor | None:
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t.is_floating_point():
            return t
    return None


def _is_relu_node(node: fx.Node, parent: nn.Module) -> bool:
    if node.op == "call_module":
        try:
            return type(parent.get_submodule(node.target)) is nn.ReLU
        except AttributeError:
            return False
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _record_ranks(model: nn.Module, paths: list[str], example_input: Any) -> dict[str, int]:
    """Run ``model(example_input)`` in eval mode and record each layer's input rank."""
    ranks: dict[str, int] = {}
    handles = []
    for path in paths:
        def hook(module, args, _p=path):
            if args and isinstance(args[0], Tensor):
                ranks[_p] = args[0].dim()
        handles.append(model.get_submodule(path).register_forward_pre_hook(hook))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_input, tuple):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return ranks


# -- convert ----------------------------------------------------------------------------------

def _check_include(include: Any) -> tuple[type, ...]:
    if isinstance(include, type):
        include = (include,)
    if not isinstance(include, (tuple, list)) or not include or not all(
            isinstance(t, type) and issubclass(t, nn.Module) for t in include):
        raise TypeError(f"include must be a non-empty tuple of nn.Module classes (e.g. "
                        f"(torch.nn.BatchNorm2d,)), got {include!r}")
    return tuple(include)


def _find_following_relus(model: nn.Module, paths: list[str], report: ConversionReport
                          ) -> tuple[dict[str, tuple], dict[str, fx.Graph]]:
    """For each norm path, the ReLU that consumes only its output, if one can be found.

    Returns ``{norm path: ("seq", parent path, relu name) | ("fx", parent path, node)}`` and
    the traced graphs per parent path.
    """
    found: dict[str, tuple] = {}
    graphs: dict[str, fx.Graph] = {}
    failed: dict[str, str] = {}
    for path in paths:
        parent_path, name = _split(path)
        if path == "":
            continue
        parent = model.get_submodule(parent_path) if parent_path else model
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            i = names.index(name)
            if i + 1 < len(names) and type(parent._modules[names[i + 1]]) is nn.ReLU:
                found[path] = ("seq", parent_path, names[i + 1])
            continue
        if parent_path in failed:
            continue
        if parent_path not in graphs:
            try:
                graphs[parent_path] = _shallow_graph(parent)
            except Exception as exc:  # noqa: BLE001 - any tracing failure is reported
                failed[parent_path] = f"{type(exc).__name__}: {exc}"
                report.notes.append(
                    f"could not trace {type(parent).__name__}.forward at "
                    f"{parent_path or '<root>'} ({failed[parent_path].splitlines()[0][:120]}); "
                    f"ReLUs after its norms are kept")
                continue
        graph = graphs[parent_path]
        calls = _module_calls(graph).get(name, [])
        if len(calls) != 1:
            continue
        users = list(calls[0].users)
        if len(users) == 1 and _is_relu_node(users[0], parent) and users[0].args \
                and users[0].args[0] is calls[0]:
            found[path] = ("fx", parent_path, users[0])
    return found, graphs


def _build_target(spec: str, src: nn.Module, dim: int, report: ConversionReport, path: str,
                  act_none: bool) -> nn.Module | str:
    """The replacement for ``src`` (state carried where meaningful) or a reason string."""
    name, spec_options = parse_spec(spec)
    entry = norm_entry(name)
    channels = _channels(src)
    if _statistics(src) == Family.LAYER.value:
        if name not in ("ln", "fln"):
            return (f"LayerNorm normalizes the trailing dims {tuple(src.normalized_shape)}; "
                    f"only the specs 'ln' and 'fln' can replace it (other layers normalize "
                    f"channel-first (N, C, *) input)")
        threshold = spec_options.get("threshold", None if name == "ln" else 2.0)
        new = FilteredLayerNorm(src.normalized_shape, eps=spec_options.get("eps", src.eps),
                                elementwise_affine=src.weight is not None,
                                bias=getattr(src, "bias", None) is not None, threshold=threshold,
                                gaussian_consistent=spec_options.get("gaussian_consistent", False),
                                gamma_init=spec_options.get("gamma_init", 1.0))
    else:
        if channels is None:
            return "cannot tell the number of channels (no num_features / num_channels)"
        overrides: dict[str, Any] = {}
        if act_none:
            overrides["act"] = "none"
        probe = create_norm(spec, channels, dim=dim, **overrides)
        probe_core = probe.norm if isinstance(probe, NormActivation) else probe
        inherit: dict[str, Any] = {}
        # affine=False is inherited only by y = γx̂ + β targets; the other formulas express
        # the old "no γ, no β" (y = x̂) exactly with their own parameters (γ = 1, β = 0, ...).
        if (getattr(src, "affine", True) is False or getattr(src, "weight", 0) is None) \
                and _tail(probe_core) is Tail.STANDARD:
            inherit["affine"] = False
        if _statistics(probe_core) == _statistics(src) != "other":
            inherit.update(eps=getattr(src, "eps", None), groups=getattr(src, "num_groups", None))
            if hasattr(src, "momentum"):
                inherit["momentum"] = src.momentum
            if hasattr(src, "track_running_stats"):
                inherit["track_running_stats"] = src.track_running_stats
        for key, value in inherit.items():
            if key in entry.options and key not in spec_options and (
                    value is not None or key == "momentum"):
                overrides[key] = value
        try:
            new = create_norm(spec, channels, dim=dim, **overrides)
        except (ValueError, TypeError) as exc:
            return f"cannot build {spec!r} for it: {exc}"
    ref = _reference_tensor(src)
    if ref is not None:  # before copying, so float64 state is carried without rounding
        new = new.to(device=ref.device, dtype=ref.dtype)
    core = new.norm if isinstance(new, NormActivation) else new
    log = _copy_state(src, core)
    src_act = getattr(src, "activation", "none") if _statistics(src) == Family.FRN.value \
        else "none"
    if src_act != "none" and spec_activation(spec) is None:
        act = _carry_activation(src)
        for tensor in ("tau", "kappa"):
            if isinstance(getattr(act, tensor, None), Tensor):
                log.carried.append((f"act.{tensor}", tensor))
                log.used.add(tensor)
        new = NormActivation(new, act) if not isinstance(new, NormActivation) else new
        report.notes.append(f"{path or '<root>'}: the old layer applied {src_act!r} itself; it is "
                            f"kept after the new layer (NormActivation)")
    log.write(report, path, src, core)
    return new


_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class _StateLog:
    """What :func:`_copy_state` did to one layer, before it goes into the report."""

    carried: list[tuple[str, str]] = field(default_factory=list)   # (new tensor, source)
    used: set[str] = field(default_factory=set)                     # old tensors used
    init_reasons: dict[str, str] = field(default_factory=dict)      # new tensor -> why at init
    drop_reasons: dict[str, str] = field(default_factory=dict)      # old tensor -> why dropped
    notes: list[str] = field(default_factory=list)

    def put(self, dst: nn.Module, name: str, value: Tensor, source: str,
            uses: Sequence[str]) -> None:
        getattr(dst, name).copy_(value)
        self.carried.append((name, source))
        self.used.update(uses)

    def write(self, report: ConversionReport, path: str, src: nn.Module, dst: nn.Module) -> None:
        """Report every tensor of ``dst`` (carried or at init) and every unused one of ``src``."""
        src_name, dst_name = type(src).__name__, type(dst).__name__
        report.carried += [(path, name, source) for name, source in self.carried]
        set_names = {name for name, _ in self.carried}
        for name in _own_tensors(dst):
            if name not in set_names:
                report.at_init.append((path, name, self.init_reasons.get(
                    name, f"{src_name} has no counterpart")))
        for name in _own_tensors(src):
            if name not in self.used:
                report.dropped.append((path, name, self.drop_reasons.get(
                    name, f"{dst_name} has no counterpart")))
        report.notes += [f"{path or '<root>'}: {note}" for note in self.notes]


def _own_tensors(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_parameters(recurse=False)] + \
        [name for name, _ in module.named_buffers(recurse=False)]


def _copy_affine(src: nn.Module, dst: nn.Module, log: _StateLog) -> None:
    """Set the new layer's tail parameters so that its tail equals the old one's.

    Same formula on both sides: every same-named parameter is copied. Otherwise the old tail
    ``y = w x̂ + b`` (:func:`normlab.taxonomy.affine_tail`) is written into the new formula, its extra
    parameters (A2's γ₀, RBN/IEBN's w_v, w_b) staying at their init:

    * ``γ x̂ + β`` and InputNorm's ``γ̂ x̂``: ``γ = w``, ``β = b`` (InputNorm: β dropped);
    * A1 ``γ(x̂ + β)``, A2 ``γ(γ₀x̂ + β)`` with γ₀ = 1: ``γ = w``, ``β = b / w``;
    * RBN/IEBN ``γ S x̂ + β`` with S₀ = sigmoid(w_b): ``γ = w / S₀``, ``β = b`` (exact while
      w_v = 0, its init: S = S₀ for every sample).
    """
    dst_kind = _tail(dst)
    src_name, dst_name = type(src).__name__, type(dst).__name__
    if _same_tail(src, dst):
        for name, param in dst.named_parameters(recurse=False):
            old = getattr(src, name, None)
            if isinstance(old, Tensor) and old.shape == param.shape:
                log.put(dst, name, old, name, (name,))
        return
    tail = affine_tail(src, _tail(src))
    if isinstance(tail, str):
        for name in ("weight", "bias"):
            log.init_reasons[name] = f"{src_name}: {tail}"
        for name in ("weight", "bias", "calib_weight", "calib_bias"):
            log.drop_reasons[name] = tail
        return
    (w, w_text, w_uses), (b, b_text, b_uses) = tail

    def place(name: str, value: Tensor | None, text: str, uses: Sequence[str],
              no_slot: str) -> None:
        slot = getattr(dst, name, None)
        if not isinstance(slot, Tensor):
            for old in uses:
                log.drop_reasons.setdefault(old, no_slot)
            return
        if value is None:  # the old layer has no such parameter: its identity value
            value = (torch.ones_like if name == "weight" else torch.zeros_like)(slot)
        if value.shape != slot.shape:
            for old in uses:
                log.drop_reasons[old] = (f"shape {tuple(value.shape)} does not fit "
                                         f"{dst_name}.{name} {tuple(slot.shape)}")
            log.init_reasons[name] = f"the old {name} has another shape"
            return
        log.put(dst, name, value, text, uses)

    no_affine = f"{dst_name} has no such parameter (affine=False)"
    if dst_kind in (Tail.STANDARD, Tail.INPUT):
        place("weight", w, w_text, w_uses, no_affine)
        no_shift = (f"{dst_name} has no shift parameter (β is fixed at 0), so its output is the "
                    f"old one minus β" if dst_kind is Tail.INPUT else no_affine)
        place("bias", b, b_text, b_uses, no_shift)
        return
    factory = {"dtype": torch.float64, "device": _reference_tensor(dst).device}
    w_full = w if w is not None else torch.ones(dst.num_features, **factory)
    b_full = b if b is not None else torch.zeros(dst.num_features, **factory)
    if dst_kind is Tail.ALT_SCALE:
        place("weight", w, w_text, w_uses, no_affine)
        _, beta, lost = tail_to_alt_scale(w_full, b_full)
        place("bias", beta, f"({b_text}) / ({w_text})" if " " in b_text + w_text
              else f"{b_text} / {w_text}", tuple(b_uses) + tuple(w_uses), no_affine)
        bad = lost.nonzero().flatten().tolist()
        if bad:
            log.notes.append(f"channels {bad} have γ = 0 and β ≠ 0: {dst_name} scales β by γ and "
                             f"cannot output that constant, so β is 0 there (outputs differ)")
        if dst.gamma0 is not None:  # A2
            log.init_reasons["gamma0"] = (f"{src_name} has no γ₀; its init 1 makes γ(γ₀x̂ + β) "
                                          f"equal the old tail")
        return
    # scaled: γ S x̂ + β
    place("weight", tail_to_scaled(w_full, dst.calib_bias),
          f"{w_text} / sigmoid(new calib_bias)", w_uses, no_affine)
    place("bias", b, b_text, b_uses, no_affine)
    log.init_reasons["calib_bias"] = (f"w_b has no counterpart in {src_name}; γ was divided by "
                                      f"S₀ = sigmoid(w_b) so that γ·S₀ is the old scale")
    if dst.calib_weight is not None:
        log.init_reasons["calib_weight"] = (f"w_v has no counterpart in {src_name}; at w_v = 0 "
                                            f"S = sigmoid(w_b) for every sample")
        if bool((dst.calib_weight != 0).any()):
            log.notes.append("w_v ≠ 0 (wv_init): S depends on the sample, so the output is not "
                             "the old layer's")


def _copy_state(src: nn.Module, dst: nn.Module) -> _StateLog:
    """Carry every tensor whose meaning is the same in ``src`` and ``dst`` (see :func:`convert`)."""
    log = _StateLog()
    with torch.no_grad():
        _copy_affine(src, dst, log)
        src_family, dst_family = _statistics(src), _statistics(dst)
        if src_family == dst_family and src_family in ("batch", "instance"):
            for attr in _RUNNING_STATS:
                s, d = getattr(src, attr, None), getattr(dst, attr, None)
                if isinstance(s, Tensor) and isinstance(d, Tensor) and s.shape == d.shape:
                    log.put(dst, attr, s, attr, (attr,))
        for attr in _RUNNING_STATS:  # reasons, used only for what was not carried
            s, d = getattr(src, attr, None), getattr(dst, attr, None)
            if d is None:
                log.drop_reasons[attr] = f"{type(dst).__name__} keeps no running statistics"
            elif s is None:
                log.init_reasons[attr] = f"{type(src).__name__} keeps no running statistics"
            else:
                log.drop_reasons[attr] = log.init_reasons[attr] = (
                    f"statistics of other sets ({src_family} vs {dst_family} norm)")
        if src_family == dst_family == Family.FRN.value:  # τ, κ, learned ε mean the same
            for attr in ("tau", "kappa", "learned_eps"):
                s, d = getattr(src, attr, None), getattr(dst, attr, None)
                if isinstance(s, Tensor) and isinstance(d, Tensor) and s.shape == d.shape:
                    log.put(dst, attr, s, attr, (attr,))
    return log


def _carry_activation(src: nn.Module) -> nn.Module:
    """The activation an old FRN applied itself, as a module (its τ, κ carried)."""
    with torch.no_grad():
        if src.activation == "tlu":
            act = TLU(src.num_channels, device=src.tau.device, dtype=src.tau.dtype)
            act.tau.copy_(src.tau)
            return act
        if src.activation == "affine_tlu":
            act = AffineTLU(src.num_channels, device=src.tau.device, dtype=src.tau.dtype)
            act.tau.copy_(src.tau)
            act.kappa.copy_(src.kappa)
            return act
    return nn.ReLU()


def convert(model: nn.Module, spec: str, *, include: Sequence[type] = DEFAULT_CONVERT_TYPES,
            replace_activation: bool = False, example_input: Any = None, dim: int = 2,
            inplace: bool = True) -> tuple[nn.Module, ConversionReport]:
    """Replace every normalization layer of the ``include`` types by the layer ``spec`` names.

    For each layer: the new layer has the same channel count (``num_features`` /
    ``num_channels``; GroupNorm's ``num_groups`` and the old ``eps``/``momentum``/
    ``track_running_stats``/``affine`` are kept unless the spec sets them), the running
    statistics (when both are batch norms — InputNorm, A1/A2, RBN/IEBN included — or both
    instance norms), FRN's τ/κ/learned ε (FRN → FRN), the old layer's device, dtype and
    train/eval mode. torch ``LayerNorm`` (trailing dims) is replaced only by ``"ln"``/``"fln"``
    specs (as :class:`~normlab.FilteredLayerNorm`). An old FRN's own TLU is kept after a new
    layer that has no activation.

    The affine tail is carried so that the new layer's tail equals the old one's (the old
    layer's ``y = w·x̂ + b``, γ = w and β = b for a torch BN), the new layer's extra
    parameters staying at their init:

    * ``γ x̂ + β`` targets (bn, fbn, brn, gn, frn, ...): γ = w, β = b (copied);
    * ``bn_a1`` ``γ (x̂ + β)``: γ = w, **β = b / w**;
    * ``bn_a2`` ``γ (γ₀ x̂ + β)``: γ = w, γ₀ = 1 (init), **β = b / w**;
    * ``rbn``, ``iebn``, ``rbn_minus``, ``iebn_minus`` ``γ S x̂ + β`` with
      ``S = sigmoid(w_v·GAP + w_b)``: **γ = w / sigmoid(w_b)**, β = b, w_v and w_b at init;
    * ``inputnorm`` ``γ̂ x̂`` (no shift): γ̂ = w; **β is dropped**.

    A copied β would mean ``γβ`` in A1/A2, and a copied γ would mean ``γ·S`` (S ≈ 0.731 for
    RBN, 0.269 for IEBN at init) in RBN/IEBN, so those are *computed* (bold) rather than
    copied: the eval-mode output then equals the old layer's (RBN/IEBN: while w_v = 0, its
    init, S = sigmoid(w_b) for every sample). Exceptions, reported: InputNorm has no shift, so
    its output is the old one minus β; a channel with γ = 0 and β ≠ 0 has no A1/A2 form (β
    is set to 0 there). To start from the initialization of [DF21] instead (RBN's γ = 1 gives
    γ·S = 0.731), call :func:`normlab.init_norm_` after converting. Same formula on both sides
    (A2 → A2, RBN → RBN, ...): every parameter is copied; an old A1/A2/RBN⁻/IEBN⁻/InputNorm
    tail goes into a ``γ x̂ + β`` target as its effective ``w, b`` (``γγ₀``, ``γβ``, ...).
    ``report.carried`` / ``at_init`` / ``dropped`` list every tensor with its source or
    reason.

    Activation handling for specs whose layer applies its own activation (``"frn"``: TLU):
    with ``replace_activation=True`` the ``nn.ReLU`` that consumes *only* the norm's output is
    removed — in ``nn.Sequential`` (next child → ``nn.Identity``) and in attribute patterns
    (found with a one-level ``torch.fx`` trace of the parent: an unshared ``self.relu`` becomes
    ``nn.Identity``; a shared one, or ``F.relu``/``torch.relu``/``.relu()`` calls, are removed by
    rewriting that parent's forward as an ``fx.GraphModule``). Norms with no such ReLU get the
    spec with ``act=none`` (no activation is added where there was none). With
    ``replace_activation=False`` the spec is used as is and ReLUs are kept.

    Args:
        model: any ``nn.Module`` (converted in place unless ``inplace=False``; if the model
            itself is a norm layer, the returned model is the new layer).
        spec: registry spec, e.g. ``"fbn:threshold=2"``, ``"gn:groups=8"``, ``"frn"``.
        include: layer types to convert (default :data:`DEFAULT_CONVERT_TYPES`; InputNorm is
            converted only when listed).
        replace_activation: see above.
        example_input: optional input for ``model(example_input)`` (a tuple is unpacked); used
            (in eval mode, no grad) to learn the input rank of layers whose class does not fix
            it (GroupNorm, SyncBatchNorm, FRN groups, ...).
        dim: spatial dims assumed for those layers without ``example_input`` (2 = images).

    Returns:
        ``(model, ConversionReport)``.

    Example:
        >>> model, report = normlab.convert(torchvision_resnet18, "fbn:threshold=2")
        >>> print(report)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _refuse_torchscript(model, "convert")
    parse_spec(spec)  # raises a clear ValueError for bad specs before anything changes
    include = _check_include(include)
    if dim not in (1, 2, 3):
        raise ValueError(f"dim must be 1, 2 or 3 (spatial dims of the input), got {dim!r}")
    if not isinstance(replace_activation, bool):
        raise TypeError(f"replace_activation must be True or False, got {replace_activation!r}")
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport(spec=spec)

    candidates: list[tuple[str, nn.Module]] = []
    skip_under: list[str] = []
    # every place, shared modules included: a norm registered at two places is one module
    for path, module in model.named_modules(remove_duplicate=False):
        if any(path.startswith(p + ".") for p in skip_under):
            continue
        if isinstance(module, include) and (not isinstance(module, InputNorm)
                                            or InputNorm in include):
            candidates.append((path, module))
            skip_under.append(path)
    if not candidates:
        report.notes.append("no layer of the included types was found")
        return model, report

    ranks = {}
    if example_input is not None:
        ranks = _record_ranks(model, [p for p, _ in candidates], example_input)

    places: dict[int, list[str]] = {}
    for path, src in candidates:
        places.setdefault(id(src), []).append(path)
    own_act = spec_activation(spec) is not None
    relus: dict[str, tuple] = {}
    graphs: dict[str, fx.Graph] = {}
    if own_act and replace_activation:
        relus, graphs = _find_following_relus(model, [p for p, _ in candidates], report)
        for paths in places.values():  # one shared layer: its ReLUs go at every place or none
            if not all(p in relus for p in paths):
                for p in paths:
                    relus.pop(p, None)
    elif own_act:
        report.notes.append(f"{spec!r} applies its own activation ({spec_activation(spec)}); "
                            f"ReLUs after the converted layers are kept (replace_activation="
                            f"True removes them)")

    root = model
    converted: set[str] = set()
    built: dict[int, nn.Module | str] = {}  # one new layer per old module, at all its places
    for path, src in candidates:
        act_none = own_act and replace_activation and path not in relus
        if id(src) not in built:
            d = _declared_dim(src)
            if path in ranks:
                d = max(1, ranks[path] - 2)
            if d is None:
                d = dim
            built[id(src)] = _build_target(spec, src, d, report, path, act_none)
            if isinstance(built[id(src)], nn.Module):
                built[id(src)].train(src.training)
            if len(places[id(src)]) > 1:
                report.notes.append(
                    f"{', '.join(p or '<root>' for p in places[id(src)])}: one module "
                    f"registered at {len(places[id(src)])} places; one new layer takes all of "
                    f"them (shared, as the old one was)")
        new = built[id(src)]
        if isinstance(new, str):
            report.unconverted.append((path, type(src).__name__, new))
            continue
        if path == "":
            root = new
        else:
            _set_submodule(model, path, new)
        converted.add(path)
        report.replaced.append((path, type(src).__name__, type(new).__name__
                                + (f"({type(new.norm).__name__})"
                                   if isinstance(new, NormActivation) else "")))
        if act_none:
            report.notes.append(f"{path}: no ReLU consumes its output only; built with act=none")

    root = _remove_relus(root, {p: r for p, r in relus.items() if p in converted}, graphs,
                         report)
    return root, report


def _remove_relus(model: nn.Module, relus: dict[str, tuple], graphs: dict[str, fx.Graph],
                  report: ConversionReport) -> nn.Module:
    """Remove the ReLUs found by :func:`_find_following_relus`; returns the (new) root."""
    rewrite: dict[str, list[tuple[str, fx.Node]]] = {}
    for path, found in relus.items():
        if found[0] == "seq":
            _, parent_path, relu_name = found
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, relu_name, nn.Identity())
            report.activations_removed.append(
                (_join(parent_path, relu_name), f"nn.Sequential: ReLU after {path} -> Identity"))
        else:
            rewrite.setdefault(found[1], []).append((path, found[2]))
    for parent_path, items in rewrite.items():
        parent = model.get_submodule(parent_path) if parent_path else model
        graph = graphs[parent_path]
        calls = _module_calls(graph)
        removable = {id(node) for _, node in items}
        targets = {node.target for _, node in items if node.op == "call_module"}
        attr_ok = all(node.op == "call_module" for _, node in items) and all(
            all(id(n) in removable for n in calls.get(t, [])) for t in targets)
        if attr_ok:
            for path, node in items:
                _set_submodule(parent, node.target, nn.Identity())
                report.activations_removed.append(
                    (_join(parent_path, node.target), f"attribute ReLU after {path} -> Identity"))
            continue
        for path, node in items:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            report.activations_removed.append(
                (_join(parent_path, str(node.target) if node.op == "call_module" else node.name),
                 f"call after {path} removed from {type(parent).__name__}.forward (torch.fx)"))
        graph.lint()
        new_parent = fx.GraphModule(parent, graph, class_name=type(parent).__name__ + "Fx")
        new_parent.train(parent.training)
        report.notes.append(f"{parent_path or '<root>'}: its ReLU is shared with other uses "
                            f"or is a function call, so its forward was rewritten as a torch.fx "
                            f"GraphModule")
        if parent_path:
            _set_submodule(model, parent_path, new_parent)
        else:
            model = new_parent
    return model
