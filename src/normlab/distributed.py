r"""Batch statistics across processes (``torch.distributed``), and helpers for ``torchrun``.

With ``DistributedDataParallel`` every process normalizes with the statistics of its own
slice of the batch; [SK20] (Table 2) shows how accuracy falls as that slice shrinks.
:class:`SyncFilteredBatchNorm` and :class:`SyncBatchRenorm` compute the statistics of the
*global* batch instead, like ``torch.nn.SyncBatchNorm`` — and also for the robust filter of
[HA20] (eq. 4–8), which nobody else synchronizes. ``threshold=None`` gives
plain synchronized BN, and unlike ``torch.nn.SyncBatchNorm`` it runs on CPU (gloo) too.

Forward: two collective phases (one ``all_gather`` each), exact for uneven per-rank batches::

    phase 1  each rank r: n_r, μ_r = Σx / n_r, m2_r = Σ (x − μ_r)²         (two-pass, local)
             gather, combine (Chan et al.):  N = Σ n_r,  μ = Σ n_r μ_r / N,
             σ² = (Σ m2_r + Σ n_r (μ_r − μ)²) / N
    mask     f = [|x − μ| / sqrt(σ² + ε) ≤ T]                               ([HA20] eq. 4–5)
    phase 2  each rank, shifted by the global μ: M_r = Σ f, s1 = Σ f (x − μ), s2 = Σ f (x − μ)²
             → (M_r, μ′_r = μ + s1/M_r, m2′_r = s2 − s1²/M_r)
             gather, combine the same way: M, μ′, σ′² = m2′ / (κ M)           ([HA20] eq. 6–7)
    y        = γ (x − μ′) / sqrt(σ′² + ε) + β   for every value                 ([HA20] eq. 8)

Each rank sends ``(count, mean, centered sum of squares)`` per channel — never raw ``Σx²`` —
so the combination is as stable as a two-pass variance (Chan, Golub & LeVeque 1979; the
kept values of phase 2 lie within Tσ of the shift μ, so its shifted sums are safe too); a
channel whose filter keeps nothing *globally* uses its plain moments, as the unsynced
module does. Without a threshold phase 2 is skipped (one collective, like torch).

Backward (see :mod:`normlab.kernels.analytic`): with ``g = γ ∂ℓ/∂y`` and x̂ the output of the
normalization, one ``all_reduce`` of the per-channel sums ``Σ g`` and ``Σ g x̂`` over the
global batch gives::

    ∂ℓ/∂x_j = r (g_j − f_j/M Σ g − f_j x̂_j/(κM) Σ g x̂),   r = (σ′² + ε)^(-1/2)

while ``∂ℓ/∂γ = Σ ∂ℓ/∂y x̂`` and ``∂ℓ/∂β = Σ ∂ℓ/∂y`` stay *local* sums: DDP all-reduces
parameter gradients itself (exactly as with ``torch.nn.SyncBatchNorm``).

When synchronization happens (torch's rule): in training mode, when ``torch.distributed``
is initialized and the group has more than one process. Otherwise the modules behave
exactly like their unsynced parents (``FilteredBatchNorm*d`` / ``BatchRenorm*d``): single
process runs and evaluation on rank 0 alone need no collectives and cannot hang.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import functional as F
from .nn._common import channel_view, check_input
from .nn.batch import _BatchRenorm, _FilteredBatchNorm, renorm_factors
from .taxonomy import Family, Tail, classify

__all__ = [
    "SyncFilteredBatchNorm",
    "SyncBatchRenorm",
    "convert_sync",
    "sync_batch_moments",
    "SyncMoments",
    "DistContext",
    "setup_from_env",
    "cleanup",
    "wrap_ddp",
    "unwrap",
    "shard_indices",
    "all_reduce_sum",
]


# --------------------------------------------------------------------------------------
# process groups
# --------------------------------------------------------------------------------------
def _check_process_group(process_group):
    if process_group is None:
        return None
    if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup (e.g. from "
            f"torch.distributed.new_group(ranks)) or None for the default group, got "
            f"{process_group!r} ({type(process_group).__name__})"
        )
    return process_group


def _active_group(module: nn.Module):
    """The group to synchronize over, or ``None`` when there is nothing to synchronize.

    ``None`` when ``torch.distributed`` is unavailable or not initialized, or the group has a
    single process (torch's ``SyncBatchNorm`` rule: fall back to the unsynced module).
    """
    if not (dist.is_available() and dist.is_initialized()):
        if module.process_group is not None:
            raise RuntimeError(
                f"{type(module).__name__} was given a process_group but torch.distributed is "
                f"not initialized (any more); call torch.distributed.init_process_group (or "
                f"normlab.distributed.setup_from_env under torchrun) before training"
            )
        return None
    group = module.process_group if module.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if world < 1:
        raise RuntimeError(
            f"{type(module).__name__}: this process (rank {dist.get_rank()}) is not a member "
            f"of its process_group; build the module with a group that contains every rank "
            f"that calls it"
        )
    return group if world > 1 else None


# --------------------------------------------------------------------------------------
# statistics of the global batch
# --------------------------------------------------------------------------------------
class SyncMoments(NamedTuple):
    """Per-channel statistics of the global batch, all of shape ``(C,)``.

    ``plain_mean``/``plain_var``: phase-1 moments (they define the filter);
    ``mean``/``var``/``count``: the statistics used to normalize (filtered: μ′, σ′² (/κ), M);
    ``keep_all``: channels whose filter kept nothing globally (they use the plain moments).
    """

    plain_mean: Tensor
    plain_var: Tensor
    mean: Tensor
    var: Tensor
    count: Tensor
    keep_all: Tensor


def _gather_combine(n_r: Tensor, mean_r: Tensor, m2_r: Tensor, group):
    """Per-rank ``(n, mean, Σ(x − mean)²)`` per channel → global ``(N, μ, Σ(x − μ)²)``.

    One ``all_gather``; Chan, Golub & LeVeque's pairwise-free combination
    ``m2 = Σ m2_r + Σ n_r (μ_r − μ)²``.
    """
    local = torch.stack([n_r, mean_r, m2_r])
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    n_r, mean_r, m2_r = torch.stack(parts).unbind(1)  # each (W, C)
    n = n_r.sum(0)
    mean = (n_r * mean_r).sum(0) / n.clamp_min(1)
    m2 = m2_r.sum(0) + (n_r * (mean_r - mean).square()).sum(0)
    return n, mean, m2


@torch.no_grad()
def sync_batch_moments(
    x: Tensor,
    threshold: float | None,
    *,
    eps: float,
    gaussian_consistent: bool = False,
    group=None,
) -> SyncMoments:
    """(Filtered) per-channel moments of ``x`` (``(N, C, L)``) over all ranks of ``group``.

    Two collective phases (module docstring); every rank gets identical results. Raises
    ``ValueError`` on every rank alike when the global batch has at most one value per
    channel.
    """
    xs = x.detach().to(F.stats_dtype(x.dtype))
    channels = xs.shape[1]
    local_count = xs.shape[0] * xs.shape[2]
    n_r = torch.full((channels,), float(local_count), dtype=xs.dtype, device=xs.device)
    mean_r = xs.sum(dim=(0, 2)) / max(local_count, 1)  # local two-pass moments
    m2_r = (xs - mean_r.view(1, -1, 1)).square().sum(dim=(0, 2))
    n, mean0, m2 = _gather_combine(n_r, mean_r, m2_r, group)
    total = int(n[0].item())
    if total <= 1:
        raise ValueError(
            f"synchronized batch norm needs more than 1 value per channel in the global batch "
            f"(all ranks together), got {total}; use larger batches or a per-sample norm"
        )
    var0 = m2 / n
    keep_all = torch.zeros(channels, dtype=torch.bool, device=xs.device)
    if threshold is None:
        return SyncMoments(mean0, var0, mean0, var0, n, keep_all)
    # local kept sums shifted by the global plain mean μ (kept values lie within T σ of it,
    # so Σf(x−μ)² − (Σf(x−μ))²/M loses no precision worth naming)
    dev = xs - mean0.view(1, -1, 1)
    mask = ((dev * torch.rsqrt(var0.view(1, -1, 1) + eps)).abs() <= threshold).to(xs.dtype)
    kept_dev = dev * mask
    kept_r = mask.sum(dim=(0, 2))
    s1 = kept_dev.sum(dim=(0, 2))
    s2 = kept_dev.square().sum(dim=(0, 2))
    shift_r = s1 / kept_r.clamp_min(1)
    m2f_r = (s2 - s1 * shift_r).clamp_min(0)
    kept, mean, m2f = _gather_combine(kept_r, mean0 + shift_r, m2f_r, group)
    keep_all = kept == 0
    if bool(keep_all.any()):  # the filter kept nothing: plain moments (F.filter_mask's rule)
        kept = torch.where(keep_all, n, kept)
        mean = torch.where(keep_all, mean0, mean)
        m2f = torch.where(keep_all, m2, m2f)
    var = m2f / kept
    if gaussian_consistent:
        var = var / F.truncated_normal_variance_factor(threshold)
    return SyncMoments(mean0, var0, mean, var, kept, keep_all)


class SyncNormalizeAffineFunction(torch.autograd.Function):
    """``y = w (x − μ′) r + b`` with given global statistics; backward all-reduces Σg, Σg x̂.

    Inputs: ``x`` ``(N, C, L)``, ``weight``/``bias`` ``(1, C, 1)`` or ``None``, the
    :class:`SyncMoments` fields, then ``threshold, eps, gaussian_consistent, group``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean0, var0, mean, var, count, keep_all,
                threshold, eps, gaussian_consistent, group):
        rstd = torch.rsqrt(var + eps).view(1, -1, 1)
        mean = mean.view(1, -1, 1)
        xhat = (x.to(rstd.dtype) - mean) * rstd
        y = xhat
        if weight is not None:
            y = y * weight.to(rstd.dtype)
        if bias is not None:
            y = y + bias.to(rstd.dtype)
        ctx.save_for_backward(x, weight, bias, mean0, var0, mean, rstd, count, keep_all)
        ctx.config = (threshold, eps, gaussian_consistent, group)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, mean0, var0, mean, rstd, count, keep_all = ctx.saved_tensors
        threshold, eps, gaussian_consistent, group = ctx.config
        if torch.is_grad_enabled():  # create_graph=True: differentiate the synced composite
            grads = _composite_backward(ctx.needs_input_grad[:3], (x, weight, bias), grad_y,
                                        mean0, var0, count, keep_all, threshold, eps,
                                        gaussian_consistent, group)
            return (*grads, *(None,) * 10)
        xs = x.to(rstd.dtype)
        gy = grad_y.to(rstd.dtype)
        xhat = (xs - mean) * rstd
        # local Σ ∂ℓ/∂y and Σ ∂ℓ/∂y x̂: the parameter gradients, and (× γ) the sums to reduce
        sums = torch.stack([gy.sum(dim=(0, 2)), (gy * xhat).sum(dim=(0, 2))])
        grad_x = grad_w = grad_b = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = sums[1].view(weight.shape).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_b = sums[0].view(bias.shape).to(bias.dtype)
        if ctx.needs_input_grad[0]:
            w = weight.to(rstd.dtype).reshape(1, -1) if weight is not None else None
            sums = sums * w if w is not None else sums.clone()  # Σ g, Σ g x̂ with g = γ ∂ℓ/∂y
            dist.all_reduce(sums, group=group)
            kappa = F.variance_factor(threshold, gaussian_consistent)
            m = count.view(1, -1, 1)
            proj = xhat * (sums[1].view(1, -1, 1) / (kappa * m)) + sums[0].view(1, -1, 1) / m
            if threshold is not None:
                z = (xs - mean0.view(1, -1, 1)) * torch.rsqrt(var0.view(1, -1, 1) + eps)
                keep = (z.abs() <= threshold) | keep_all.view(1, -1, 1)
                proj = proj * keep
            g = gy * weight.to(rstd.dtype) if weight is not None else gy
            grad_x = ((g - proj) * rstd).to(x.dtype)
        return (grad_x, grad_w, grad_b) + (None,) * 10


def _composite_forward(x, weight, bias, mean0, var0, count, keep_all, threshold, eps,
                       gaussian_consistent, group):
    """The synchronized forward as differentiable ops (higher derivatives).

    ``μ′ = AR(Σ f x)/M``, ``σ′² = AR(Σ f (x − μ′)²)/(κM)`` with ``AR`` torch's functional
    all-reduce (``torch.distributed._functional_collectives``, whose registered backward
    all-reduces the gradient — itself differentiable), the mask ``f`` from the saved plain moments (piecewise constant) and the
    global kept count ``M``; then ``y = γ (x − μ′)/sqrt(σ′² + ε) + β``. Its gradient is the
    first-order backward above; differentiated again it gives exact second derivatives of
    the global batch's loss, on every rank.
    """
    # lazy: start-up time: torch private module, needed only for second derivatives
    from torch.distributed import _functional_collectives as collectives

    def all_reduce_with_grad(t: Tensor) -> Tensor:  # backward: the all-reduce of the gradient
        return collectives.wait_tensor(collectives.all_reduce(t, "sum", group))

    xs = x.to(mean0.dtype)
    m = count.view(1, -1, 1)
    keep = None
    if threshold is not None:
        with torch.no_grad():
            z = (xs - mean0.view(1, -1, 1)) * torch.rsqrt(var0.view(1, -1, 1) + eps)
            keep = ((z.abs() <= threshold) | keep_all.view(1, -1, 1)).to(xs.dtype)
    kept = xs if keep is None else xs * keep
    mean = all_reduce_with_grad(kept.sum(dim=(0, 2))).view(1, -1, 1) / m
    dev = xs - mean
    square = dev.square() if keep is None else dev.square() * keep
    var = all_reduce_with_grad(square.sum(dim=(0, 2))).view(1, -1, 1) / m
    if gaussian_consistent and threshold is not None:
        var = var / F.truncated_normal_variance_factor(threshold)
    y = dev * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)


def _composite_backward(needs, inputs, grad_y, *config):
    """Differentiable gradients of :func:`_composite_forward` w.r.t. ``(x, weight, bias)``.

    Every rank must run it (the all-reduces of its backward are collectives), as every rank
    runs the first-order backward.
    """
    wanted = [i for i, t in enumerate(inputs) if t is not None and needs[i]]
    grads: list = [None] * len(inputs)
    with torch.enable_grad():
        y = _composite_forward(*inputs, *config)
        found = torch.autograd.grad(y, [inputs[i] for i in wanted], grad_y, create_graph=True,
                                    allow_unused=True)
    for i, g in zip(wanted, found):
        grads[i] = g if g is not None else torch.zeros_like(inputs[i])
    return grads


def _flat_view(x: Tensor) -> Tensor:
    """``(N, C, *)`` → ``(N, C, L)``; explicit sizes so an empty local batch (N = 0) works."""
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))


def _sync_normalize(module, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                    stats: SyncMoments, xv: Tensor, group) -> Tensor:
    y = SyncNormalizeAffineFunction.apply(
        xv, channel_view(weight, 3), channel_view(bias, 3), *stats,
        module.threshold, module.eps, module.gaussian_consistent, group,
    )
    return y.reshape(x.shape)


# --------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------
class SyncFilteredBatchNorm(_FilteredBatchNorm):
    r"""Filtered batch norm with statistics of the global batch across processes.

    The math of :class:`normlab.FilteredBatchNorm2d` ([HA20] eq. 4–8) with the
    moments of the batch of *all* processes of ``process_group`` (module docstring of
    :mod:`normlab.distributed`: two collective phases forward, one all-reduce backward).
    ``threshold=None`` is synchronized ``torch.nn.BatchNorm*d`` (works on CPU/gloo and
    CUDA/NCCL). One class for every input rank, like ``torch.nn.SyncBatchNorm``.

    Synchronizes in training mode when ``torch.distributed`` is initialized and the group
    has more than one process; otherwise it *is* the unsynced ``FilteredBatchNorm*d``
    (torch's ``SyncBatchNorm`` rule). Running statistics are identical on every rank.
    Per-rank batches may differ in size (even be empty) but every rank in the group must
    call the module the same number of times, in the same mode.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, threshold,
            gaussian_consistent, gamma_init: as :class:`normlab.FilteredBatchNorm2d`.
        process_group: the group to synchronize over (keyword-only; ``None``: all processes).

    Shape: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``.

    Example (under ``torchrun``)::

        model = normlab.convert_sync(model)            # or build SyncFilteredBatchNorm(64)
        model = DistributedDataParallel(model, device_ids=[local_rank])
    """

    _allowed_dims = (2, 3, 4, 5)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, bias: bool = True, threshold: float | None = 2.0,
                 gaussian_consistent: bool = False, gamma_init: float = 1.0,
                 process_group=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, threshold=threshold, gaussian_consistent=gaussian_consistent,
                         gamma_init=gamma_init)
        self.process_group = _check_process_group(process_group)

    def forward(self, x: Tensor) -> Tensor:
        synced = _global_moments(self, x)
        if synced is None:  # evaluation, or no process group: the layer's own forward
            return super().forward(x)
        xv, stats, factor, group = synced
        y = _sync_normalize(self, x, self.weight, self.bias, stats, xv, group)
        self._update_running_stats(F.Moments(stats.mean, stats.var, stats.count), factor)
        return y


class SyncBatchRenorm(_BatchRenorm):
    r"""Batch renormalization (Ioffe 2017) with statistics of the global batch.

    :class:`normlab.BatchRenorm2d` (r and d from the clipped ratio of the global batch
    moments to the running ones, optionally with the robust filter) where the batch moments
    come from all processes of ``process_group`` (see :class:`SyncFilteredBatchNorm`). Same
    synchronization rule and fallback as :class:`SyncFilteredBatchNorm`.

    Args:
        as :class:`normlab.BatchRenorm2d`, plus ``process_group`` (keyword-only).

    Shape: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``.
    """

    _allowed_dims = (2, 3, 4, 5)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.01,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, bias: bool = True, r_max: float = 3.0, d_max: float = 5.0,
                 renorm_start: int = 5000, r_max_full_at: int = 40000,
                 d_max_full_at: int = 25000, threshold: float | None = None,
                 gaussian_consistent: bool = False, gamma_init: float = 1.0,
                 process_group=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, r_max=r_max, d_max=d_max, renorm_start=renorm_start,
                         r_max_full_at=r_max_full_at, d_max_full_at=d_max_full_at,
                         threshold=threshold, gaussian_consistent=gaussian_consistent,
                         gamma_init=gamma_init)
        self.process_group = _check_process_group(process_group)

    def forward(self, x: Tensor) -> Tensor:
        synced = _global_moments(self, x)
        if synced is None:  # evaluation, or no process group: the layer's own forward
            return super().forward(x)
        xv, stats, factor, group = synced  # the step is counted first
        r_max, d_max = self.current_limits()
        with torch.no_grad():  # r, d as in BatchRenorm*d.forward, from the global moments
            r, d = renorm_factors(stats.mean, stats.var, self.running_mean, self.running_var,
                                  self.eps, r_max, d_max)
        weight = self.weight if self.weight is not None else torch.ones_like(r)
        bias = self.bias if self.bias is not None else torch.zeros_like(r)
        weight_eff = weight * r.to(weight.dtype)
        bias_eff = bias + weight * d.to(weight.dtype)
        y = _sync_normalize(self, x, weight_eff, bias_eff, stats, xv, group)
        self._update_running_stats(F.Moments(stats.mean, stats.var, stats.count), factor)
        return y


def _global_moments(layer, x: Tensor):
    """``(x as (N, C, L), the (filtered) moments of the global batch, the averaging factor,
    the process group)`` after the input checks — the common start of the synchronized
    forwards; ``None`` when the layer is not training in a process group."""
    group = _active_group(layer) if layer.training else None
    if group is None:
        return None
    check_input(layer, x, layer._allowed_dims, layer.num_features)
    factor = layer._averaging_factor()
    xv = _flat_view(x)
    stats = sync_batch_moments(xv, layer.threshold, eps=layer.eps,
                               gaussian_consistent=layer.gaussian_consistent, group=group)
    return xv, stats, factor, group


def _copy_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Share parameters, copy buffers and the train/eval flag (as torch's converter)."""
    with torch.no_grad():
        if src.weight is not None:
            dst.weight = src.weight
            dst.bias = src.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            value = getattr(src, name, None)
            if value is not None:
                setattr(dst, name, value)
    dst.train(src.training)
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig
    return dst


def _sync_version(module: nn.Module, process_group):
    if isinstance(module, (SyncFilteredBatchNorm, SyncBatchRenorm)):
        if process_group is not None:
            module.process_group = process_group
        return module
    kind = classify(module)
    if kind is None or not kind.uses_batch_stats:
        return None
    if kind.tail not in (Tail.STANDARD, Tail.INPUT):  # A1/A2, RBN/IEBN
        raise ValueError(
            f"convert_sync has no synchronized version of {type(module).__name__}: its "
            f"statistics would stay per process; use FilteredBatchNorm/BatchRenorm (or "
            f"InputNorm) where statistics must span processes, or leave this model unsynced"
        )
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(
            f"convert_sync cannot convert the uninitialized {type(module).__name__} (its "
            f"num_features is unknown); run one forward pass first, or use BatchNorm*d"
        )
    ref = module.weight if module.weight is not None else module.running_mean
    factory = {"device": None, "dtype": None} if ref is None else {
        "device": ref.device, "dtype": ref.dtype}
    common = dict(bias=module.bias is not None or not module.affine,
                  process_group=process_group, **factory)
    if kind.family is Family.RENORM:
        new = SyncBatchRenorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats, r_max=module.r_max, d_max=module.d_max,
            renorm_start=module.renorm_start, r_max_full_at=module.r_max_full_at,
            d_max_full_at=module.d_max_full_at, threshold=module.threshold,
            gaussian_consistent=module.gaussian_consistent, gamma_init=module.gamma_init,
            **common)
    elif isinstance(module, _FilteredBatchNorm):  # FilteredBatchNorm*d, InputNorm
        new = SyncFilteredBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats, threshold=module.threshold,
            gaussian_consistent=module.gaussian_consistent, gamma_init=module.gamma_init,
            **common)
    else:  # torch.nn.BatchNorm*d / SyncBatchNorm
        new = SyncFilteredBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats, threshold=None, **common)
    return _copy_state(module, new)


def convert_sync(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every batch-statistics norm in ``module`` by its synchronized version.

    ``FilteredBatchNorm*d`` (and InputNorm) → :class:`SyncFilteredBatchNorm`,
    ``BatchRenorm*d`` → :class:`SyncBatchRenorm`, ``torch.nn.BatchNorm*d`` (and
    ``torch.nn.SyncBatchNorm``) → ``SyncFilteredBatchNorm(threshold=None)``; the
    revisiting-BN alternatives (A1/A2, RBN/IEBN) have no synchronized version and raise
    ``ValueError``. ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (what Lightning's
    ``sync_batchnorm=True`` calls) does the same for normlab's layers once normlab is
    imported (:func:`convert_sync_batchnorm_keeping_normlab`). Parameters are shared (an optimizer built
    before still works), buffers and the train/eval flag are kept, so outputs are unchanged
    in a single process. Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` it converts
    in place where it can and returns the (possibly new) root module; call it *before*
    wrapping the model in ``DistributedDataParallel``. Per-sample norms (GN, LN, IN, FRN)
    need no synchronization and are left alone.

    Args:
        module: any ``nn.Module`` (or a single norm layer).
        process_group: group to synchronize over; ``None``: all processes.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert_sync expects a torch.nn.Module, got {type(module).__name__}")
    if isinstance(module, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "convert_sync got a model already wrapped in DistributedDataParallel; convert the "
            "plain model first, then wrap it (DDP registers parameters at construction)"
        )
    process_group = _check_process_group(process_group)
    new = _sync_version(module, process_group)
    if new is not None:
        return new
    for name, child in module.named_children():
        converted = convert_sync(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module


_installed = nn.SyncBatchNorm.__dict__["convert_sync_batchnorm"].__func__
_TORCH_CONVERT_SYNC_BATCHNORM = getattr(_installed, "__wrapped__", _installed)  # re-imports


def convert_sync_batchnorm_keeping_normlab(cls, module: nn.Module, process_group=None):
    """``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, keeping normlab's methods.

    normlab's batch-statistics layers are ``torch.nn.BatchNorm*d`` subclasses, and torch's
    converter turns every such layer into a plain ``torch.nn.SyncBatchNorm`` — silently
    dropping the robust filter or batch renorm. ``import normlab`` therefore installs this
    function as the converter: normlab's layers go to :func:`convert_sync` (``Sync*``
    versions, or a ``ValueError`` where none exists), everything else to torch's own
    converter, unchanged. The recursion of torch's converter comes back here for every
    child (it calls ``cls.convert_sync_batchnorm``).
    """
    if _is_normlab_batch_layer(module):
        return convert_sync(module, process_group)
    return _TORCH_CONVERT_SYNC_BATCHNORM(cls, module, process_group)


def _is_normlab_batch_layer(module: nn.Module) -> bool:
    """A normlab layer normalizing with batch statistics (what the converters hand to
    :func:`convert_sync` instead of the framework's own)."""
    kind = classify(module)
    return kind is not None and kind.uses_batch_stats and kind.normlab


convert_sync_batchnorm_keeping_normlab.__wrapped__ = _TORCH_CONVERT_SYNC_BATCHNORM
nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(convert_sync_batchnorm_keeping_normlab)


# timm's converter: ``timm.layers.convert_sync_batchnorm`` is a module function of
# ``timm.layers.norm_act`` that turns every ``_BatchNorm`` into ``nn.SyncBatchNorm`` (or
# timm's SyncBatchNormAct) and recurses through the module's global name — so replacing that
# global routes every child through normlab, whichever reference the caller holds.
_TIMM_NORM_ACT = "timm.layers.norm_act"


def _keep_normlab_in_timm(norm_act) -> None:
    """Install :func:`convert_sync_batchnorm_keeping_normlab`'s rule in timm: normlab's batch
    layers go to :func:`convert_sync`, everything else to timm's converter, unchanged."""
    installed = norm_act.convert_sync_batchnorm
    timm_convert = getattr(installed, "__wrapped__", installed)

    @functools.wraps(timm_convert)
    def convert_sync_batchnorm(module, process_group=None):
        if _is_normlab_batch_layer(module):
            return convert_sync(module, process_group)
        return timm_convert(module, process_group)

    norm_act.convert_sync_batchnorm = convert_sync_batchnorm
    for name in ("timm.layers", "timm.models.layers"):  # names bound before normlab came
        exported = sys.modules.get(name)
        if exported is not None and getattr(exported, "convert_sync_batchnorm", None) in (
                installed, timm_convert):
            exported.convert_sync_batchnorm = convert_sync_batchnorm


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``patch(module)`` once, right after the module ``name`` has been executed (so
    before anything imports names from it). Finds nothing itself: the spec is the other
    finders', its loader's ``exec_module`` wrapped."""

    def __init__(self, name: str, patch) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module, patch = spec.loader.exec_module, self.patch

        def exec_then_patch(module):
            exec_module(module)
            try:
                patch(module)
            except Exception as error:  # never break the user's import
                warnings.warn(f"normlab could not install its rule in {fullname} ({error}); "
                              f"use normlab.convert_sync for normlab's layers", RuntimeWarning)

        spec.loader.exec_module = exec_then_patch
        return spec


if _TIMM_NORM_ACT in sys.modules:
    _keep_normlab_in_timm(sys.modules[_TIMM_NORM_ACT])
elif not any(isinstance(f, _AfterImport) and f.name == _TIMM_NORM_ACT for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterImport(_TIMM_NORM_ACT, _keep_normlab_in_timm))


# --------------------------------------------------------------------------------------
# torchrun helpers
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its node).

    ``is_main`` (rank 0) writes logs, results and checkpoints. ``backend`` is ``None`` for a
    single process (nothing initialized).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    is_main: bool = True
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(env: Mapping[str, str], name: str, default: int | None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(
                f"environment variable {name} is not set but WORLD_SIZE={env.get('WORLD_SIZE')} "
                f"asks for several processes; launch with torchrun (it sets RANK, LOCAL_RANK, "
                f"WORLD_SIZE, MASTER_ADDR and MASTER_PORT)"
            )
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"environment variable {name} must be >= 0, got {value}")
    return value


def _pick_device(device, local_rank: int) -> torch.device:
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was requested but CUDA is not available; use 'cpu'")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def setup_from_env(device: str | torch.device | None = None, *, backend: str | None = None,
                   env: Mapping[str, str] | None = None) -> DistContext:
    """Join the process group ``torchrun`` describes; a no-op for a single process.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``
    through ``init_method="env://"``). ``WORLD_SIZE`` unset or 1: returns a single-process
    context and initializes nothing. Otherwise initializes the default group (if not done
    yet) with ``nccl`` on CUDA and ``gloo`` on CPU, and on CUDA binds the process to GPU
    ``LOCAL_RANK``.

    Args:
        device: ``None``/``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``.
        backend: override the backend (``"gloo"``, ``"nccl"``).
        env: environment mapping to read (default ``os.environ``).
    """
    env = os.environ if env is None else env
    world = _env_int(env, "WORLD_SIZE", 1)
    if world == 0:
        raise ValueError("environment variable WORLD_SIZE must be >= 1, got 0")
    if world == 1:
        return DistContext(device=_pick_device(device, 0))
    rank = _env_int(env, "RANK", None)
    local_rank = _env_int(env, "LOCAL_RANK", None)
    if rank >= world:
        raise ValueError(f"RANK={rank} must be smaller than WORLD_SIZE={world}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(name):
            raise ValueError(
                f"environment variable {name} is not set; launch with torchrun, or set "
                f"MASTER_ADDR and MASTER_PORT of the rank-0 host"
            )
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; cannot run WORLD_SIZE > 1")
    dev = _pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if dist.is_initialized():
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise RuntimeError(
                f"torch.distributed is already initialized as rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, but the environment says rank {rank} of {world}"
            )
        backend = dist.get_backend()
    else:
        if env is not os.environ:  # env:// reads os.environ; pass the values explicitly
            init = f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
        else:
            init = "env://"
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    return DistContext(rank, world, local_rank, dev, rank == 0, backend)


def cleanup() -> None:
    """Destroy the default process group if one is initialized (safe to call always)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, ctx: DistContext, *, sync_stats: bool = False,
             process_group=None, **ddp_kwargs) -> nn.Module:
    """Move ``model`` to ``ctx.device``, optionally synchronize its norms, wrap it in DDP.

    ``sync_stats=True`` first applies :func:`convert_sync` (global batch statistics);
    without it every process normalizes with its own slice of the batch. For a single
    process the (converted, moved) model is returned unwrapped. ``ddp_kwargs`` go to
    ``torch.nn.parallel.DistributedDataParallel``.
    """
    if not isinstance(ctx, DistContext):
        raise TypeError(f"wrap_ddp expects a DistContext (from setup_from_env()), got "
                        f"{type(ctx).__name__}")
    if sync_stats:
        model = convert_sync(model, process_group)
    model = model.to(ctx.device)
    if not ctx.distributed:
        return model
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"wrap_ddp: the context says world_size={ctx.world_size} but torch.distributed is "
            f"not initialized; call normlab.distributed.setup_from_env() first (under torchrun)"
        )
    if ctx.device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [ctx.device.index])
        ddp_kwargs.setdefault("output_device", ctx.device.index)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def shard_indices(n: int, ctx: DistContext, *, shuffle: bool = False, seed: int = 0,
                  epoch: int = 0, pad: bool = True) -> list[int]:
    """This rank's share of ``range(n)``, the same as ``torch.utils.data.DistributedSampler``.

    With ``shuffle`` the permutation comes from ``torch.randperm`` seeded with
    ``seed + epoch`` (identical on every rank). ``pad=True`` (training) repeats leading
    indices so that every rank gets ``ceil(n / world_size)`` — ranks must take the same
    number of steps under DDP; ``pad=False`` (evaluation) gives each index to exactly one
    rank (sizes differ by at most one), so summed metrics (:func:`all_reduce_sum`) are exact.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0 (the dataset size), got {n!r}")
    if shuffle:
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        indices = torch.randperm(n, generator=g).tolist()
    else:
        indices = list(range(n))
    world = ctx.world_size
    if pad and n > 0:
        total = -(-n // world) * world
        missing = total - n
        indices += (indices * math.ceil(missing / n))[:missing]
        return indices[ctx.rank:total:world]
    return indices[ctx.rank::world]


def all_reduce_sum(values: Tensor | Sequence[float], ctx: DistContext) -> Tensor:
    """Sum ``values`` (a tensor, or numbers such as ``[loss_sum, correct, count]``) over ranks.

    Returns a new tensor (a tensor keeps its dtype and device; numbers become float64 on
    CPU, moved to the GPU for NCCL); single process: a copy of the values.
    Use it for exact global metrics: sum numerators and counts, divide after.
    """
    t = values.detach().clone() if isinstance(values, Tensor) else torch.tensor(
        list(values), dtype=torch.float64)
    if ctx.distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("all_reduce_sum: torch.distributed is not initialized; call "
                               "setup_from_env() first")
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            t = t.to(ctx.device)
        dist.all_reduce(t)
    return t
