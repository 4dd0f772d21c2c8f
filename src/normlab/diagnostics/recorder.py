"""Record the normalized values ``x̂`` (before γ, β) of every normalization layer of a model.

[HA20] measures "the activations in the batch normalization layer before
parameters γ and β were applied" (§II.B, Fig. 1–4). Layers do not expose ``x̂``, so the
recorder **recomputes** it from the layer's input with the layer's own statistics, in a
forward hook — layers are never modified:

* batch norms (``torch.nn.BatchNorm*d``, ``SyncBatchNorm``, normlab's ``FilteredBatchNorm*d``):
  training mode (or no running stats) → the batch moments over ``(N, *spatial)`` — for
  filtered layers the filtered moments ([HA20] eq. 4–7) via
  :func:`normlab.functional.filtered_moments`; eval → the running statistics;
* ``BatchRenorm*d`` (training): ``x̂ = (x − μ_B)/σ_B · r + d`` with r, d from the running
  statistics as they were *before* the forward (captured by a pre-hook); eval → running stats;
* group norms (``GroupNorm``, ``FilteredGroupNorm``), layer norms (``LayerNorm``,
  ``FilteredLayerNorm``, ``RMSNorm``), instance norms (``InstanceNorm*d``,
  ``FilteredInstanceNorm*d``; running stats in eval when tracked);
* FRN family (``FilterResponseNorm*d``, ``GroupFilterResponseNorm``,
  ``LayerFilterResponseNorm``): uncentered ``x̂ = x / sqrt(ν² + ε)`` with ``ε = eps + |ε_l|``.

Memory is bounded: per layer a uniform reservoir sample (quantile bands), a per-channel
reservoir (channel densities, Fig. 3), exact streaming moments (mean, std, skewness,
kurtosis), exact min/max, exact counts of ``|x̂| > k`` per layer and channel, and per channel
the ``top_k`` inputs with the most extreme value (global sample index across batches).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .. import functional as F
from ..taxonomy import classify
from .stats import (
    DEFAULT_QUANTILES,
    DEFAULT_SIGMAS,
    ChannelReservoir,
    ChannelTopK,
    Reservoir,
    RunningMoments,
    _beyond_entry,
    _extreme_per_sample,
    band_name,
    gaussian_expected_count,
)

__all__ = [
    "ActivationRecorder",
    "LayerRecord",
    "NormParts",
    "norm_kind",
    "find_norm_layers",
    "normalized_input",
    "norm_parts",
    "paused",
    "is_paused",
    "record_activations",
]

# ---------------------------------------------------------------------------------------
# Layer classification: normlab.taxonomy's families
# ---------------------------------------------------------------------------------------
def norm_kind(module: nn.Module) -> str | None:
    """``"batch" | "renorm" | "group" | "layer" | "rms" | "instance" | "frn"`` or ``None``
    (the :class:`~normlab.taxonomy.Family` of :func:`normlab.taxonomy.classify`)."""
    kind = classify(module)
    return kind.family.value if kind is not None else None


def find_norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every normalization layer of ``model`` (see :func:`norm_kind`), by qualified name."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return {name or "<root>": m for name, m in model.named_modules() if norm_kind(m) is not None}


# ---------------------------------------------------------------------------------------
# Recomputing x̂
# ---------------------------------------------------------------------------------------
class NormParts(NamedTuple):
    """``xhat``: normalized values, shape of the input; ``inv_std``: per channel, the factor
    ``∂x̂/∂x``'s leading term ``1/sqrt(σ² + ε)`` (averaged over samples/groups for per-sample
    norms; times r for batch renorm); ``channel_dim``: the channel axis of ``xhat``."""

    xhat: Tensor
    inv_std: Tensor
    channel_dim: int


def _threshold(module: nn.Module) -> float | None:
    return getattr(module, "threshold", None)


def _moments(module: nn.Module, xv: Tensor, dims: tuple[int, ...], *, centered: bool = True,
             eps: float | Tensor) -> F.Moments:
    return F.filtered_moments(xv, dims, _threshold(module), centered=centered, eps=eps,
                              gaussian_consistent=bool(getattr(module, "gaussian_consistent", False)))


def _per_channel(rstd_view: Tensor, view_shape: torch.Size, x_shape: torch.Size,
                 channel_dim: int) -> Tensor:
    full = rstd_view.expand(view_shape).reshape(x_shape).movedim(channel_dim, 0)
    return full.reshape(full.shape[0], -1).mean(dim=1)


def norm_parts(module: nn.Module, x: Tensor, *, running: tuple[Tensor, Tensor] | None = None) -> NormParts:
    """Recompute ``x̂`` of ``module`` for input ``x`` with the module's current mode and state.

    Args:
        module: a normalization layer (:func:`norm_kind` not ``None``).
        x: its input.
        running: for ``BatchRenorm`` in training mode, ``(running_mean, running_var)`` as they
            were before the forward (the recorder captures them in a pre-hook); defaults to
            the module's current buffers.

    Computed under ``no_grad`` in the statistics dtype (float32 for half inputs).
    """
    kind = norm_kind(module)
    if kind is None:
        raise TypeError(
            f"{type(module).__name__} is not a normalization layer normlab knows; supported: "
            f"torch BatchNorm/GroupNorm/LayerNorm/InstanceNorm/RMSNorm and normlab's layers"
        )
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    with torch.no_grad():
        x = x.detach()
        if kind in ("batch", "renorm"):
            return _batch_parts(module, kind, x, running)
        if kind in ("group", "frn"):
            n, c = x.shape[:2]
            g = module.num_groups
            xv = x.reshape(n, g, c // g, -1)
            centered = kind == "group"
            eps = module.effective_eps() if kind == "frn" else module.eps
            if isinstance(eps, Tensor):
                eps = eps.detach().to(F.stats_dtype(x.dtype))
            stats = _moments(module, xv, (2, 3), centered=centered, eps=eps)
            rstd = torch.rsqrt(stats.var + eps)
            xhat = ((xv.to(rstd.dtype) - stats.mean) * rstd).view(x.shape)
            return NormParts(xhat, _per_channel(rstd, xv.shape, x.shape, 1), 1)
        if kind in ("layer", "rms"):
            shape = tuple(module.normalized_shape)
            d = math.prod(shape)
            xv = x.reshape(-1, d)
            if kind == "rms":
                eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
                stats = F.moments(xv, (1,), centered=False)
            else:
                eps = module.eps
                stats = _moments(module, xv, (1,), eps=eps)
            rstd = torch.rsqrt(stats.var + eps)
            xhat = ((xv.to(rstd.dtype) - stats.mean) * rstd).view(x.shape)
            cdim = x.dim() - len(shape)
            return NormParts(xhat, _per_channel(rstd, xv.shape, x.shape, cdim), cdim)
        # instance
        unbatched = x.dim() == module._get_no_batch_dim() if hasattr(module, "_get_no_batch_dim") \
            else x.dim() == module._allowed_dims[0]
        xb = x.unsqueeze(0) if unbatched else x
        n, c = xb.shape[:2]
        xv = xb.reshape(n, c, -1)
        if module.training or not module.track_running_stats:
            stats = _moments(module, xv, (2,), eps=module.eps)
            mean, var = stats.mean, stats.var
        else:
            mean = module.running_mean.view(1, c, 1)
            var = module.running_var.view(1, c, 1)
        rstd = torch.rsqrt(var.to(F.stats_dtype(x.dtype)) + module.eps)
        xhat = ((xv.to(rstd.dtype) - mean) * rstd).view(xb.shape)
        inv = _per_channel(rstd, xv.shape, xb.shape, 1)
        if unbatched:
            return NormParts(xhat.squeeze(0), inv, 0)
        return NormParts(xhat, inv, 1)


def _batch_parts(module: nn.Module, kind: str, x: Tensor,
                 running: tuple[Tensor, Tensor] | None) -> NormParts:
    if x.dim() < 2:
        raise ValueError(f"{type(module).__name__} input must be (N, C, *), got shape {tuple(x.shape)}")
    n, c = x.shape[:2]
    xv = x.reshape(n, c, -1)
    dtype = F.stats_dtype(x.dtype)
    batch_stats = module.training or module.running_mean is None
    if batch_stats:
        stats = _moments(module, xv, (0, 2), eps=module.eps)
        mean, var = stats.mean, stats.var
    else:
        mean = module.running_mean.to(dtype).view(1, c, 1)
        var = module.running_var.to(dtype).view(1, c, 1)
    rstd = torch.rsqrt(var + module.eps)
    xhat = (xv.to(dtype) - mean) * rstd
    inv = rstd.reshape(-1)
    if kind == "renorm" and module.training:
        run_mean, run_var = running if running is not None else (module.running_mean, module.running_var)
        r_max, d_max = module.current_limits()
        sigma_batch = (var.reshape(-1) + module.eps).sqrt()
        sigma_run = (run_var.to(dtype) + module.eps).sqrt()
        r = (sigma_batch / sigma_run).clamp(1.0 / r_max, r_max)
        d = ((mean.reshape(-1) - run_mean.to(dtype)) / sigma_run).clamp(-d_max, d_max)
        xhat = xhat * r.view(1, c, 1) + d.view(1, c, 1)
        inv = inv * r
    return NormParts(xhat.view(x.shape), inv, 1)


def normalized_input(module: nn.Module, x: Tensor, **kwargs: Any) -> Tensor:
    """``x̂`` of ``module`` for input ``x`` (see :func:`norm_parts`): ``y = γ x̂ + β``."""
    return norm_parts(module, x, **kwargs).xhat


# ---------------------------------------------------------------------------------------
# Pausing (callbacks that run extra forwards pause all recorders/trackers)
# ---------------------------------------------------------------------------------------
_PAUSE_DEPTH = [0]


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Inside this block no recorder or tracker hook records anything."""
    _PAUSE_DEPTH[0] += 1
    try:
        yield
    finally:
        _PAUSE_DEPTH[0] -= 1


def is_paused() -> bool:
    return _PAUSE_DEPTH[0] > 0


# ---------------------------------------------------------------------------------------
# The recorder
# ---------------------------------------------------------------------------------------
@dataclass
class LayerRecord:
    """Everything recorded for one layer (bounded memory)."""

    name: str
    kind: str
    type_name: str
    channels: int
    sigmas: tuple[float, ...]
    sample_size: int
    channel_sample_size: int
    top_k: int
    generator: torch.Generator
    moments: RunningMoments = field(default_factory=RunningMoments)
    calls: int = 0
    samples_seen: int = 0
    input_shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        k = len(self.sigmas)
        self.beyond = np.zeros(k, dtype=np.int64)
        self.channel_beyond = np.zeros((self.channels, k), dtype=np.int64)
        self.channel_samples_beyond = np.zeros((self.channels, k), dtype=np.int64)
        self.reservoir = Reservoir(self.sample_size, generator=self.generator)
        self.channel_reservoir = (ChannelReservoir(self.channels, self.channel_sample_size,
                                                   generator=self.generator)
                                  if self.channel_sample_size > 0 else None)
        self.topk = ChannelTopK(self.channels, self.top_k)

    def update(self, xhat: Tensor, channel_dim: int, offset: int) -> None:
        v = xhat.detach().float()
        if channel_dim == 0:  # unbatched instance norm input
            v = v.unsqueeze(0)
            channel_dim = 1
        v = v.movedim(channel_dim, 1)
        v = v.reshape(v.shape[0], v.shape[1], -1).cpu()  # (N, C, L)
        self.calls += 1
        self.samples_seen += v.shape[0]
        self.moments.update(v)
        self.reservoir.update(v)
        per_sample = _extreme_per_sample(v)  # (N, C)
        # Values beyond the smallest k are rare: find them once, count the larger k on them.
        k_min = min(self.sigmas)
        far = (v.abs() > k_min).nonzero()  # (M, 3): sample, channel, position
        far_abs = v[far[:, 0], far[:, 1], far[:, 2]].abs()
        for i, k in enumerate(self.sigmas):
            chans = far[far_abs > k, 1]
            per_channel = torch.bincount(chans, minlength=self.channels).numpy()
            self.channel_beyond[:, i] += per_channel
            self.beyond[i] += int(per_channel.sum())
            self.channel_samples_beyond[:, i] += (per_sample.abs() > k).sum(dim=0).numpy()
        if self.channel_reservoir is not None:
            self.channel_reservoir.update(v.transpose(0, 1).reshape(v.shape[1], -1))
        self.topk.update(per_sample, offset)

    # -- read-outs ------------------------------------------------------------------
    def bands(self, quantiles: Sequence[float] = DEFAULT_QUANTILES) -> dict[str, float]:
        """Quantile bands: inner levels from the reservoir sample (exact while fewer than
        ``sample_size`` values were seen), levels 0 and 1 from the exact min and max."""
        if self.moments.n == 0:
            raise ValueError(f"layer {self.name!r} recorded nothing yet; run the model first")
        vals = self.reservoir.values.double().numpy()
        out = {}
        for q in quantiles:
            if q == 0.0:
                out[band_name(q)] = self.moments.min
            elif q == 1.0:
                out[band_name(q)] = self.moments.max
            else:
                out[band_name(q)] = float(np.quantile(vals, q))
        return out

    def channel_values(self, channel: int) -> Tensor:
        """The reservoir sample of one channel's values (all of them while few were seen)."""
        if self.channel_reservoir is None:
            raise ValueError("channel_sample_size=0: per-channel samples were not kept")
        if not 0 <= channel < self.channels:
            raise ValueError(f"channel must be in [0, {self.channels}), got {channel!r}")
        return self.channel_reservoir.values(channel)

    def summary(self, quantiles: Sequence[float] = DEFAULT_QUANTILES, top_channels: int = 5) -> dict:
        """JSON-ready statistics of this layer (see :func:`normlab.diagnostics.stats.summarize`)."""
        n = self.moments.n
        beyond = {k: _beyond_entry(int(c), n, k) for k, c in zip(self.sigmas, self.beyond)}
        # rank channels by the largest k that any value exceeded (e.g. 14σ, else 7σ, else 4σ)
        hit = [i for i in range(len(self.sigmas)) if self.beyond[i] > 0]
        col = max(hit, key=lambda i: self.sigmas[i]) if hit else 0
        k_rank = self.sigmas[col]
        order = np.argsort(-self.channel_beyond[:, col], kind="stable")[:top_channels]
        channels = []
        for c in order:
            if self.channel_beyond[c, col] == 0:
                break
            channels.append({
                "channel": int(c),
                "beyond": {k: int(self.channel_beyond[c, i]) for i, k in enumerate(self.sigmas)},
                "samples_beyond": {k: int(self.channel_samples_beyond[c, i])
                                   for i, k in enumerate(self.sigmas)},
                "top_values": [float(v) for v in self.topk.values[c]],
                "top_inputs": [int(i) for i in self.topk.indices[c]],
            })
        return {
            "name": self.name, "kind": self.kind, "type": self.type_name,
            "channels": self.channels, "input_shape": list(self.input_shape),
            "calls": self.calls, "samples": self.samples_seen, "n": n,
            "mean": self.moments.mean, "std": self.moments.std,
            "skewness": self.moments.skewness, "excess_kurtosis": self.moments.excess_kurtosis,
            "bands": self.bands(quantiles) if n else {},
            "beyond": beyond,
            "outlier_channels_by": k_rank,
            "outlier_channels": channels,
        }


LayerSelector = Sequence[str] | Callable[[str, nn.Module], bool] | None


class ActivationRecorder:
    """Forward hooks on every normalization layer of ``model`` that record ``x̂`` statistics.

    Attaches on construction; use as a context manager (hooks removed on exit, the data
    stays) or call :meth:`remove`. Hooks compute under ``no_grad`` and never touch the
    layers, so the model's outputs, gradients and running statistics are unchanged; they
    work the same when the model runs under ``torch.no_grad()``.

    Args:
        model: any ``nn.Module``.
        layers: ``None`` (all normalization layers), a list of layer names, or a predicate
            ``(name, module) -> bool``.
        sample_size: reservoir size per layer for the quantile bands (values).
        channel_sample_size: reservoir size per channel (0 disables channel densities).
        top_k: inputs kept per channel (most extreme values).
        sigmas: the k of the exact ``|x̂| > k`` counts.
        mode: ``"any"`` (default) records every forward; ``"train"`` / ``"eval"`` only forwards
            with the layer in that mode.
        seed: seed of the reservoirs' own generator (the global RNG is not used).

    Sample indices: every call of ``model`` advances a global counter by the batch size
    (dim 0 of its first tensor argument), so ``top_inputs`` are indices into the sequence of
    all inputs passed (the dataset index for an unshuffled loader).

    Example:
        >>> with ActivationRecorder(model) as rec:
        ...     for x, _ in loader:
        ...         model(x)
        >>> rec.summary()["features.1"]["beyond"][7.0]
    """

    def __init__(self, model: nn.Module, *, layers: LayerSelector = None,
                 sample_size: int = 100_000, channel_sample_size: int = 8192, top_k: int = 16,
                 sigmas: Sequence[float] = DEFAULT_SIGMAS, mode: str = "any", seed: int = 0) -> None:
        if mode not in ("any", "train", "eval"):
            raise ValueError(f"mode must be 'any', 'train' or 'eval', got {mode!r}")
        for name, value, low in (("sample_size", sample_size, 1), ("channel_sample_size",
                                 channel_sample_size, 0), ("top_k", top_k, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.model = model
        self.modules = _select_layers(model, layers)
        self.sigmas = tuple(float(k) for k in sigmas)
        self.sample_size, self.channel_sample_size, self.top_k = sample_size, channel_sample_size, top_k
        self.mode = mode
        self.seed = seed
        self._handles: list[Any] = []
        self._pre_running: dict[int, tuple[Tensor, Tensor]] = {}
        self._seen = 0
        self._batch_start: int | None = None
        self.reset()
        self.attach()

    # -- lifecycle ------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything recorded (hooks stay attached)."""
        gen = torch.Generator().manual_seed(int(self.seed))
        self.records: dict[str, LayerRecord] = {}
        self._gen = gen
        self._seen = 0

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "ActivationRecorder":
        """(Re-)register the hooks; a no-op when already attached."""
        if self._handles:
            return self
        self._handles.append(self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._root_post, with_kwargs=True))
        for name, module in self.modules.items():
            if norm_kind(module) == "renorm":
                self._handles.append(module.register_forward_pre_hook(self._renorm_pre))
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def remove(self) -> None:
        """Remove every hook this recorder registered (recorded data stays available)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pre_running.clear()
        self._batch_start = None

    def __enter__(self) -> "ActivationRecorder":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # -- hooks ----------------------------------------------------------------------
    def _root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._batch_start = self._seen

    def _root_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, Tensor)), None)
        if first is not None and first.dim() > 0 and not is_paused():
            self._seen += first.shape[0]
        self._batch_start = None

    def _renorm_pre(self, module: nn.Module, args: tuple) -> None:
        if module.training:
            self._pre_running[id(module)] = (module.running_mean.detach().clone(),
                                             module.running_var.detach().clone())

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            running = self._pre_running.pop(id(module), None)
            if is_paused() or not args or not isinstance(args[0], Tensor):
                return
            if self.mode == "train" and not module.training:
                return
            if self.mode == "eval" and module.training:
                return
            parts = norm_parts(module, args[0], running=running)
            record = self.records.get(name)
            if record is None:
                channels = parts.xhat.shape[parts.channel_dim]
                record = LayerRecord(name, norm_kind(module), type(module).__name__, channels,
                                     self.sigmas, self.sample_size, self.channel_sample_size,
                                     self.top_k, self._gen)
                self.records[name] = record
            offset = self._batch_start if self._batch_start is not None else record.samples_seen
            record.input_shape = tuple(args[0].shape)
            record.update(parts.xhat, parts.channel_dim, offset)
        return hook

    # -- read-outs ------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        """Recorded layers in model order."""
        return [n for n in self.modules if n in self.records]

    def __getitem__(self, name: str) -> LayerRecord:
        if name not in self.records:
            raise KeyError(f"no record for layer {name!r}; recorded: {self.layer_names}")
        return self.records[name]

    def summary(self, quantiles: Sequence[float] = DEFAULT_QUANTILES, top_channels: int = 5) -> dict[str, dict]:
        """``{layer name: LayerRecord.summary()}`` in model order."""
        return {n: self.records[n].summary(quantiles, top_channels) for n in self.layer_names}

    def totals(self) -> dict:
        """Counts beyond kσ summed over all layers, with the Gaussian expectation."""
        n = sum(r.moments.n for r in self.records.values())
        out = {"n": n, "beyond": {}}
        for i, k in enumerate(self.sigmas):
            count = int(sum(r.beyond[i] for r in self.records.values()))
            out["beyond"][k] = {"count": count, "expected_gaussian": gaussian_expected_count(n, k)}
        return out


def _select_layers(model: nn.Module, layers: LayerSelector) -> dict[str, nn.Module]:
    found = find_norm_layers(model)
    if layers is None:
        selected = found
    elif callable(layers):
        selected = {n: m for n, m in found.items() if layers(n, m)}
    else:
        if isinstance(layers, str):
            layers = [layers]
        missing = [n for n in layers if n not in found]
        if missing:
            raise ValueError(f"no normalization layer named {missing}; the model has {list(found)}")
        selected = {n: found[n] for n in layers}
    if not selected:
        raise ValueError(
            f"no normalization layer selected in {type(model).__name__} (found {list(found)}); "
            f"the recorder knows torch's BN/GN/LN/IN/RMSNorm and normlab's layers"
        )
    return selected


def _batch_inputs(batch: Any) -> Any:
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


def record_activations(model: nn.Module, batches: Iterable[Any], *, device: Any = None,
                       max_batches: int | None = None, **kwargs: Any) -> ActivationRecorder:
    """Run ``model`` over ``batches`` (tensors or ``(x, y)`` pairs) under ``no_grad`` in its
    current mode and return the detached :class:`ActivationRecorder` (``kwargs`` go to it).

    In training mode running statistics are saved and restored, so the model is unchanged.
    """
    buffers = {k: v.detach().clone() for k, v in model.state_dict().items()} if model.training else None
    recorder = ActivationRecorder(model, **kwargs)
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                x = _batch_inputs(batch)
                if device is not None:
                    x = x.to(device)
                model(x)
    finally:
        recorder.remove()
        if buffers is not None:
            model.load_state_dict(buffers)
    return recorder
