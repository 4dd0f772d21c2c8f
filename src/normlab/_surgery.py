"""Small helpers shared by :mod:`normlab.convert` and :mod:`normlab.fuse`: module paths and a
one-level ``torch.fx`` trace of a module's own ``forward`` (children stay leaves)."""

from __future__ import annotations

import torch
from torch import fx, nn

__all__: list[str] = []


def _refuse_torchscript(model: nn.Module, what: str) -> None:
    """``TypeError`` if ``model`` is, or holds, a TorchScript module: its forward is compiled
    code that neither swapping children nor changing weights' meaning can be checked against,
    so model surgery would do nothing or something silently wrong."""
    for path, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            where = "the model" if not path else f"{path!r} of the model"
            raise TypeError(f"{what} cannot change TorchScript modules ({where} is a "
                            f"{type(module).__name__}); apply it to the nn.Module before "
                            f"torch.jit.script/trace")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition(".")
    return parent, name


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, name = _split(path)
    setattr(root.get_submodule(parent) if parent else root, name, new)


class _ShallowTracer(fx.Tracer):
    """Trace a module's own forward; every child module is a leaf (never traced into)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _shallow_graph(module: nn.Module) -> fx.Graph:
    return _ShallowTracer().trace(module)


def _module_calls(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    return calls
