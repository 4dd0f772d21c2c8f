"""Model surgery: swap the normalization layers of any model, and fold them for inference.

:func:`convert` replaces every normalization layer of the chosen types in an ``nn.Module``
by the layer a registry spec names (``"fbn:threshold=2"``, ``"gn:groups=8"``, ``"frn"``, ...),
keeping what means the same thing in both layers. :func:`fuse_for_inference` folds eval-mode
batch norms into the adjacent convolution / linear layer, the revisiting-BN seed's "no
additional computational cost" at inference made concrete.

Supported patterns (both functions):

* ``nn.Sequential`` children in order: ``[..., norm, nn.ReLU, ...]`` (convert) and
  ``[..., conv/linear, bn, ...]`` or ``[..., InputNorm, linear/conv, ...]`` (fuse).
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
from .nn.alternatives import _TailBatchNorm
from .nn.batch import _BatchStatsNorm
from .nn.group import FilteredGroupNorm, FilteredLayerNorm, _FilteredInstanceNorm
from .nn.input_norm import InputNorm
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

    Attributes:
        spec: the target spec.
        replaced: ``(path, old type, new type)`` per converted layer.
        unconverted: ``(path, type, reason)`` per layer of an included type left in place.
        activations_removed: ``(path, how)`` per ReLU made redundant by a spec's own activation.
        notes: other facts worth knowing (weights not copied, activations kept, ...).
    """

    spec: str
    replaced: list[tuple[str, str, str]] = field(default_factory=list)
    unconverted: list[tuple[str, str, str]] = field(default_factory=list)
    activations_removed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"convert to {self.spec!r}: {len(self.replaced)} replaced, "
                 f"{len(self.unconverted)} unconverted, "
                 f"{len(self.activations_removed)} activations removed"]
        lines += [f"  replaced    {p or '<root>'}: {a} -> {b}" for p, a, b in self.replaced]
        lines += [f"  UNCONVERTED {p or '<root>'} ({t}): {r}" for p, t, r in self.unconverted]
        lines += [f"  removed     {p}: {h}" for p, h in self.activations_removed]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class FuseReport:
    """What :func:`fuse_for_inference` folded (``(norm path, into path)``) and what it kept."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fused {len(self.folded)} normalization layers"]
        lines += [f"  folded {a} into {b}" for a, b in self.folded]
        lines += [f"  kept   {a}: {r}" for a, r in self.kept]
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


def _standard_affine(module: nn.Module) -> bool:
    """``y = γ x̂ + β`` with per-channel γ, β (so weights can be copied one to one)."""
    return not isinstance(module, (_TailBatchNorm, InputNorm))


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
    """The replacement for ``src`` (weights copied where meaningful) or a reason string."""
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
        core = new
    else:
        if channels is None:
            return "cannot tell the number of channels (no num_features / num_channels)"
        overrides: dict[str, Any] = {}
        if act_none:
            overrides["act"] = "none"
        probe = create_norm(spec, channels, dim=dim, **overrides)
        probe_core = probe.norm if isinstance(probe, NormActivation) else probe
        inherit: dict[str, Any] = {}
        if getattr(src, "affine", True) is False or getattr(src, "weight", 0) is None:
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
        core = new.norm if isinstance(new, NormActivation) else new
    _copy_state(src, core, report, path)
    src_act = getattr(src, "activation", "none") if isinstance(src, GroupFilterResponseNorm) \
        else "none"
    if src_act != "none" and spec_activation(spec) is None:
        act = _carry_activation(src)
        new = NormActivation(new, act) if not isinstance(new, NormActivation) else new
        report.notes.append(f"{path or '<root>'}: the old layer applied {src_act!r} itself; it is "
                            f"kept after the new layer (NormActivation)")
    return new


def _copy_state(src: nn.Module, dst: nn.Module, report: ConversionReport, path: str) -> None:
    copied = []
    with torch.no_grad():
        if _standard_affine(src) and _standard_affine(dst):
            for attr in ("weight", "bias"):
                s, d = getattr(src, attr, None), getattr(dst, attr, None)
                if isinstance(s, Tensor) and isinstance(d, Tensor) and s.shape == d.shape:
                    d.copy_(s)
                    copied.append(attr)
                elif isinstance(s, Tensor):
                    report.notes.append(f"{path or '<root>'}: {attr} not copied (the new layer "
                                        f"has {'none' if d is None else tuple(d.shape)})")
        elif getattr(src, "weight", None) is not None:
            report.notes.append(f"{path or '<root>'}: affine parameters not copied "
                                f"({type(src).__name__} -> {type(dst).__name__} parametrize the "
                                f"scale differently); the new layer starts from its init")
        if _family(src) == _family(dst) and _family(src) in ("batch", "instance"):
            for attr in ("running_mean", "running_var", "num_batches_tracked"):
                s, d = getattr(src, attr, None), getattr(dst, attr, None)
                if isinstance(s, Tensor) and isinstance(d, Tensor) and s.shape == d.shape:
                    d.copy_(s)
                    copied.append(attr)
        if isinstance(src, GroupFilterResponseNorm) and isinstance(dst, GroupFilterResponseNorm):
            for attr in ("tau", "kappa", "learned_eps"):
                s, d = getattr(src, attr, None), getattr(dst, attr, None)
                if isinstance(s, Tensor) and isinstance(d, Tensor) and s.shape == d.shape:
                    d.copy_(s)
                    copied.append(attr)


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
    ``track_running_stats``/``affine`` are kept unless the spec sets them), the old ``weight``
    and ``bias`` (when both layers use ``y = γ x̂ + β`` per channel), the running statistics
    (when both are batch norms, or both instance norms), FRN's τ/κ/learned ε (FRN → FRN), the
    old layer's device, dtype and train/eval mode. torch ``LayerNorm`` (trailing dims) is
    replaced only by ``"ln"``/``"fln"`` specs (as :class:`~normlab.FilteredLayerNorm`).
    An old FRN's own TLU is kept after a new layer that has no activation.

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
        ref = _reference_tensor(src)
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype)
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


def _fold_before(norm: nn.Module, layer: nn.Module) -> bool:
    """``layer(norm(x))`` → ``layer'(x)`` for an InputNorm: W' = W·s (per input channel).

    Exact only without zero padding (padding happens after normalization), so convolutions
    with padding or groups are not folded.
    """
    affine = _eval_affine(norm)
    if affine is None:
        return False
    if isinstance(layer, _ConvNd):
        pad = layer.padding
        if layer.groups != 1 or (pad != "valid" and (isinstance(pad, str) or any(pad))):
            return False
        fan = layer.in_channels
    else:
        fan = layer.in_features
    if affine[0].numel() != fan:
        return False
    scale, shift = (a.to(layer.weight.device) for a in affine)
    with torch.no_grad():
        w = layer.weight.to(torch.float64)
        view = [1, -1] + [1] * (w.dim() - 2)
        b = layer.bias.to(torch.float64) if layer.bias is not None else torch.zeros(
            w.shape[0], dtype=torch.float64, device=w.device)
        new_bias = b + (w * shift.view(view)).flatten(1).sum(1)
        layer.weight.copy_((w * scale.view(view)).to(layer.weight.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype))
        else:
            layer.bias.copy_(new_bias.to(layer.bias.dtype))
    return True


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
        if nxt is not None and isinstance(mod, InputNorm) and _foldable_linear(nxt[1]) \
                and _fold_before(mod, nxt[1]):
            report.folded.append((_join(prefix, name), _join(prefix, nxt[0])))
            i += 1
            continue
        kept.append((name, mod))
        i += 1
    seq._modules = OrderedDict(kept)


def _fuse_attributes(parent: nn.Module, prefix: str, report: FuseReport) -> None:
    children = dict(parent.named_children())
    foldable = {n for n, c in children.items() if isinstance(c, InputNorm) or _post_norm(c)}
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
        module = parent.get_submodule(target)
        post = _post_norm(module)
        if not (isinstance(module, InputNorm) or post) or len(nodes) != 1:
            continue
        node = nodes[0]
        replacement: nn.Module = nn.Identity()
        if isinstance(module, InputNorm):
            users = list(node.users)
            ok = (len(users) == 1 and users[0].op == "call_module"
                  and len(calls.get(users[0].target, [])) == 1
                  and _foldable_linear(parent.get_submodule(users[0].target))
                  and _fold_before(module, parent.get_submodule(users[0].target)))
            into = users[0].target if users else ""
        else:
            src = node.args[0] if node.args else None
            ok = (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                  and len(calls.get(src.target, [])) == 1
                  and _foldable_linear(parent.get_submodule(src.target))
                  and _fold_after(parent.get_submodule(src.target), post[0]))
            into = src.target if isinstance(src, fx.Node) else ""
            if post[1] is not None:
                replacement = post[1]
        if ok:
            _set_submodule(parent, target, replacement)
            report.folded.append((_join(prefix, target), _join(prefix, str(into))))


def fuse_for_inference(model: nn.Module, *, return_report: bool = False):
    """A copy of ``model`` in eval mode with batch norms folded into the adjacent conv/linear.

    Folds (exact in real arithmetic; float64 during folding, outputs equal within ~1e-6
    relative): eval-mode ``torch.nn.BatchNorm*d``/``SyncBatchNorm``, FilteredBatchNorm*,
    BatchRenorm*, A1/A2, RBN⁻/IEBN⁻ (all use running statistics in eval, so
    ``y = s·x + t`` per channel) that directly **follow** a ``Conv1d/2d/3d`` or ``Linear``
    (``W' = s·W``, ``b' = s·b + t``) — also when wrapped in a :class:`~normlab.NormActivation`
    (which is then replaced by its activation) — and an :class:`~normlab.InputNorm` that directly
    **precedes** a ``Linear`` or an unpadded, ungrouped conv (``W' = W·s``,
    ``b' = b + Σ W·t``; with zero padding the fold would not be exact, so it is kept).
    Folded norms are removed from ``nn.Sequential`` containers and become ``nn.Identity`` in
    attribute patterns. Layers without running statistics, per-sample norms (GN, LN, IN, FRN,
    ...) and RBN/IEBN (sample-dependent scale) stay in place. ``Linear → BatchNorm1d`` assumes
    ``(N, features)`` input. The conv/linear must feed only the norm.

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
    for path, module in list(fused.named_modules()):
        if isinstance(module, nn.Sequential):
            _fuse_sequential(module, path, report)
        elif isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            continue
        elif any(True for _ in module.children()):
            _fuse_attributes(module, path, report)
    folded = {p for p, _ in report.folded}
    for path, module in fused.named_modules():
        if _eval_affine(module) is not None and path not in folded:
            report.kept.append((path, "no directly adjacent conv/linear that feeds only it"))
    return (fused, report) if return_report else fused
