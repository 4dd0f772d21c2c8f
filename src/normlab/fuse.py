"""Fold eval-mode normalization layers into the adjacent convolution / linear layer.

:func:`fuse_for_inference` turns every eval-affine norm (BN and normlab's batch-statistics
norms in eval mode, the prepended InputNorm) into the weights of the conv/linear it feeds or
follows — [DF21]'s "no additional computational cost" at inference made
concrete. Patterns: ``nn.Sequential`` children in order (``[..., conv/linear, bn, ...]`` or
``[..., InputNorm, linear/conv, ...]``, the latter also across nested ``nn.Sequential``
boundaries) and attribute patterns found by tracing a module's own ``forward`` one level
deep with ``torch.fx``. What cannot be folded exactly is kept and reported.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.conv import _ConvNd

from ._surgery import (_join, _module_calls, _refuse_torchscript, _set_submodule,
                       _shallow_graph, _split)
from .fold import fold_after, fold_before
from .nn.activation import NormActivation
from .nn.padding import ConstantChannelPad
from .taxonomy import Tail, classify, eval_affine

__all__ = ["fuse_for_inference", "FuseReport"]


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


def _is_input_norm(module: nn.Module) -> bool:
    kind = classify(module)
    return kind is not None and kind.tail is Tail.INPUT


def _post_norm(module: nn.Module) -> tuple[nn.Module, nn.Module | None] | None:
    """``(norm, what replaces the module after folding)`` for a foldable norm (→ removed) or a
    :class:`NormActivation` around one (→ its activation); ``None`` otherwise."""
    if _is_input_norm(module):
        return None
    if isinstance(module, NormActivation):
        inner = _post_norm(module.norm)
        return (inner[0], module.act) if inner is not None else None
    return (module, None) if eval_affine(module) is not None else None


def _foldable_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        isinstance(module, _ConvNd) and not module.transposed
        and type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d))


def _fold_after(layer: nn.Module, norm: nn.Module) -> bool:
    """``norm(layer(x))`` → ``layer'(x)`` in place (:func:`normlab.fold.fold_after`)."""
    affine = eval_affine(norm)
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if affine is None or affine[0].numel() != out:
        return False
    scale, shift = (a.to(layer.weight.device) for a in affine)
    with torch.no_grad():
        new_weight, new_bias = fold_after(layer.weight, layer.bias, scale, shift)
        layer.weight.copy_(new_weight.to(layer.weight.dtype))
        new_bias = new_bias.to(layer.weight.dtype)
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
    r"""``layer(s·x + t)`` → ``layer'(x)`` in place (:func:`normlab.fold.fold_before`; exact
    when every output sums over every tap of ``t``: see :func:`_fold_input_norm`)."""
    layout = ("linear" if isinstance(layer, nn.Linear)
              else "conv_transpose" if layer.transposed else "conv")
    groups = 1 if layout == "linear" else layer.groups
    new_weight, new_bias = fold_before(layer.weight, layer.bias, scale, shift, layout=layout,
                                       groups=groups)
    with torch.no_grad():
        layer.weight.copy_(new_weight.to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(new_bias.to(layer.bias.dtype))
        elif bool((new_bias != 0).any()):  # no bias: b' is the shift term alone
            layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype))


def _fold_input_norm(norm: nn.Module, layer: nn.Module) -> nn.Module | None | str:
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
    scale, shift = (a.to(layer.weight.device) for a in eval_affine(norm))
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
    norms = [(p, m) for p, m in model.named_modules() if _is_input_norm(m)]
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


def _shared_reason(layer: nn.Module, path: str, parent: nn.Module, counts: dict[int, int]
                   ) -> str | None:
    """Why a norm cannot be folded into ``layer`` (at ``path``, a child of ``parent``) because
    of sharing, or None. Folding rewrites the layer's weights in place, so it is exact only if
    every use of those weights is followed by this norm: the layer must be used exactly where
    its parent is (one slot of the parent, and nowhere else in the model — a parent used at
    several places is fine, each use sees the same fold) and its parameters must belong to it
    alone (no weights tied to another module)."""
    slots = sum(child is layer for child in parent._modules.values())
    if slots > 1 or counts.get(id(layer), 0) > counts.get(id(parent), 1):
        return (f"{path} is used at several places in the model; folding into it would change "
                f"every use")
    for name, param in layer.named_parameters(recurse=False):
        if counts.get(id(param), 0) > counts.get(id(layer), 1):
            return (f"{path}.{name} is shared (tied) with another module; folding into it "
                    f"would change that module too")
    return None


def _fuse_sequential(seq: nn.Sequential, prefix: str, report: FuseReport,
                     counts: dict[int, int]) -> None:
    items = list(seq._modules.items())
    kept: list[tuple[str, nn.Module]] = []
    i = 0
    while i < len(items):
        name, mod = items[i]
        nxt = items[i + 1] if i + 1 < len(items) else None
        post = _post_norm(nxt[1]) if nxt is not None else None
        shared = (_shared_reason(mod, _join(prefix, name), seq, counts)
                  if post is not None and _foldable_linear(mod) else None)
        if shared is not None:
            report.kept.append((_join(prefix, nxt[0]), shared))
        elif post is not None and _foldable_linear(mod) and _fold_after(mod, post[0]):
            report.folded.append((_join(prefix, nxt[0]), _join(prefix, name)))
            kept.append((name, mod))
            if post[1] is not None:
                kept.append((nxt[0], post[1]))
            i += 2
            continue
        kept.append((name, mod))
        i += 1
    seq._modules = OrderedDict(kept)


def _fuse_attributes(parent: nn.Module, prefix: str, report: FuseReport,
                     counts: dict[int, int]) -> None:
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
    attributes = [str(n.target) for n in graph.nodes if n.op == "get_attr"]
    for target, nodes in calls.items():
        post = _post_norm(parent.get_submodule(target))
        if not post or len(nodes) != 1:
            continue
        src = nodes[0].args[0] if nodes[0].args else None
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                and len(calls.get(src.target, [])) == 1
                and _foldable_linear(parent.get_submodule(src.target))):
            continue
        layer_path = _join(prefix, str(src.target))
        shared = _shared_reason(parent.get_submodule(src.target), layer_path, parent, counts)
        if shared is None and any(a.startswith(f"{src.target}.") for a in attributes):
            shared = (f"{type(parent).__name__}.forward also uses the parameters of "
                      f"{layer_path} directly; folding would change that use")
        if shared is not None:
            report.kept.append((_join(prefix, target), shared))
            continue
        ok = _fold_after(parent.get_submodule(src.target), post[0])
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
    _refuse_torchscript(model, "fuse_for_inference")
    fused = copy.deepcopy(model).eval()
    report = FuseReport()
    _fuse_input_norms(fused, report)
    counts = _use_counts(fused)
    for path, module in list(fused.named_modules()):
        if isinstance(module, nn.Sequential):
            _fuse_sequential(module, path, report, counts)
        elif isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            continue
        elif any(True for _ in module.children()):
            _fuse_attributes(module, path, report, counts)
    done = {p for p, _ in report.folded} | {p for p, _ in report.kept}
    for path, module in fused.named_modules():
        if eval_affine(module) is not None and path not in done:
            report.kept.append((path, "no directly adjacent conv/linear that feeds only it"))
    return (fused, report) if return_report else fused
