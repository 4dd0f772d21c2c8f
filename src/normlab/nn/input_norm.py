"""BN-based input normalization ([DF21] §3.4) and the two traditional ones.

[DF21] prepends a batch norm to the network that normalizes the raw input online. Its
scale starts at ``γ̂ = σ_act · γ`` — σ_act is the standard deviation of the network's
activation applied to a unit Gaussian (``sqrt(1/2 − 1/(2π)) ≈ 0.5838`` for ReLU) — so the
first layer sees the same input variance ``σ_act² γ²`` as every later layer ([DF21] eq. 23),
and it has **no shift** (nothing but a linear layer follows, so β is unnecessary).

[DF21] compares it with two traditional transforms ``(x − μ) / σ``:

* **fixed** (:class:`FixedInputNorm`): μ = σ = half the range of the data type (128 for
  8-bit images);
* **offline** (:class:`OfflineInputNorm`): per-channel dataset statistics computed once.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as TF
from torch import Tensor, fx, nn

from ._common import check_positive_int
from .batch import _FilteredBatchNorm

__all__ = [
    "InputNorm",
    "FixedInputNorm",
    "OfflineInputNorm",
    "with_input_norm",
    "activation_std",
    "ACTIVATION_FUNCTIONS",
]

#: Activations :func:`activation_std` knows by name (float64 torch functions).
ACTIVATION_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda z: z,
    "relu": torch.relu,
    "leaky_relu": lambda z: TF.leaky_relu(z, 0.01),  # torch's default negative slope
    "elu": TF.elu,
    "selu": TF.selu,
    "gelu": TF.gelu,  # exact (erf) GELU
    "gelu_tanh": lambda z: TF.gelu(z, approximate="tanh"),
    "silu": TF.silu,
    "swish": TF.silu,
    "mish": TF.mish,
    "softplus": TF.softplus,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu6": TF.relu6,
    "hardswish": TF.hardswish,
}

_MODULE_NAMES = {
    nn.Identity: "identity", nn.ReLU: "relu", nn.ELU: None, nn.SELU: "selu", nn.GELU: None,
    nn.SiLU: "silu", nn.Mish: "mish", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.ReLU6: "relu6",
    nn.Hardswish: "hardswish",
}

_STD_CACHE: dict[str, float] = {}
_QUAD_LIMIT = 14  # φ(14) ≈ 1e-43: the Gaussian tails beyond carry nothing in float64
_QUAD_ORDER = 48


def _gaussian_moments(fn: Callable[[Tensor], Tensor]) -> tuple[float, float]:
    """``(E[f(Z)], E[f(Z)²])`` for ``Z ~ N(0, 1)`` by composite Gauss–Legendre quadrature.

    A 48-point Gauss–Legendre rule on each unit interval ``[k, k+1]`` of ``[−14, 14]``:
    activations whose kinks sit at integers (ReLU, leaky ReLU, ELU at 0; ReLU6 at 0 and 6;
    hardswish at ±3) are smooth on every piece, so the result is exact to float64 rounding.
    """
    nodes, weights = np.polynomial.legendre.leggauss(_QUAD_ORDER)
    starts = np.arange(-_QUAD_LIMIT, _QUAD_LIMIT, dtype=np.float64)[:, None]
    z = torch.from_numpy((starts + 0.5 * (nodes[None, :] + 1.0)).reshape(-1))
    w = torch.from_numpy(np.tile(0.5 * weights, len(starts)))
    w = w * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    with torch.no_grad():
        f = fn(z.to(torch.float64))
    if not isinstance(f, Tensor) or f.shape != z.shape or not torch.isfinite(f).all():
        raise ValueError("the activation must map a float64 tensor elementwise to finite values")
    f = f.to(torch.float64)
    return float((w * f).sum()), float((w * f * f).sum())


def activation_std(activation: str | Callable[[Tensor], Tensor] | nn.Module = "relu") -> float:
    r"""σ_act: the standard deviation of ``activation(Z)`` with ``Z ~ N(0, 1)`` ([DF21] eq. 23).

    ``σ_act² = E[f(Z)²] − E[f(Z)]²``. ReLU has the closed form
    ``sqrt(1/2 − 1/(2π)) = 0.583874…`` ([DF21] §3.3 rounds it to 0.58); the identity gives 1; other
    activations are integrated numerically (composite Gauss–Legendre in float64, error < 1e-12) and
    cached by name.

    Args:
        activation: a name from :data:`ACTIVATION_FUNCTIONS` (``"relu"``, ``"gelu"``,
            ``"silu"``, ``"tanh"``, ``"sigmoid"``, ``"leaky_relu"``, ``"elu"``, ...), an
            ``nn.Module`` activation (``nn.GELU()``, ``nn.LeakyReLU(0.2)``, ...), or any
            elementwise callable on float64 tensors (not cached).

    Example:
        >>> round(activation_std("relu"), 4)
        0.5839
    """
    if isinstance(activation, str):
        name = activation.strip().lower()
        if name in ("none", "linear"):
            name = "identity"
        if name not in ACTIVATION_FUNCTIONS:
            raise ValueError(
                f"unknown activation {activation!r}; valid names: "
                f"{', '.join(sorted(ACTIVATION_FUNCTIONS))} (or pass a callable)"
            )
        if name not in _STD_CACHE:
            if name == "relu":
                _STD_CACHE[name] = math.sqrt(0.5 - 1.0 / (2.0 * math.pi))
            elif name == "identity":
                _STD_CACHE[name] = 1.0
            else:
                m1, m2 = _gaussian_moments(ACTIVATION_FUNCTIONS[name])
                _STD_CACHE[name] = math.sqrt(max(m2 - m1 * m1, 0.0))
        return _STD_CACHE[name]
    if isinstance(activation, nn.Module) and type(activation) in _MODULE_NAMES:
        name = _MODULE_NAMES[type(activation)]
        if name is not None:
            return activation_std(name)
    if not callable(activation):
        raise TypeError(
            f"activation must be a name, an nn.Module or a callable, got {activation!r} "
            f"({type(activation).__name__})"
        )
    m1, m2 = _gaussian_moments(activation)
    return math.sqrt(max(m2 - m1 * m1, 0.0))


def _activation_label(activation) -> str:
    if isinstance(activation, str):
        return activation.strip().lower()
    if isinstance(activation, nn.Module):
        return repr(activation)
    return getattr(activation, "__name__", repr(activation))


class InputNorm(_FilteredBatchNorm):
    r"""Batch norm for the raw network input, scale ``σ_act·γ``, no shift ([DF21] §3.4).

    Training: ``y = γ̂ · (x − μ_B) / sqrt(σ_B² + ε)`` per channel with batch moments over
    ``(N, *spatial)`` and running averages like BN (optionally with the filtered-BN robust
    filter via ``threshold``). Eval: ``y = γ̂ · (x − μ_run) / sqrt(σ²_run + ε)`` — a fixed
    per-channel affine map (``torch.nn.functional.batch_norm``), foldable into a following
    linear layer by :func:`normlab.fuse_for_inference`. ``γ̂`` (parameter ``weight``) starts at
    ``σ_act · γ`` where σ_act = :func:`activation_std` of the network's activation (0.5838 for
    ReLU). There is no ``bias`` parameter (β fixed at 0; ``self.bias is None``).

    :func:`normlab.convert` into an InputNorm carries the old γ into ``weight`` and the running
    statistics, and drops β (reported): the eval output is the old layer's minus β.
    :func:`normlab.fuse_for_inference` folds it into the following linear/conv/transposed conv;
    before a zero-padded conv it leaves a :class:`~normlab.ConstantChannelPad` padding with
    ``μ_run`` (the value it maps to 0), which keeps the fold exact at the borders.

    Args:
        num_channels: input channels (3 for RGB).
        activation: the activation the *rest* of the network uses (name, module or callable).
        gamma: the γ initialization used for the network's other norms ([DF21] §3.2).
        eps, momentum: as ``torch.nn.BatchNorm2d``.
        threshold: robust filter ([HA20]); default ``None`` = plain BN as [DF21].
        device, dtype: factory kwargs.

    Shape: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``.

    Example:
        >>> norm = InputNorm(3, activation="relu", gamma=0.1)
        >>> round(norm.weight[0].item(), 5)
        0.05839
    """

    _allowed_dims = (2, 3, 4, 5)

    def __init__(self, num_channels: int, *, activation="relu", gamma: float = 1.0,
                 eps: float = 1e-5, momentum: float | None = 0.1,
                 threshold: float | None = None, device=None, dtype=None) -> None:
        check_positive_int("num_channels", num_channels)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
            raise ValueError(f"gamma must be a number > 0 ([DF21] §3.2 uses (0, 1]), got {gamma!r}")
        sigma_act = activation_std(activation)
        super().__init__(num_channels, eps, momentum, True, True, device, dtype,
                         bias=False,  # no shift ([DF21] §3.4)
                         threshold=threshold, gamma_init=sigma_act * float(gamma))
        self.activation = _activation_label(activation)
        self.sigma_act = sigma_act
        self.gamma = float(gamma)

    @property
    def num_channels(self) -> int:
        return self.num_features

    def extra_repr(self) -> str:
        return (f"{self.num_features}, activation={self.activation!r}, gamma={self.gamma}, "
                f"sigma_act={self.sigma_act:.4f}, eps={self.eps}, momentum={self.momentum}, "
                f"threshold={self.threshold}")

    @torch.no_grad()
    def inference_affine(self) -> tuple[Tensor, Tensor]:
        """``(scale, shift)`` per channel with ``eval_output = scale·x + shift`` (float64)."""
        from ..taxonomy import eval_affine  # lazy: taxonomy imports this module

        return eval_affine(self)


def standardize_channels(name: str, x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``(x − μ_c) / σ_c`` per channel (dim 1); integer input is cast to float32."""
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"{name} expects an (N, C, *) tensor, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if mean.numel() not in (1, x.shape[1]):
        raise ValueError(f"{name} has {mean.numel()} channels, the input has {x.shape[1]} "
                         f"(shape {tuple(x.shape)})")
    dtype = x.dtype if x.is_floating_point() else mean.dtype
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x.to(dtype) - mean.to(dtype).view(shape)) / std.to(dtype).view(shape)


fx.wrap("standardize_channels")  # a node in torch.fx traces (see normlab.nn._common)


class _AffineInputTransform(nn.Module):
    """``y = (x − μ) / σ`` per channel with fixed buffers ``mean`` and ``std``."""

    def __init__(self, mean: Tensor, std: Tensor, *, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype or torch.float32}
        mean = torch.as_tensor(mean).to(**factory).reshape(-1)
        std = torch.as_tensor(std).to(**factory).reshape(-1)
        if mean.shape != std.shape:
            raise ValueError(f"mean and std need the same number of channels, got "
                             f"{tuple(mean.shape)} and {tuple(std.shape)}")
        if mean.device.type != "meta" and not (std > 0).all():
            raise ValueError(f"std must be > 0 in every channel, got {std.tolist()}")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: Tensor) -> Tensor:
        return standardize_channels(type(self).__name__, x, self.mean, self.std)

    @torch.no_grad()
    def inference_affine(self) -> tuple[Tensor, Tensor]:
        """``(scale, shift)`` with ``output = scale·x + shift`` (float64)."""
        scale = 1.0 / self.std.to(torch.float64)
        return scale, -self.mean.to(torch.float64) * scale

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"


class FixedInputNorm(_AffineInputTransform):
    """The "fixed" input normalization of [DF21] §3.4: μ = σ = half the data type's range.

    For an integer dtype with values in ``[lo, hi]``: ``μ = (lo + hi + 1)/2`` and
    ``σ = (hi − lo + 1)/2`` (uint8: μ = σ = 128, [DF21]'s example). For floating images
    already scaled to ``[0, 1]`` pass ``value_range=(0.0, 1.0)`` (μ = σ = 0.5). Integer inputs
    are cast to float32.

    Example:
        >>> FixedInputNorm(torch.uint8)(torch.tensor([[0, 128, 255]], dtype=torch.uint8))
        tensor([[-1.0000,  0.0000,  0.9922]])
    """

    def __init__(self, data_dtype: torch.dtype = torch.uint8, *,
                 value_range: tuple[float, float] | None = None, device=None,
                 dtype=None) -> None:
        if value_range is not None:
            lo, hi = (float(v) for v in value_range)
            if not hi > lo:
                raise ValueError(f"value_range must be (low, high) with high > low, got {value_range!r}")
            mean, std = 0.5 * (lo + hi), 0.5 * (hi - lo)
        elif isinstance(data_dtype, torch.dtype) and not data_dtype.is_floating_point \
                and data_dtype != torch.bool:
            info = torch.iinfo(data_dtype)
            mean, std = (info.min + info.max + 1) / 2.0, (info.max - info.min + 1) / 2.0
        else:
            raise ValueError(
                f"FixedInputNorm needs an integer data dtype (e.g. torch.uint8) or "
                f"value_range=(low, high), got data_dtype={data_dtype!r}"
            )
        super().__init__(torch.tensor([mean], dtype=torch.float64),
                         torch.tensor([std], dtype=torch.float64), device=device, dtype=dtype)


class OfflineInputNorm(_AffineInputTransform):
    """The "offline" input normalization of [DF21] §3.4: dataset statistics computed once.

    ``y = (x − μ_c) / σ_c`` with per-channel μ_c, σ_c given, or estimated by
    :meth:`from_data` over every value of every batch (float64 accumulation; this equals the
    average of per-batch averages when the batches are the same size).

    Example:
        >>> norm = OfflineInputNorm.from_data([torch.rand(16, 3, 8, 8) for _ in range(4)])
    """

    @classmethod
    def from_data(cls, batches: Iterable, *, max_batches: int | None = None) -> "OfflineInputNorm":
        """Estimate per-channel mean and (population) std from ``(N, C, *)`` batches.

        ``batches`` yields tensors or ``(input, target, ...)`` tuples (a DataLoader works).
        """
        total = total_sq = None
        count = 0
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(x, Tensor) or x.dim() < 2:
                raise ValueError(f"from_data expects (N, C, *) tensors, got "
                                 f"{getattr(x, 'shape', type(x).__name__)}")
            xv = x.detach().to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
            if total is None:
                total, total_sq = xv.sum(1), xv.square().sum(1)
            elif xv.shape[0] != total.shape[0]:
                raise ValueError(f"batches disagree on channels: {total.shape[0]} vs {xv.shape[0]}")
            else:
                total, total_sq = total + xv.sum(1), total_sq + xv.square().sum(1)
            count += xv.shape[1]
        if total is None or count == 0:
            raise ValueError("from_data got no data; pass a non-empty iterable of batches")
        mean = total / count
        std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
        if not (std > 0).all():
            raise ValueError(f"a channel of the data is constant (std {std.tolist()}); "
                             f"offline normalization would divide by zero")
        return cls(mean.float(), std.float())


def with_input_norm(model: nn.Module, num_channels: int, **kwargs) -> nn.Sequential:
    """Prepend an :class:`InputNorm` to ``model``: ``nn.Sequential(input_norm, model)``.

    The result's children are named ``input_norm`` and ``model`` (state_dict keys gain the
    prefix ``model.``). The InputNorm is created on the device/dtype of ``model``'s first
    floating parameter and in its train/eval mode. ``kwargs`` go to :class:`InputNorm`
    (``activation``, ``gamma``, ``eps``, ``momentum``, ``threshold``).

    Example:
        >>> net = with_input_norm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), 3, gamma=0.1)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    ref = next((t for t in list(model.parameters()) + list(model.buffers())
                if t.is_floating_point()), None)
    factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    norm = InputNorm(num_channels, **kwargs, **factory)
    norm.train(model.training)
    return nn.Sequential(OrderedDict(input_norm=norm, model=model))
