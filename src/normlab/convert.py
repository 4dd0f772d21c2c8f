"""Model surgery: swap the normalization layers of any model, and fold them for inference.

:func:`convert` replaces every normalization layer of the chosen types in an ``nn.Module``
by the layer a registry spec names (``"fbn:threshold=2"``, ``"gn:groups=8"``, ``"frn"``, ...),
keeping what means the same thing in both layers (γ, β translated where the formulas
differ, so that the new layer computes the old one's per-channel tail).
:func:`fuse_for_inference` folds eval-mode batch norms into the adjacent convolution /
linear layer, the revisiting-BN seed's "no additional computational cost" at inference made
concrete.

Supported patterns (both functions):

* ``nn.Sequential`` children in order: ``[..., norm, nn.ReLU, ...]`` (convert) and
  ``[..., conv/linear, bn, ...]`` or ``[..., InputNorm, linear/conv, ...]`` (fuse; for
  InputNorm also across nested ``nn.Sequential`` boundaries).
* attribute patterns inside any other module (``self.conv1``, ``self.bn1``, ``self.relu``
  used as ``self.relu(self.bn1(self.conv1(x)))`` in a ResNet block), found by tracing that
  module's own ``forward`` one level deep with ``torch.fx`` (children are not traced into,
  so their code may be arbitrary). Modules whose ``forward`` cannot be traced (data-dependent
  Python control flow) are reported, never silently changed.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from .nn.activation import TLU, AffineTLU, NormActivation
from .nn.alternatives import _AltScaleBatchNorm, _ScaleCalibratedBatchNorm, _TailBatchNorm
from .nn.batch import _BatchStatsNorm
from .nn.group import FilteredGroupNorm, FilteredLayerNorm, _FilteredInstanceNorm
from .nn.input_norm import InputNorm
from .nn.padding import ConstantChannelPad
from .nn.response import GroupFilterResponseNorm
from .registry import _REGISTRY, create_norm, parse_spec, spec_activation

__all__ = ["convert", "fuse_for_inference", "ConversionReport", "FuseReport",
           "DEFAULT_CONVERT_TYPES"]

#: What :func:`convert` replaces by default (subclasses included; InputNorm only if named).
DEFAULT_CONVERT_TYPES: tuple[type, ...] = (
    _BatchNorm,           # BatchNorm1d/2d/3d, SyncBatchNorm, LazyBatchNorm*
    _InstanceNorm,        # InstanceNorm1d/2d/3d
    nn.GroupNorm, nn.LayerNorm,
    _BatchStatsNorm,      # normlab FilteredBatchNorm*, BatchRenorm*, A1/A2, RBN/IEBN
    FilteredGroupNorm, FilteredLayerNorm, _FilteredInstanceNorm,
    GroupFilterResponseNorm,  # FRN*, GFRN, LFRN
)

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


@dataclass
class FuseReport:
    """What :func:`fuse_for_inference` folded (``(norm path, into path)``), what it kept
    (``(norm path, reason)``) and notes (e.g. an InputNorm replaced by a
    :class:`~normlab.ConstantChannelPad`)."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fused {len(self.folded)} normalization layers"]
        lines += [f"  folded {a} into {b}" for a, b in self.folded]
        lines += [f"  kept   {a}: {r}" for a, r in self.kept]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# -- helpers ----------------------------------------------------------------------------------

def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition(".")
    return parent, name


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, name = _split(path)
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _family(module: nn.Module) -> str:
    """Which statistics a layer's running buffers / affine parameters mean."""
    if isinstance(module, (_BatchNorm, _BatchStatsNorm)):
        return "batch"
    if isinstance(module, (_InstanceNorm, _FilteredInstanceNorm)):
        return "instance"
    if isinstance(module, (nn.GroupNorm, FilteredGroupNorm)):
        return "group"
    if isinstance(module, GroupFilterResponseNorm):
        return "response"
    if isinstance(module, (nn.LayerNorm, FilteredLayerNorm)):
        return "layer"
    return "other"


def _tail_kind(module: nn.Module) -> str:
    """Which formula maps the normalized ``x̂`` to the output (what :func:`convert` translates).

    ``"standard"``: ``y = γ x̂ + β`` (BN, GN, LN, IN, FRN, ...); ``"input"``: ``y = γ̂ x̂``
    (:class:`~normlab.InputNorm`, no shift); ``"a1"``: ``y = γ (x̂ + β)``; ``"a2"``:
    ``y = γ (γ₀ x̂ + β)``; ``"scaled"``: ``y = γ S x̂ + β`` (RBN, IEBN, RBN⁻, IEBN⁻).
    """
    if isinstance(module, InputNorm):
        return "input"
    if isinstance(module, _AltScaleBatchNorm):
        return module.form
    if isinstance(module, _ScaleCalibratedBatchNorm):
        return "scaled"
    return "standard"


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


class _ShallowTracer(fx.Tracer):
    """Trace a module's own forward; every child module is a leaf (never traced into)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _shallow_graph(module: nn.Module) -> fx.Graph:
    return _ShallowTracer().trace(module)


def _is_relu_node(node: fx.Node, parent: nn.Module) -> bool:
    if node.op == "call_module":
        try:
            return type(parent.get_submodule(node.target)) is nn.ReLU
        except AttributeError:
            return False
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _module_calls(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    return calls


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
    entry = _REGISTRY[name]
    channels = _channels(src)
    if _family(src) == "layer":
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
                and _tail_kind(probe_core) == "standard":
            inherit["affine"] = False
        if _family(probe_core) == _family(src) and _family(src) != "other":
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
    src_act = getattr(src, "activation", "none") if isinstance(src, GroupFilterResponseNorm) \
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


def _source_tail(src: nn.Module) -> tuple[tuple, tuple] | str:
    """The old layer's tail as ``y = w·x̂ + b``: ``((w, text, uses), (b, text, uses))``.

    ``w``/``b`` are float64 tensors, or ``None`` for "no such parameter" (w = 1, b = 0);
    ``text`` says how they were computed and ``uses`` which old tensors they come from. A
    string is returned when the tail is no per-channel affine map (RBN/IEBN with w_v ≠ 0).
    """
    kind = _tail_kind(src)
    w = getattr(src, "weight", None)
    b = getattr(src, "bias", None)
    w64 = w.detach().to(torch.float64) if isinstance(w, Tensor) else None
    b64 = b.detach().to(torch.float64) if isinstance(b, Tensor) else None
    if kind == "standard":
        return ((w64, "weight", ("weight",)) if w64 is not None else (None, "1", ()),
                (b64, "bias", ("bias",)) if b64 is not None else (None, "0", ()))
    if kind == "input":
        return (w64, "weight", ("weight",)), (None, "0", ())
    if kind in ("a1", "a2"):  # y = γγ₀ x̂ + γβ
        if kind == "a1":
            scale = (w64, "weight", ("weight",))
        else:
            scale = (w64 * src.gamma0.detach().to(torch.float64), "weight * gamma0",
                      ("weight", "gamma0"))
        return scale, (w64 * b64, "weight * bias", ("weight", "bias"))
    # scaled: y = γ S x̂ + β with S = sigmoid(w_v GAP + w_b)
    if src.calib_weight is not None and bool((src.calib_weight != 0).any()):
        return (f"its scale S = sigmoid(w_v·GAP + w_b) depends on the sample (w_v ≠ 0), so no "
                f"per-channel γ, β can stand for it")
    s = torch.sigmoid(src.calib_bias.detach().to(torch.float64))
    scale = (s * w64, "weight * sigmoid(calib_bias)", ("weight", "calib_bias")) \
        if w64 is not None else (s, "sigmoid(calib_bias)", ("calib_bias",))
    return scale, (b64, "bias", ("bias",)) if b64 is not None else (None, "0", ())


def _copy_affine(src: nn.Module, dst: nn.Module, log: _StateLog) -> None:
    """Set the new layer's tail parameters so that its tail equals the old one's.

    Same formula on both sides: every same-named parameter is copied. Otherwise the old tail
    ``y = w x̂ + b`` (:func:`_source_tail`) is written into the new formula, its extra
    parameters (A2's γ₀, RBN/IEBN's w_v, w_b) staying at their init:

    * ``γ x̂ + β`` and InputNorm's ``γ̂ x̂``: ``γ = w``, ``β = b`` (InputNorm: β dropped);
    * A1 ``γ(x̂ + β)``, A2 ``γ(γ₀x̂ + β)`` with γ₀ = 1: ``γ = w``, ``β = b / w``;
    * RBN/IEBN ``γ S x̂ + β`` with S₀ = sigmoid(w_b): ``γ = w / S₀``, ``β = b`` (exact while
      w_v = 0, its init: S = S₀ for every sample).
    """
    src_kind, dst_kind = _tail_kind(src), _tail_kind(dst)
    src_name, dst_name = type(src).__name__, type(dst).__name__
    same = src_kind == dst_kind and (
        src_kind in ("a1", "a2", "input")
        or (src_kind == "scaled" and src.stats == dst.stats))
    if same:
        for name, param in dst.named_parameters(recurse=False):
            old = getattr(src, name, None)
            if isinstance(old, Tensor) and old.shape == param.shape:
                log.put(dst, name, old, name, (name,))
        return
    tail = _source_tail(src)
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
    if dst_kind in ("standard", "input"):
        place("weight", w, w_text, w_uses, no_affine)
        no_shift = (f"{dst_name} has no shift parameter (β is fixed at 0), so its output is the "
                    f"old one minus β" if dst_kind == "input" else no_affine)
        place("bias", b, b_text, b_uses, no_shift)
        return
    factory = {"dtype": torch.float64, "device": _reference_tensor(dst).device}
    w_full = w if w is not None else torch.ones(dst.num_features, **factory)
    b_full = b if b is not None else torch.zeros(dst.num_features, **factory)
    if dst_kind in ("a1", "a2"):
        place("weight", w, w_text, w_uses, no_affine)
        zero = w_full == 0
        beta = torch.where(zero, torch.zeros_like(b_full),
                           b_full / torch.where(zero, torch.ones_like(w_full), w_full))
        place("bias", beta, f"({b_text}) / ({w_text})" if " " in b_text + w_text
              else f"{b_text} / {w_text}", tuple(b_uses) + tuple(w_uses), no_affine)
        bad = (zero & (b_full != 0)).nonzero().flatten().tolist()
        if bad:
            log.notes.append(f"channels {bad} have γ = 0 and β ≠ 0: {dst_name} scales β by γ and "
                             f"cannot output that constant, so β is 0 there (outputs differ)")
        if dst_kind == "a2":
            log.init_reasons["gamma0"] = (f"{src_name} has no γ₀; its init 1 makes γ(γ₀x̂ + β) "
                                          f"equal the old tail")
        return
    # scaled: γ S x̂ + β
    s0 = torch.sigmoid(dst.calib_bias.detach().to(torch.float64))
    place("weight", w_full / s0, f"{w_text} / sigmoid(new calib_bias)", w_uses, no_affine)
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
        src_family, dst_family = _family(src), _family(dst)
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
        if isinstance(src, GroupFilterResponseNorm) and isinstance(dst, GroupFilterResponseNorm):
            for attr in ("tau", "kappa", "learned_eps"):
                s, d = getattr(src, attr, None), getattr(dst, attr, None)
                if isinstance(s, Tensor) and isinstance(d, Tensor) and s.shape == d.shape:
                    log.put(dst, attr, s, attr, (attr,))
    return log


def _carry_activation(src: GroupFilterResponseNorm) -> nn.Module:
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
    is set to 0 there). To start from the seed's initialization instead (RBN's γ = 1 gives
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
    for path, module in model.named_modules():
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

    own_act = spec_activation(spec) is not None
    relus: dict[str, tuple] = {}
    graphs: dict[str, fx.Graph] = {}
    if own_act and replace_activation:
        relus, graphs = _find_following_relus(model, [p for p, _ in candidates], report)
    elif own_act:
        report.notes.append(f"{spec!r} applies its own activation ({spec_activation(spec)}); "
                            f"ReLUs after the converted layers are kept (replace_activation="
                            f"True removes them)")

    root = model
    converted: set[str] = set()
    for path, src in candidates:
        d = _declared_dim(src)
        if path in ranks:
            d = max(1, ranks[path] - 2)
        if d is None:
            d = dim
        act_none = own_act and replace_activation and path not in relus
        new = _build_target(spec, src, d, report, path, act_none)
        if isinstance(new, str):
            report.unconverted.append((path, type(src).__name__, new))
            continue
        new.train(src.training)
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


# -- fuse -------------------------------------------------------------------------------------

def _eval_affine(module: nn.Module) -> tuple[Tensor, Tensor] | None:
    """Per-channel ``(scale, shift)`` (float64) of a norm whose eval mode is affine, else None."""
    if isinstance(module, (_TailBatchNorm, InputNorm)):
        return module.inference_affine()
    if isinstance(module, (_BatchNorm, _BatchStatsNorm)):
        if getattr(module, "running_mean", None) is None or not module.track_running_stats:
            return None
        var = module.running_var.to(torch.float64)
        scale = torch.rsqrt(var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight.to(torch.float64)
        shift = -module.running_mean.to(torch.float64) * scale
        if module.bias is not None:
            shift = shift + module.bias.to(torch.float64)
        return scale, shift
    return None


def _post_norm(module: nn.Module) -> tuple[nn.Module, nn.Module | None] | None:
    """``(norm, what replaces the module after folding)`` for a foldable norm (→ removed) or a
    :class:`NormActivation` around one (→ its activation); ``None`` otherwise."""
    if isinstance(module, InputNorm):
        return None
    if isinstance(module, NormActivation):
        inner = _post_norm(module.norm)
        return (inner[0], module.act) if inner is not None else None
    return (module, None) if _eval_affine(module) is not None else None


def _foldable_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        isinstance(module, _ConvNd) and not module.transposed
        and type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d))


def _fold_after(layer: nn.Module, norm: nn.Module) -> bool:
    """``norm(layer(x))`` → ``layer'(x)``: W' = s·W (per output channel), b' = s·b + t."""
    affine = _eval_affine(norm)
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if affine is None or affine[0].numel() != out:
        return False
    scale, shift = (a.to(layer.weight.device) for a in affine)
    with torch.no_grad():
        w = layer.weight.to(torch.float64)
        view = [-1] + [1] * (w.dim() - 1)
        b = layer.bias.to(torch.float64) if layer.bias is not None else torch.zeros_like(scale)
        layer.weight.copy_((w * scale.view(view)).to(layer.weight.dtype))
        new_bias = (b * scale + shift).to(layer.weight.dtype)
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias)
        else:
            layer.bias.copy_(new_bias)
    return True


#: Layers an InputNorm folds into (exact types: subclasses may change ``forward``).
_INPUT_FOLD_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                     nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _plain_sequential(module: nn.Module) -> bool:
    """An ``nn.Sequential`` whose forward is torch's: child i's output is child i+1's input."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _use_counts(model: nn.Module) -> dict[int, int]:
    """``{id(module or parameter): number of places it occupies in the model}``."""
    counts: dict[int, int] = {}
    for _, item in list(model.named_modules(remove_duplicate=False)) + list(
            model.named_parameters(remove_duplicate=False)):
        counts[id(item)] = counts.get(id(item), 0) + 1
    return counts


def _single_module_user(node: fx.Node, calls: dict[str, list[fx.Node]]) -> str | None:
    """The target of the one child call that takes ``node`` as its only argument, if that is
    ``node``'s only use and the child is called nowhere else; else None."""
    users = list(node.users)
    if len(users) != 1:
        return None
    user = users[0]
    if user.op == "call_module" and user.args == (node,) and not user.kwargs \
            and len(calls.get(user.target, [])) == 1:
        return user.target
    return None


def _first_layer(model: nn.Module, path: str, counts: dict[int, int]
                 ) -> tuple[str, nn.Module] | str:
    """``(path, layer)`` of the conv/linear that receives the input of the module at ``path``
    first and alone — descending into plain ``nn.Sequential`` (first child) and into modules
    whose (shallowly traced) forward hands its input to one child only — or a reason string."""
    module = model.get_submodule(path)
    if counts.get(id(module), 0) > 1:
        return f"{path} is used at several places in the model"
    if type(module) in _INPUT_FOLD_TYPES:
        if any(counts.get(id(p), 0) > 1 for p in module.parameters(recurse=False)):
            return f"the parameters of {path} are shared with another module"
        return path, module
    if type(module) is nn.Identity:
        return _next_layer(model, path, counts)
    if _plain_sequential(module):
        if len(module) == 0:
            return f"the next module, {path}, is an empty nn.Sequential"
        return _first_layer(model, _join(path, next(iter(module._modules))), counts)
    if next(module.children(), None) is None:
        return (f"followed by {type(module).__name__} ({path}), not a Linear, Conv or "
                f"ConvTranspose")
    try:
        graph = _shallow_graph(module)
    except Exception as exc:  # noqa: BLE001 - tracing failures are reported
        return f"{type(module).__name__}.forward at {path} is not traceable ({type(exc).__name__})"
    inputs = [node for node in graph.nodes if node.op == "placeholder"]
    target = _single_module_user(inputs[0], _module_calls(graph)) if inputs else None
    if target is None:
        return (f"{type(module).__name__}.forward at {path} does not hand its input to a single "
                f"child alone")
    return _first_layer(model, _join(path, target), counts)


def _next_layer(model: nn.Module, path: str, counts: dict[int, int]
                ) -> tuple[str, nn.Module] | str:
    """``(path, layer)`` of the conv/linear that alone receives the output of the module at
    ``path`` (next child of a plain ``nn.Sequential``, the following call in a traced parent,
    or what follows the parent when the module is its last step), or a reason string."""
    if not path:
        return "nothing follows it inside the model"
    parent_path, name = _split(path)
    parent = model.get_submodule(parent_path) if parent_path else model
    if _plain_sequential(parent):
        names = list(parent._modules)
        i = names.index(name)
        if i + 1 < len(names):
            return _first_layer(model, _join(parent_path, names[i + 1]), counts)
        if counts.get(id(parent), 0) > 1:
            return f"it ends {parent_path}, which is used at several places"
        return _next_layer(model, parent_path, counts)
    try:
        graph = _shallow_graph(parent)
    except Exception as exc:  # noqa: BLE001 - tracing failures are reported
        return f"{type(parent).__name__}.forward is not traceable ({type(exc).__name__})"
    calls = _module_calls(graph)
    nodes = calls.get(name, [])
    if len(nodes) != 1:
        return f"{type(parent).__name__}.forward calls it {len(nodes)} times"
    target = _single_module_user(nodes[0], calls)
    if target is not None:
        return _first_layer(model, _join(parent_path, target), counts)
    users = list(nodes[0].users)
    if len(users) == 1 and users[0].op == "output" and users[0].args == (nodes[0],) \
            and counts.get(id(parent), 0) <= 1:
        return _next_layer(model, parent_path, counts)
    return (f"its output is not used by a single layer alone in "
            f"{type(parent).__name__}.forward")


def _conv_input_padding(conv: _ConvNd) -> list[tuple[int, int]]:
    """``(before, after)`` padding per spatial dim that a (non-transposed) conv applies."""
    if conv.padding == "valid":
        return [(0, 0)] * len(conv.kernel_size)
    if conv.padding == "same":  # torch: total d·(k − 1), the odd one extra after
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in conv.padding]


def _scale_input_channels(layer: nn.Module, scale: Tensor, shift: Tensor) -> None:
    r"""``layer(s·x + t)`` → ``layer'(x)`` for per-input-channel ``s``, ``t`` (float64), in place.

    ``W' = W·s`` along the input-channel axis and ``b' = b + Σ_{c, taps} W·t`` per output
    channel (exact when every output sums over every tap of ``t``: see :func:`_fold_input_norm`).
    Weight layouts: Linear ``(out, in)``; conv ``(out, in/g, *k)`` (input channel
    ``⌊o/(out/g)⌋·in/g + j`` for out channel o); transposed conv ``(in, out/g, *k)``.
    """
    w = layer.weight.detach().to(torch.float64)
    if isinstance(layer, nn.Linear):
        s_w, t_w = scale.view(1, -1), shift.view(1, -1)
        term = (w * t_w).sum(1)
    elif layer.transposed:
        view = [-1] + [1] * (w.dim() - 1)
        s_w, t_w = scale.view(view), shift.view(view)
        per_pair = (w * t_w).flatten(2).sum(2)                     # (in, out/g)
        term = per_pair.view(layer.groups, -1, per_pair.shape[1]).sum(1).reshape(-1)
    else:
        out, in_g, g = w.shape[0], w.shape[1], layer.groups
        view = [out, in_g] + [1] * (w.dim() - 2)

        def per_weight(v: Tensor) -> Tensor:
            return v.view(g, 1, in_g).expand(g, out // g, in_g).reshape(view)

        s_w, t_w = per_weight(scale), per_weight(shift)
        term = (w * t_w).flatten(1).sum(1)
    with torch.no_grad():
        layer.weight.copy_((w * s_w).to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_((layer.bias.detach().to(torch.float64) + term).to(layer.bias.dtype))
        elif bool((term != 0).any()):
            layer.bias = nn.Parameter(term.to(layer.weight.dtype))


def _fold_input_norm(norm: InputNorm, layer: nn.Module) -> nn.Module | None | str:
    r"""Fold an eval-mode InputNorm ``y = s·x + t`` into the ``layer`` it feeds, exactly.

    ``s = γ̂ / sqrt(σ²_run + ε)``, ``t = −μ_run·s``; the norm maps ``x₀ = μ_run`` to 0.

    * ``Linear``, and convs without padding or with ``reflect``/``replicate``/``circular``
      padding (these pad with input values, so they commute with the per-channel map):
      ``W' = W·s``, ``b' = b + Σ W·t``.
    * conv with zero padding (``padding`` ints or ``"same"``): it pads ``y`` with 0, i.e. ``x``
      with ``x₀``, so the norm is replaced by ``ConstantChannelPad(padding, x₀)`` and the conv
      gets ``padding=0`` (and the fold above). When ``t = 0`` the padding is kept as it is.
    * transposed conv: ``W' = W·s`` along its input axis. Its output position j sums
      ``W·t`` over the taps that reach j, which differ at the borders and, for stride > 1,
      between positions. With ``t = 0`` nothing else is needed; with stride 1 padding ``x`` by
      ``x₀`` (``q = d·(k − 1)`` before, ``q + output_padding`` after) and cropping
      ``padding + q`` lets every output see every tap, so ``b' = b + Σ W·t``. Stride > 1
      with ``t ≠ 0`` is not foldable (reason returned).

    Returns the module that takes the norm's place (``None``: nothing), or why it cannot fold.
    Grouped convs are supported.
    """
    scale, shift = (a.to(layer.weight.device) for a in norm.inference_affine())
    fan = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    if fan != scale.numel():
        return (f"the following {type(layer).__name__} takes {fan} input channels, the "
                f"InputNorm has {scale.numel()}")
    has_shift = bool((shift != 0).any())
    replacement: nn.Module | None = None
    new_padding = None
    if isinstance(layer, _ConvNd) and has_shift:
        x0 = norm.running_mean.detach().to(layer.weight.dtype)  # s·x0 + t = 0
        if layer.transposed:
            if any(stride != 1 for stride in layer.stride):
                return (f"{type(layer).__name__} with stride {tuple(layer.stride)}: InputNorm's "
                        f"shift (running mean ≠ 0) reaches its outputs through different numbers "
                        f"of taps, so no bias can take its place")
            extents = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
            if any(extents) or any(layer.output_padding):
                replacement = ConstantChannelPad(
                    [(q, q + op) for q, op in zip(extents, layer.output_padding)], x0)
                new_padding = tuple(p + q for p, q in zip(layer.padding, extents))
        else:
            pads = _conv_input_padding(layer)
            if layer.padding_mode == "zeros" and any(a or b for a, b in pads):
                replacement = ConstantChannelPad(pads, x0)
                new_padding = (0,) * len(pads)
    _scale_input_channels(layer, scale, shift)
    if new_padding is not None:
        layer.padding = new_padding
        if layer.transposed:
            layer.output_padding = (0,) * len(new_padding)
    return replacement


def _fuse_input_norms(model: nn.Module, report: FuseReport) -> None:
    """Fold every eval-mode InputNorm into the conv/linear that alone receives its output."""
    counts = _use_counts(model)
    norms = [(p, m) for p, m in model.named_modules() if isinstance(m, InputNorm)]
    for path, norm in norms:
        if counts.get(id(norm), 0) > 1:
            report.kept.append((path, "used at several places in the model"))
            continue
        found = _next_layer(model, path, counts)
        if isinstance(found, str):
            report.kept.append((path, found))
            continue
        into, layer = found
        result = _fold_input_norm(norm, layer)
        if isinstance(result, str):
            report.kept.append((path, result))
            continue
        parent_path, name = _split(path)
        parent = model.get_submodule(parent_path) if parent_path else model
        if result is None and _plain_sequential(parent):
            del parent._modules[name]
        else:
            setattr(parent, name, nn.Identity() if result is None else result)
        report.folded.append((path, into))
        if result is not None:
            report.notes.append(f"{path}: replaced by {result!r} (the value InputNorm maps to 0) "
                                f"and {into} pads no more")


def _fuse_sequential(seq: nn.Sequential, prefix: str, report: FuseReport) -> None:
    items = list(seq._modules.items())
    kept: list[tuple[str, nn.Module]] = []
    i = 0
    while i < len(items):
        name, mod = items[i]
        nxt = items[i + 1] if i + 1 < len(items) else None
        post = _post_norm(nxt[1]) if nxt is not None else None
        if post is not None and _foldable_linear(mod) and _fold_after(mod, post[0]):
            report.folded.append((_join(prefix, nxt[0]), _join(prefix, name)))
            kept.append((name, mod))
            if post[1] is not None:
                kept.append((nxt[0], post[1]))
            i += 2
            continue
        kept.append((name, mod))
        i += 1
    seq._modules = OrderedDict(kept)


def _fuse_attributes(parent: nn.Module, prefix: str, report: FuseReport) -> None:
    children = dict(parent.named_children())
    foldable = {n for n, c in children.items() if _post_norm(c)}
    if not foldable:
        return
    try:
        graph = _shallow_graph(parent)
    except Exception as exc:  # noqa: BLE001 - tracing failures are reported
        for name in sorted(foldable):
            report.kept.append((_join(prefix, name), f"{type(parent).__name__}.forward is "
                                f"not traceable ({type(exc).__name__})"))
        return
    calls = _module_calls(graph)
    for target, nodes in calls.items():
        post = _post_norm(parent.get_submodule(target))
        if not post or len(nodes) != 1:
            continue
        src = nodes[0].args[0] if nodes[0].args else None
        ok = (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
              and len(calls.get(src.target, [])) == 1
              and _foldable_linear(parent.get_submodule(src.target))
              and _fold_after(parent.get_submodule(src.target), post[0]))
        if ok:
            _set_submodule(parent, target, post[1] if post[1] is not None else nn.Identity())
            report.folded.append((_join(prefix, target), _join(prefix, str(src.target))))


def fuse_for_inference(model: nn.Module, *, return_report: bool = False):
    """A copy of ``model`` in eval mode with batch norms folded into the adjacent conv/linear.

    Folds (exact in real arithmetic; float64 during folding, outputs equal within ~1e-6
    relative in float32, ~1e-15 in float64):

    * eval-mode ``torch.nn.BatchNorm*d``/``SyncBatchNorm``, FilteredBatchNorm*, BatchRenorm*,
      A1/A2, RBN⁻/IEBN⁻ (all use running statistics in eval, so ``y = s·x + t`` per channel)
      that directly **follow** a ``Conv1d/2d/3d`` or ``Linear`` (``W' = s·W``,
      ``b' = s·b + t``) — also when wrapped in a :class:`~normlab.NormActivation` (which is
      then replaced by its activation). The conv/linear must feed only the norm.
    * an :class:`~normlab.InputNorm` (``s = γ̂/sqrt(σ²_run + ε)``, ``t = −μ_run·s``, no β)
      into the ``Linear``, ``Conv1d/2d/3d`` or ``ConvTranspose1d/2d/3d`` that alone receives
      its output (``W' = W·s`` per input channel, ``b' = b + Σ W·t``; groups supported). The
      layer is found in the same ``nn.Sequential``, as the first leaf of the next nested
      ``nn.Sequential``, after the end of a nested one, or through a module whose (one-level
      ``torch.fx``) forward hands its input to one child alone — e.g.
      ``with_input_norm(resnet)``. Padding: ``reflect``/``replicate``/``circular`` pad with
      input values and commute with ``s·x + t``, so they stay; zero padding pads the
      *normalized* input with 0, i.e. ``x`` with ``μ_run``, so the InputNorm is replaced by a
      :class:`~normlab.ConstantChannelPad` (value ``μ_run``) and the conv's padding set to 0
      (kept as is when ``t = 0``). A transposed conv sums ``W·t`` over the taps that reach
      each output: with stride 1 the same μ-padding (``d·(k−1)`` per side, the conv's padding
      grown by as much) makes that sum whole everywhere; with stride > 1 and ``t ≠ 0`` it
      differs between outputs, so the InputNorm is kept. It is also kept when anything but
      one such layer uses its output (e.g. a ReLU, a residual), or when a module on the way
      is shared; ``report.kept`` says why. ``InputNorm → Linear`` assumes ``(N, features)``
      input.

    Folded norms are removed from ``nn.Sequential`` containers and become ``nn.Identity`` in
    attribute patterns. Layers without running statistics, per-sample norms (GN, LN, IN, FRN,
    ...) and RBN/IEBN (sample-dependent scale) stay in place. ``Linear → BatchNorm1d`` assumes
    ``(N, features)`` input. Post-norms are folded only into a conv/linear in the same
    ``nn.Sequential`` or attribute pattern (not across nested containers).

    Args:
        model: any ``nn.Module``; it is not modified (a deep copy is fused).
        return_report: also return a :class:`FuseReport`.

    Returns:
        the fused model (eval mode), or ``(model, FuseReport)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    fused = copy.deepcopy(model).eval()
    report = FuseReport()
    _fuse_input_norms(fused, report)
    for path, module in list(fused.named_modules()):
        if isinstance(module, nn.Sequential):
            _fuse_sequential(module, path, report)
        elif isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            continue
        elif any(True for _ in module.children()):
            _fuse_attributes(module, path, report)
    done = {p for p, _ in report.folded} | {p for p, _ in report.kept}
    for path, module in fused.named_modules():
        if _eval_affine(module) is not None and path not in done:
            report.kept.append((path, "no directly adjacent conv/linear that feeds only it"))
    return (fused, report) if return_report else fused
