"""The initialization and update rule of Davis & Frank 2021 [DF21], for any PyTorch model.

* :func:`init_norm_` — every normalization scale γ starts at a value < 1 ([DF21] §3.2,
  e.g. 0.1) and every shift β at 0.
* :func:`param_groups` — optimizer parameter groups: normalization scales get the learning
  rate ``α / c`` ([DF21] §3.2, c = 100) and no weight decay; shifts, biases and the other
  normalization/activation parameters (TLU τ, learnable ε, ...) no weight decay; all other
  weights the full learning rate and weight decay ([DF21] §4.2).
* :func:`fan_in_init_` — Kaiming-normal fan-in for convolutions, fan-in uniform for linear
  layers, biases zero ([DF21] §3.3 eq. 25, §4.1).

Normalization parameters are found by **module type** (``torch.nn`` BatchNorm/SyncBatchNorm/
InstanceNorm (``_NormBase``), GroupNorm, LayerNorm, RMSNorm and every normlab
normalization/activation module), never by parameter-name substrings. Within a norm
module, the scale γ is the parameter ``module.weight`` (and A2's ``gamma0``).

Example::

    model = normlab.init_norm_(normlab.fan_in_init_(model), gamma=0.1)
    opt = torch.optim.SGD(normlab.param_groups(model, lr=0.1, weight_decay=1e-4), momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=180)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .nn.activation import TLU, AffineTLU
from .taxonomy import NORM_TYPES, Tail, classify, is_norm, scale_parameters

__all__ = ["param_groups", "init_norm_", "fan_in_init_", "param_roles", "is_norm_module",
           "NORM_MODULE_TYPES", "ACTIVATION_MODULE_TYPES"]

#: Module types whose ``weight`` is a normalization scale γ (subclasses included): the
#: classes of :mod:`normlab.taxonomy`.
NORM_MODULE_TYPES: tuple[type, ...] = NORM_TYPES
#: Learned activations whose parameters (τ, κ) get no weight decay.
ACTIVATION_MODULE_TYPES: tuple[type, ...] = (TLU, AffineTLU)

ROLE_DECAY, ROLE_NO_DECAY, ROLE_SCALE = "decay", "no_decay", "norm_scale"


def is_norm_module(module: nn.Module) -> bool:
    """True for a normalization layer of any supported type (torch's or normlab's)."""
    return is_norm(module)


def param_roles(model: nn.Module) -> dict[str, str]:
    """``{qualified parameter name: role}`` with role ``"norm_scale"``, ``"no_decay"`` or ``"decay"``.

    * ``norm_scale``: γ of a normalization module (``module.weight``; A2's ``gamma0``).
    * ``no_decay``: every other parameter of a normalization or learned-activation module
      (β, τ, κ, learned ε, RBN/IEBN's w_v, w_b) and the ``bias`` of any other module.
    * ``decay``: everything else (convolution / linear / embedding weights, ...).

    A parameter shared by several modules is listed once, under its first owner.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    roles: dict[str, str] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        norm = is_norm_module(module)
        special = norm or isinstance(module, ACTIVATION_MODULE_TYPES)
        scales = {id(p) for p in scale_parameters(module)} if norm else set()
        for p_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if id(param) in scales:
                roles[full] = ROLE_SCALE
            elif special or param is getattr(module, "bias", None):
                roles[full] = ROLE_NO_DECAY
            else:
                roles[full] = ROLE_DECAY
    return roles


def _check_number(name: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or (value <= 0 if positive else value < 0):
        need = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a number {need}, got {value!r}")
    return float(value)


def param_groups(model: nn.Module, *, lr: float, weight_decay: float,
                 gamma_lr_divisor: float = 100.0,
                 include_frozen: bool = False) -> list[dict[str, Any]]:
    """Optimizer parameter groups implementing the update rule of [DF21] (§3.2, §4.2).

    ======================  ================  ================  ============================
    group ``"name"``        ``lr``            ``weight_decay``  parameters
    ======================  ================  ================  ============================
    ``"decay"``             ``lr``            ``weight_decay``  conv/linear/... weights
    ``"no_decay"``          ``lr``            0                 β, biases, TLU τ, κ, ε, ...
    ``"norm_scale"``        ``lr / c``        0                 normalization scales γ
    ======================  ================  ================  ============================

    ``c = gamma_lr_divisor`` ([DF21] uses 100; 1 gives plain lr). Empty groups are left
    out; each group carries its ``"name"`` key. The dicts work with any ``torch.optim``
    optimizer. LR schedulers scale each group's own ``initial_lr``, so the ratio lr/c is
    kept by multiplicative schedules (StepLR, MultiStepLR, ExponentialLR, LambdaLR,
    CosineAnnealingLR with ``eta_min=0``, ...). Schedules that set absolute values for all
    groups (``OneCycleLR(max_lr=x)``, ``CyclicLR``, a non-zero ``eta_min``) need per-group
    lists, e.g. ``max_lr=[g["lr"] * 10 for g in groups]``.

    Args:
        model: any ``nn.Module``.
        lr: base learning rate α (> 0).
        weight_decay: weight decay for the ``"decay"`` group (>= 0).
        gamma_lr_divisor: c in ``α_γ = α / c`` (> 0).
        include_frozen: also list parameters with ``requires_grad=False`` (default: skip).

    Example:
        >>> opt = torch.optim.SGD(param_groups(model, lr=0.1, weight_decay=1e-4), momentum=0.9)
    """
    lr = _check_number("lr", lr, positive=True)
    weight_decay = _check_number("weight_decay", weight_decay, positive=False)
    divisor = _check_number("gamma_lr_divisor", gamma_lr_divisor, positive=True)
    roles = param_roles(model)
    named = dict(model.named_parameters())
    buckets: dict[str, list[Tensor]] = {ROLE_DECAY: [], ROLE_NO_DECAY: [], ROLE_SCALE: []}
    for name, role in roles.items():
        param = named[name]
        if param.requires_grad or include_frozen:
            buckets[role].append(param)
    settings = {ROLE_DECAY: (lr, weight_decay), ROLE_NO_DECAY: (lr, 0.0),
                ROLE_SCALE: (lr / divisor, 0.0)}
    groups = [{"params": params, "lr": settings[role][0], "weight_decay": settings[role][1],
               "name": role} for role, params in buckets.items() if params]
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters; nothing to "
                         f"optimize (pass include_frozen=True to include frozen ones)")
    return groups


def init_norm_(model: nn.Module, gamma: float = 0.1, *, beta: float = 0.0) -> nn.Module:
    """Set γ = ``gamma`` and β = ``beta`` in every normalization layer of ``model`` ([DF21] §3.2).

    Covers torch's BatchNorm/SyncBatchNorm/InstanceNorm/GroupNorm/LayerNorm/RMSNorm and all of
    normlab's. Special cases: :class:`~normlab.InputNorm` gets ``σ_act · gamma`` ([DF21] §3.4)
    and keeps no shift; A2's γ₀ is reset to 1; RBN/IEBN's w_v, w_b are left alone; modules
    without affine parameters are skipped. normlab modules also remember the value in
    ``gamma_init`` so that ``reset_parameters()`` keeps it. Returns ``model``.
    """
    gamma = _check_number("gamma", gamma, positive=True)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise ValueError(f"beta must be a number, got {beta!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")

    with torch.no_grad():
        for module in model.modules():
            kind = classify(module)
            if kind is None:
                continue
            value = gamma * module.sigma_act if kind.tail is Tail.INPUT else gamma
            if kind.tail is Tail.INPUT:
                module.gamma = gamma
            weight = getattr(module, "weight", None)
            if isinstance(weight, Tensor):
                weight.fill_(value)
                if hasattr(module, "gamma_init"):
                    module.gamma_init = value
            bias = getattr(module, "bias", None)
            if isinstance(bias, Tensor):
                bias.fill_(float(beta))
            if kind.tail is Tail.ALT_SCALE and module.gamma0 is not None:
                module.gamma0.fill_(1.0)
    return model


def fan_in_init_(model: nn.Module, *, nonlinearity: str = "relu") -> nn.Module:
    """The weight initialization of [DF21] (§3.3 eq. 25, §4.1); returns ``model``.

    * ``Conv1d/2d/3d``: Kaiming normal, ``N(0, gain² / fan_in)``, ``mode="fan_in"``.
    * ``Linear``: Kaiming uniform with fan-in, ``U(−b, b)``, ``b = gain · sqrt(3 / fan_in)``.
    * their biases: 0.

    ``gain`` follows ``nonlinearity`` (``"relu"``: √2). Transposed convolutions and other
    layers are left unchanged; normalization layers are handled by :func:`init_norm_`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    valid = ("relu", "leaky_relu", "linear", "tanh", "sigmoid", "selu")
    if nonlinearity not in valid:
        raise ValueError(f"nonlinearity must be one of {valid}, got {nonlinearity!r}")
    for module in model.modules():
        if isinstance(module, _ConvNd) and not module.transposed:
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity=nonlinearity)
        elif isinstance(module, nn.Linear):
            nn.init.kaiming_uniform_(module.weight, mode="fan_in", nonlinearity=nonlinearity)
        else:
            continue
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    return model
