"""Learned-threshold activations from [SK20], usable after any normalization."""

from __future__ import annotations

import torch
from torch import Tensor, fx, nn
from torch.nn.modules import module as torch_module  # torch's registry of global hooks

from .. import functional as F
from ..kernels import Activation
from ._common import channel_view, check_positive_int

__all__ = ["TLU", "AffineTLU", "NormActivation", "make_activation", "ACTIVATIONS",
           "kernel_activation"]


def check_channels(name: str, x: Tensor, num_features: int) -> None:
    """``(N, C, *)`` input with ``C == num_features``, else one clear error."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.shape[1] != num_features:
        raise ValueError(
            f"{name} was built for {num_features} channels at dim 1, got input "
            f"of shape {tuple(x.shape)}"
        )


def channel_tlu(x: Tensor, tau: Tensor) -> Tensor:
    """``max(x, τ_c)`` with τ per channel (dim 1) of an ``(N, C, *)`` tensor."""
    return F.tlu(x, channel_view(tau, x.dim()))


def channel_affine_tlu(x: Tensor, kappa: Tensor, tau: Tensor) -> Tensor:
    """``max(x, κ_c x + τ_c)`` with κ, τ per channel (dim 1) of an ``(N, C, *)`` tensor."""
    nd = x.dim()
    return F.affine_tlu(x, channel_view(kappa, nd), channel_view(tau, nd))


# nodes in torch.fx traces (the rank of a proxy is unknown; see normlab.nn._common)
for _name in ("check_channels", "channel_tlu", "channel_affine_tlu"):
    fx.wrap(_name)


class TLU(nn.Module):
    r"""Thresholded linear unit ``z = max(y, τ)`` with a learned per-channel τ ([SK20] eq. 3).

    τ starts at 0 (so TLU starts as ReLU). Its gradient is eq. 4–5: the part of ``∂ℓ/∂z``
    that ReLU would discard (where ``y < τ``) goes to τ.

    Shape: ``(N, C, *)``. Example: ``nn.Sequential(nn.GroupNorm(8, 64), TLU(64))``.
    """

    def __init__(self, num_features: int, device=None, dtype=None) -> None:
        super().__init__()
        self.num_features = check_positive_int("num_features", num_features)
        self.tau = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.tau)

    def extra_repr(self) -> str:
        return str(self.num_features)

    def forward(self, x: Tensor) -> Tensor:
        check_channels(type(self).__name__, x, self.num_features)
        return channel_tlu(x, self.tau)


class AffineTLU(nn.Module):
    r"""Affine-TLU ``z = max(y, κ y + τ)`` ([SK20] §4.2, Table 5): PReLU and TLU combined.

    κ and τ are learned per channel and start at 0 (ReLU at initialization).

    Shape: ``(N, C, *)``.
    """

    def __init__(self, num_features: int, device=None, dtype=None) -> None:
        super().__init__()
        self.num_features = check_positive_int("num_features", num_features)
        self.kappa = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        self.tau = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.kappa)
        nn.init.zeros_(self.tau)

    def extra_repr(self) -> str:
        return str(self.num_features)

    def forward(self, x: Tensor) -> Tensor:
        check_channels(type(self).__name__, x, self.num_features)
        return channel_affine_tlu(x, self.kappa, self.tau)


ACTIVATIONS = ("tlu", "affine_tlu", "relu", "none")


def make_activation(name: str | None, num_features: int, device=None, dtype=None) -> nn.Module | None:
    """Build the activation a norm carries: ``"tlu"``, ``"affine_tlu"``, ``"relu"`` or ``"none"``."""
    if name is None or name == "none":
        return None
    if name == "tlu":
        return TLU(num_features, device=device, dtype=dtype)
    if name == "affine_tlu":
        return AffineTLU(num_features, device=device, dtype=dtype)
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"activation must be one of {ACTIVATIONS} (or None), got {name!r}")


def kernel_activation(act: nn.Module | None
                      ) -> tuple[Activation, Tensor | None, Tensor | None] | None:
    """The activation of normlab's kernels that computes ``act`` — ``(Activation, τ, κ)`` —
    for ``None`` (``Activation.NONE``), ``nn.ReLU``, :class:`TLU` and :class:`AffineTLU`;
    ``None`` for any other module (or one with hooks, which a fused call would skip)."""
    if act is None:
        return Activation.NONE, None, None
    if _hooked(act):
        return None
    if type(act) is nn.ReLU:
        return Activation.RELU, None, None
    if type(act) is TLU:
        return Activation.TLU, act.tau, None
    if type(act) is AffineTLU:
        return Activation.AFFINE_TLU, act.tau, act.kappa
    return None


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own or global forward hooks)."""
    return bool(module._forward_hooks or module._forward_pre_hooks
                or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks)


class NormActivation(nn.Module):
    """A normalization followed by an activation: ``act(norm(x))``.

    What :func:`normlab.create_norm` returns for specs with ``act=...`` (e.g. ``"bn:act=tlu"``)
    and :func:`normlab.create_norm_act` for ``conv → norm → ReLU`` blocks. The norm stays
    reachable as ``.norm`` (for ``state_dict`` keys ``norm.weight``, ``act.tau``, ...).

    A normlab batch norm (filtered BN, batch renorm) followed by ``nn.ReLU``, :class:`TLU` or
    :class:`AffineTLU` runs as ONE kernel call with the activation fused
    (``norm.forward_with_activation``): the same values, no separate activation pass, and
    under ``torch.compile`` no activation mask saved between the two. Hooks on ``norm`` or
    ``act`` turn the fusion off (they see what they would see unfused).
    """

    def __init__(self, norm: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        fused = getattr(self.norm, "forward_with_activation", None)
        if fused is not None and not _hooked(self.norm):
            return fused(x, self.act)
        return self.act(self.norm(x))
