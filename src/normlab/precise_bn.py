r"""Population statistics for batch-statistics layers: Ioffe & Szegedy's Algorithm 2.

Batch normalization (Ioffe & Szegedy 2015, arXiv 1502.03167, Algorithm 2, steps 8–11)
replaces the mini-batch statistics by population statistics for inference: process several
training mini-batches ``B`` of size ``m`` through the *training* network and set

    E[x]   = E_B[μ_B]                          (the average of the batch means)
    Var[x] = m/(m − 1) · E_B[σ²_B]             (the unbiased average of the batch variances)

instead of the exponential moving averages that ``torch.nn.BatchNorm*d`` keeps while it
trains. :func:`precise_bn_` computes exactly that for every batch-statistics layer of a model
and writes it into the layers' ``running_mean`` / ``running_var`` buffers.

Layers and the statistics they contribute per batch (always the statistics the layer itself
normalizes with in training):

* ``torch.nn.BatchNorm1d/2d/3d`` (and lazy ones): mean and biased variance over the
  ``m = N·L`` values of a channel;
* :class:`normlab.FilteredBatchNorm2d` (and 1d/3d, the revisiting-BN layers built on it,
  :class:`normlab.nn.InputNorm`): the filtered moments μ′, σ′² over the ``M`` kept values
  (Horváth & Al-afandi 2020 [HA20], arXiv 2010.08251, eq. 4–7; σ′²/κ(T) with
  ``gaussian_consistent``);
* :class:`normlab.BatchRenorm2d` (and 1d/3d; Ioffe 2017, arXiv 1702.03275): its batch
  moments μ_B, σ²_B (filtered when it has a threshold) — r and d are not statistics;
* the synchronized versions (``torch.nn.SyncBatchNorm``, :class:`normlab.SyncFilteredBatchNorm`,
  :class:`normlab.SyncBatchRenorm`): the moments of the *global* batch of all processes
  (:func:`normlab.distributed.sync_batch_moments`) whenever the layer would synchronize.

**Unequal counts.** Batch ``b`` gives a channel the count ``m_b`` (the kept count ``M_b``
for a filtered layer — it differs between batches when the filter drops a different number
of values; also a smaller last batch). The population variance is the average of the
per-batch unbiased variances::

    running_mean = 1/B Σ_b μ_b
    running_var  = 1/B Σ_b  m_b/(m_b − 1) · σ²_b

which is Algorithm 2's ``m/(m − 1) · E_B[σ²_B]`` whenever all ``m_b`` are equal, averages
estimates that are each unbiased when they are not, and is what a layer's own cumulative
average (``momentum=None``, which also unbiases each batch with its own ``m_b``) computes —
so ``torch.optim.swa_utils.update_bn`` on the same batches gives the same numbers for the
layers whose training forward does not read the running statistics. Batches are weighted
equally (Algorithm 2 averages over mini-batches): pass equal-sized batches (``drop_last``)
for the paper's estimate. A set with ``m_b = 1`` contributes σ² = 0, as the layers do; an
empty batch (``N = 0``, which the layers pass through) contributes nothing.

**Across processes.** When ``torch.distributed`` is initialized with more than one process
(and ``all_reduce`` is not ``False``), the per-layer sums ``Σ_b μ_b``, ``Σ_b m_b/(m_b−1) σ²_b``
and the batch count ``B`` are all-reduced over the default group, so every process ends with
the same statistics: the average over every batch of every process. For synchronized layers
each batch's statistics are already global (identical on all ranks), so the all-reduce leaves
them unchanged; for unsynchronized layers under DDP it averages the processes' local batches.
Every process must then call :func:`precise_bn_` (synchronized layers need that anyway).

**What is left as it was.** Every batch runs through the model in training mode (the whole
model, as ``torch.optim.swa_utils.update_bn`` does: dropout is active, as it was when the
moving averages were collected) under ``torch.no_grad()``. After each batch the layers'
``running_mean``, ``running_var`` and ``num_batches_tracked`` are restored, so every batch
sees the trained network as it is (batch renorm's r and d come from the running statistics)
and the layers' own moving-average updates are discarded; at the end the population
statistics are written in place. ``num_batches_tracked``, ``momentum``, parameters and every
module's ``training`` flag are as before the call.
"""

from __future__ import annotations

import warnings
from itertools import islice
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import functional as F
from .distributed import (
    SyncBatchRenorm,
    SyncFilteredBatchNorm,
    _active_group,
    _flat_view,
    sync_batch_moments,
)
from .taxonomy import uses_batch_stats

__all__ = ["precise_bn_", "batch_stat_layers", "PopulationStats"]


def batch_stat_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of every layer :func:`precise_bn_` estimates: torch's and normlab's
    batch-statistics layers (BN, filtered BN and the layers built on it, batch renorm, the
    synchronized versions) that keep running statistics."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return {name: m for name, m in model.named_modules()
            if uses_batch_stats(m)
            and getattr(m, "running_mean", None) is not None
            and getattr(m, "running_var", None) is not None}


def _other_running_layers(model: nn.Module, handled: dict[str, nn.Module]) -> list[str]:
    """Layers that keep running statistics of another kind (e.g. instance norm with
    ``track_running_stats=True``): :func:`precise_bn_` leaves them as they are."""
    return [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
            if name not in handled and isinstance(getattr(m, "running_mean", None), Tensor)]


def _sync_group(module: nn.Module):
    """The process group whose global batch ``module`` normalizes with, or ``None``."""
    if isinstance(module, (SyncFilteredBatchNorm, SyncBatchRenorm)):
        return _active_group(module)
    if isinstance(module, nn.SyncBatchNorm):
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = module.process_group if module.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None
    return None


def _filter_settings(module: nn.Module) -> tuple[float | None, bool]:
    """(threshold, gaussian_consistent) of a layer; torch's BN has no filter."""
    return getattr(module, "threshold", None), bool(getattr(module, "gaussian_consistent", False))


def layer_batch_moments(module: nn.Module, x: Tensor) -> F.Moments:
    """The per-channel statistics ``module`` normalizes ``x`` with in training: ``(mean, var,
    count)`` of shape ``(C,)`` — filtered moments and kept count M for filtered layers, the
    global batch's for a synchronizing layer."""
    threshold, gaussian = _filter_settings(module)
    xv = _flat_view(x.detach())
    group = _sync_group(module)
    if group is not None:
        s = sync_batch_moments(xv, threshold, eps=module.eps, gaussian_consistent=gaussian,
                               group=group)
        return F.Moments(s.mean, s.var, s.count)
    stats = F.filtered_moments(xv, (0, 2), threshold, eps=module.eps,
                               gaussian_consistent=gaussian)
    return F.Moments(stats.mean.reshape(-1), stats.var.reshape(-1), stats.count.reshape(-1))


class PopulationStats:
    """Running sums of one layer's batch statistics (float64): ``Σ_b μ_b``,
    ``Σ_b m_b/(m_b − 1) σ²_b`` and the number of batches ``B``."""

    def __init__(self, channels: int, device: torch.device) -> None:
        self.sums = torch.zeros(2, channels, dtype=torch.float64, device=device)
        self.batches = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, stats: F.Moments) -> None:
        count = stats.count.to(torch.float64).reshape(-1)
        unbiased = stats.var.to(torch.float64).reshape(-1) * (count / (count - 1).clamp_min(1))
        self.sums[0] += stats.mean.to(torch.float64).reshape(-1)
        self.sums[1] += unbiased
        self.batches += 1

    def all_reduce(self, group=None) -> None:
        packed = torch.cat([self.sums.reshape(-1), self.batches.reshape(1)])
        dist.all_reduce(packed, group=group)
        self.sums.copy_(packed[:-1].view_as(self.sums))
        self.batches.copy_(packed[-1])

    def result(self) -> tuple[Tensor, Tensor]:
        """(population mean, population variance)."""
        return self.sums[0] / self.batches, self.sums[1] / self.batches


def _forward(model: nn.Module, batch: Any, device) -> None:
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise ValueError("precise_bn_ got an empty batch tuple; give tensors or "
                             "(inputs, targets) tuples")
        batch = batch[0]
    if isinstance(batch, dict):
        model(**{k: (v.to(device) if device is not None and isinstance(v, Tensor) else v)
                 for k, v in batch.items()})
        return
    if not isinstance(batch, Tensor):
        raise TypeError(f"precise_bn_ batches must be tensors, (inputs, targets, ...) tuples or "
                        f"dicts of keyword inputs, got {type(batch).__name__}")
    model(batch.to(device) if device is not None else batch)


def _check_count(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1 or None (all batches), got {value!r}")
    return value


def _distributed_sum_wanted(all_reduce: bool | None) -> bool:
    active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if all_reduce and not active:
        raise ValueError("all_reduce=True needs an initialized torch.distributed process group "
                         "with more than one process; use all_reduce=None (automatic)")
    return active if all_reduce is None else bool(all_reduce)


@torch.no_grad()
def precise_bn_(model: nn.Module, batches: Iterable, *, num_batches: int | None = None,
                progress: bool = True, device: torch.device | str | None = None,
                all_reduce: bool | None = None) -> nn.Module:
    r"""Set every batch-statistics layer's running statistics to Algorithm 2's population
    statistics (Ioffe & Szegedy 2015, arXiv 1502.03167): ``running_mean = 1/B Σ_b μ_b``,
    ``running_var = 1/B Σ_b m_b/(m_b − 1) σ²_b`` over ``B`` training batches (``m/(m−1)``
    times the average batch variance when every batch has ``m`` values per channel; for
    filtered layers μ′, σ′² and the kept count ``M_b``). See the module docstring for the
    layers covered, unequal counts, processes, and what is restored.

    Args:
        model: the trained model; its buffers are written in place.
        batches: an iterable of training batches — tensors, ``(inputs, targets, ...)``
            tuples/lists (the first element is the input, as in
            ``torch.optim.swa_utils.update_bn``) or dicts of keyword inputs.
        num_batches: use at most this many batches (default: all of ``batches``).
        progress: show a tqdm bar (on the first process only; none if tqdm is missing).
        device: move each input there first (default: as given).
        all_reduce: combine the statistics of every process (``None``: when
            ``torch.distributed`` is initialized with more than one process).

    Returns:
        ``model``.

    Raises:
        TypeError / ValueError: a non-module model, bad ``num_batches``, batches of another
            type, or no batch at all; the layers' own errors (e.g. one value per channel).

    Warns (``RuntimeWarning``): a layer no batch reached (its buffers are unchanged), layers
    with running statistics of another kind (left unchanged), fewer batches than
    ``num_batches``, non-finite statistics.

    Example:
        >>> loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True,
        ...                                      drop_last=True)
        >>> normlab.precise_bn_(model, loader, num_batches=200)
        >>> model.eval()  # inference with the population statistics
    """
    layers = batch_stat_layers(model)
    lazy = [name for name, m in layers.items()
            if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:
        raise ValueError(f"precise_bn_ cannot estimate the uninitialized lazy layer(s) "
                         f"{', '.join(lazy)}; run one forward pass first")
    num_batches = _check_count("num_batches", num_batches)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    reduce = _distributed_sum_wanted(all_reduce)
    others = _other_running_layers(model, layers)
    if others:
        warnings.warn(f"precise_bn_ estimates batch-statistics layers only; leaving the running "
                      f"statistics of {', '.join(others)} as they are", RuntimeWarning,
                      stacklevel=2)
    if not layers:
        warnings.warn("precise_bn_: the model has no batch-statistics layer with running "
                      "statistics; nothing to do", RuntimeWarning, stacklevel=2)
        return model

    accumulators: dict[str, PopulationStats] = {}
    saved = {name: [getattr(m, b).clone() for b in ("running_mean", "running_var",
                                                    "num_batches_tracked")
                    if getattr(m, b, None) is not None]
             for name, m in layers.items()}
    modes = {m: m.training for m in model.modules()}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if args[0].shape[0] == 0 and _sync_group(module) is None:
                return  # an empty batch has no statistics (torch's BN passes it through)
            stats = layer_batch_moments(module, args[0])
            if name not in accumulators:
                accumulators[name] = PopulationStats(stats.mean.numel(), stats.mean.device)
            accumulators[name].add(stats)
        return hook

    def restore() -> None:
        for name, m in layers.items():
            names = [b for b in ("running_mean", "running_var", "num_batches_tracked")
                     if getattr(m, b, None) is not None]
            for b, value in zip(names, saved[name]):
                getattr(m, b).copy_(value)

    source = batches if num_batches is None else islice(batches, num_batches)
    bar = None
    if progress and (not dist.is_initialized() or dist.get_rank() == 0):
        try:
            from tqdm.auto import tqdm  # lazy: optional dependency (tqdm, for progress=True)
        except ImportError:  # tqdm is an optional dependency (normlab[lab])
            tqdm = None
        if tqdm is not None:
            total = num_batches
            if total is None and hasattr(batches, "__len__"):
                total = len(batches)
            elif total is not None and hasattr(batches, "__len__"):
                total = min(total, len(batches))
            bar = tqdm(total=total, desc="precise BN", unit="batch", leave=False)
    handles = [m.register_forward_hook(hook_for(name)) for name, m in layers.items()]
    seen = 0
    try:
        model.train()
        for batch in source:
            _forward(model, batch, device)
            restore()
            seen += 1
            if bar is not None:
                bar.update(1)
    finally:
        for h in handles:
            h.remove()
        restore()
        for m, training in modes.items():
            m.train(training)
        if bar is not None:
            bar.close()
    if seen == 0:
        raise ValueError("precise_bn_ got no batches; pass an iterable of training batches")
    if num_batches is not None and seen < num_batches:
        warnings.warn(f"precise_bn_: asked for {num_batches} batches, the iterable gave {seen}",
                      RuntimeWarning, stacklevel=2)

    if reduce:
        # every layer in the same order on every process; layers a process never reached
        # contribute zeros, so ranks stay in step
        for name, m in layers.items():
            if name not in accumulators:
                ref = m.running_mean
                accumulators[name] = PopulationStats(ref.numel(), ref.device)
            accumulators[name].all_reduce()
    unreached, non_finite = [], []
    for name, m in layers.items():
        acc = accumulators.get(name)
        if acc is None or float(acc.batches) == 0:
            unreached.append(name)
            continue
        mean, var = acc.result()
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
            non_finite.append(name)
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
    if unreached:
        warnings.warn(f"precise_bn_: no batch reached {', '.join(unreached)}; their running "
                      f"statistics are unchanged", RuntimeWarning, stacklevel=2)
    if non_finite:
        warnings.warn(f"precise_bn_: non-finite population statistics in "
                      f"{', '.join(non_finite)} (the batches produced NaN/Inf there)",
                      RuntimeWarning, stacklevel=2)
    return model
