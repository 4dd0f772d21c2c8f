"""Distribution shape around a nonlinearity: ``Wu + b`` versus ``u`` ([IS15] §3.2).

Ioffe & Szegedy 2015 [IS15] §3.2 (arXiv 1502.03167) normalizes ``x = Wu + b``
rather than the layer input ``u`` because ``Wu + b`` "is more likely to have a symmetric,
non-sparse distribution, that is 'more Gaussian'", while ``u`` — the output of a
nonlinearity — changes shape during training. A comment asks to "plot the distribution of
the pre-activations after BN during training to see if this actually holds". For a
normalization layer this module captures, on the same batch:

* ``pre`` — the layer's input (``Wu + b``);
* ``normalized`` — its ``x̂`` (before γ, β);
* ``post`` — the output of the nonlinearity that follows (``u`` of the next layer),

and reports skewness, excess kurtosis (both 0 for a Gaussian), the fraction of exact zeros
(sparsity) and a histogram of each.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..nn.activation import TLU, AffineTLU, NormActivation
from ..nn.response import GroupFilterResponseNorm
from .recorder import find_norm_layers, norm_parts, paused
from .stats import _as_flat_float64, excess_kurtosis, histogram, skewness

__all__ = ["ACTIVATION_TYPES", "shape_stats", "find_activation_after", "distribution_shapes"]

#: Modules treated as "the nonlinearity after a norm".
ACTIVATION_TYPES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Sigmoid, nn.Softplus, TLU, AffineTLU,
)


def shape_stats(values: Tensor, *, bins: int = 80, max_values: int = 200_000,
                seed: int = 0) -> dict[str, Any]:
    """``n, mean, std, skewness, excess_kurtosis, zero_fraction`` (all values) and a histogram
    (of at most ``max_values`` values drawn uniformly without replacement)."""
    flat = _as_flat_float64(values)
    n = flat.numel()
    sample = flat
    if n > max_values:
        gen = torch.Generator().manual_seed(seed)
        sample = flat[torch.randperm(n, generator=gen)[:max_values]]
    return {
        "n": n,
        "mean": float(flat.mean()),
        "std": float(flat.std(correction=0)),
        "skewness": skewness(flat),
        "excess_kurtosis": excess_kurtosis(flat),
        "zero_fraction": float((flat == 0).double().mean()),
        "histogram": histogram(sample, bins=bins),
    }


def find_activation_after(model: nn.Module, norm_name: str) -> tuple[str, nn.Module] | None:
    """The nonlinearity applied to the output of layer ``norm_name``, if it can be found.

    FRN-family layers with a built-in activation → the layer itself; inside a
    :class:`~normlab.nn.NormActivation` → its ``act``; inside an ``nn.Sequential`` → the next
    sibling if it is an activation (see :data:`ACTIVATION_TYPES`). Otherwise ``None``
    (functional activations in ``forward`` are invisible to hooks).
    """
    modules = dict(model.named_modules())
    if norm_name not in modules:
        raise ValueError(f"no module named {norm_name!r} in {type(model).__name__}")
    module = modules[norm_name]
    if isinstance(module, GroupFilterResponseNorm) and module.activation != "none":
        return norm_name, module
    parent_name, _, child = norm_name.rpartition(".")
    parent = modules[parent_name] if parent_name else model
    if parent is module:
        return None
    prefix = f"{parent_name}." if parent_name else ""
    if isinstance(parent, NormActivation) and child == "norm":
        return (f"{prefix}act", parent.act) if isinstance(parent.act, nn.Module) else None
    if isinstance(parent, nn.Sequential):
        names = [n for n, _ in parent.named_children()]
        i = names.index(child)
        if i + 1 < len(names):
            nxt = getattr(parent, names[i + 1])
            if isinstance(nxt, ACTIVATION_TYPES):
                return f"{prefix}{names[i + 1]}", nxt
            if isinstance(nxt, NormActivation):
                return None
    return None


def distribution_shapes(model: nn.Module, inputs: Tensor, *, layers: Sequence[str] | None = None,
                        bins: int = 80, max_values: int = 200_000) -> dict[str, dict[str, Any]]:
    """Shape of ``pre`` (= Wu+b), ``normalized`` (x̂) and ``post`` (= u) for each norm layer.

    Runs ``model(inputs)`` once under ``no_grad`` in its current mode; in training mode the
    buffers (running statistics) are restored afterwards. ``post`` is missing for layers
    whose following nonlinearity is not found by :func:`find_activation_after`.
    """
    norms = find_norm_layers(model)
    names = list(norms) if layers is None else list(layers)
    missing = [n for n in names if n not in norms]
    if missing:
        raise ValueError(f"no normalization layer named {missing}; the model has {list(norms)}")
    captured: dict[str, dict[str, Tensor]] = {n: {} for n in names}
    handles = []

    def norm_hook(name):
        def hook(module, args, output):
            if name in captured and "pre" not in captured[name]:
                captured[name]["pre"] = args[0].detach().clone()
                captured[name]["normalized"] = norm_parts(module, args[0]).xhat.clone()
        return hook

    def act_hook(name):
        def hook(module, args, output):
            if "post" not in captured[name] and isinstance(output, Tensor):
                captured[name]["post"] = output.detach().clone()
        return hook

    for name in names:
        handles.append(norms[name].register_forward_hook(norm_hook(name)))
        act = find_activation_after(model, name)
        if act is not None:
            handles.append(act[1].register_forward_hook(act_hook(name)))
    buffers = ({k: b.detach().clone() for k, b in model.named_buffers()} if model.training else {})
    try:
        with torch.no_grad(), paused():
            model(inputs)
    finally:
        for h in handles:
            h.remove()
        if buffers:
            named = dict(model.named_buffers())
            with torch.no_grad():
                for k, b in buffers.items():
                    named[k].copy_(b)
    return {name: {part: shape_stats(t, bins=bins, max_values=max_values)
                   for part, t in captured[name].items()} for name in names if captured[name]}
