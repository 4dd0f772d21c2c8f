"""Training-time diagnostics as lab callbacks (:class:`normlab.lab.callbacks.Callback`).

* :class:`BandTracker` — quantile bands of ``x̂`` per iteration for chosen layers
  ([HA20] Fig. 4: "larger and larger activations appear during training").
* :class:`MomentConsistency` — at each step, moments of a random sub-batch against those of
  the full batch, for plain and filtered estimators ([HA20] Fig. 9: BN16/FBN16 vs BN128).
* :class:`LossLandscape` — loss and gradient change when stepping along the gradient by
  ``η ∈ {0.02, 0.01, 0.005, 0.001}`` ([HA20] Fig. 7 and 11, after Santurkar et al. 2018).
* :class:`GradientFactorTracker` — the BN gradient factor ``γ / sqrt(σ_B² + ε)``
  ([DF21] eq. 20) per layer and ``|γ − γ₀|``, ``|β|`` over time (§3.2: "the
  learned BN parameters tend to remain close to their initial values").

Every callback leaves parameters, buffers, ``.grad`` and the global RNG exactly as it found
them; extra forwards run inside :func:`normlab.diagnostics.paused` so no other recorder sees
them. ``write_artifacts(out_dir)`` writes a PNG plus JSON and CSV of every plotted number.
:func:`default_callbacks` builds the set used by ``normlab compare --diagnose``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .. import functional as F
from ..lab.callbacks import Callback, TrainState
from .io import write_csv, write_json
from .plots import plot_band_history, plot_consistency, plot_gradient_factor, plot_landscape
from .recorder import find_norm_layers, is_paused, norm_kind, norm_parts, paused
from .stats import DEFAULT_QUANTILES, DEFAULT_SIGMAS, band_name

__all__ = [
    "BandTracker",
    "MomentConsistency",
    "LossLandscape",
    "GradientFactorTracker",
    "default_callbacks",
    "DEFAULT_LANDSCAPE_STEPS",
]

DEFAULT_LANDSCAPE_STEPS: tuple[float, ...] = (0.02, 0.01, 0.005, 0.001)


def _check_every(every: Any) -> int:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an int >= 1 (record every n-th iteration), got {every!r}")
    return every


def _select(model: nn.Module, layers: Sequence[str] | None, kinds: tuple[str, ...] | None = None) -> dict[str, nn.Module]:
    found = find_norm_layers(model)
    if kinds is not None:
        found = {n: m for n, m in found.items() if norm_kind(m) in kinds}
    if layers is None:
        return found
    if isinstance(layers, str):
        layers = [layers]
    missing = [n for n in layers if n not in found]
    if missing:
        raise ValueError(f"no suitable normalization layer named {missing}; candidates: {list(found)}")
    return {n: found[n] for n in layers}


class _HookedCallback(Callback):
    """Registers forward hooks at ``on_train_begin``, removes them at ``on_train_end``.

    Hooks fire only for training-mode forwards of the current iteration when "armed" (every
    ``every``-th iteration), once per layer and iteration, and never while paused.
    """

    kinds: tuple[str, ...] | None = None

    def __init__(self, layers: Sequence[str] | None = None, every: int = 1) -> None:
        self.layers = layers
        self.every = _check_every(every)
        self.iteration = 0
        self._handles: list[Any] = []
        self._current: dict[str, Any] = {}
        self._pre_running: dict[int, tuple[Tensor, Tensor]] = {}
        self.modules: dict[str, nn.Module] = {}

    @property
    def armed(self) -> bool:
        return self.iteration % self.every == 0

    def on_train_begin(self, state: TrainState) -> None:
        self.close()
        self.modules = _select(state.model, self.layers, self.kinds)
        for name, module in self.modules.items():
            if norm_kind(module) == "renorm":
                self._handles.append(module.register_forward_pre_hook(self._renorm_pre))
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def _renorm_pre(self, module: nn.Module, args: tuple) -> None:
        if module.training and not is_paused():
            self._pre_running[id(module)] = (module.running_mean.detach().clone(),
                                             module.running_var.detach().clone())

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            running = self._pre_running.pop(id(module), None)
            if (is_paused() or not module.training or not self.armed or name in self._current
                    or not args or not isinstance(args[0], Tensor)):
                return
            self._current[name] = self.capture(name, module, args[0], running)
        return hook

    def capture(self, name: str, module: nn.Module, x: Tensor, running) -> Any:
        raise NotImplementedError

    def on_batch_end(self, state: TrainState) -> None:
        self._current = {}
        self.iteration += 1

    def on_train_end(self, state: TrainState) -> None:
        self.close()

    def close(self) -> None:
        """Remove this callback's hooks (also done by ``on_train_end``)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._current = {}
        self._pre_running.clear()


# ---------------------------------------------------------------------------------------
class BandTracker(_HookedCallback):
    """Quantile bands of ``x̂`` per iteration ([HA20] Fig. 4).

    For each selected layer and every ``every``-th iteration: exact min/max and exact counts
    of ``|x̂| > k`` over the whole batch, inner quantiles from at most ``max_values`` values
    drawn uniformly (own generator). ``history`` rows: ``{"iteration", "step", "layer",
    <band>: value, "beyond_<k>": count, "n"}``.
    """

    def __init__(self, layers: Sequence[str] | None = None, every: int = 1, *,
                 quantiles: Sequence[float] = DEFAULT_QUANTILES,
                 sigmas: Sequence[float] = DEFAULT_SIGMAS, max_values: int = 200_000,
                 seed: int = 0) -> None:
        super().__init__(layers, every)
        self.quantiles = tuple(float(q) for q in quantiles)
        self.sigmas = tuple(float(k) for k in sigmas)
        self.max_values = max_values
        self._gen = torch.Generator().manual_seed(seed)
        self.history: list[dict[str, Any]] = []

    def capture(self, name, module, x, running):
        v = norm_parts(module, x, running=running).xhat.reshape(-1).float().cpu()
        row: dict[str, Any] = {"n": v.numel()}
        inner = [q for q in self.quantiles if 0.0 < q < 1.0]
        sample = v
        if v.numel() > self.max_values:
            sample = v[torch.randint(v.numel(), (self.max_values,), generator=self._gen)]
        if inner:
            qs = np.quantile(sample.double().numpy(), inner)
            row.update({band_name(q): float(val) for q, val in zip(inner, qs)})
        if 0.0 in self.quantiles:
            row["min"] = float(v.min())
        if 1.0 in self.quantiles:
            row["max"] = float(v.max())
        absv = v.abs()
        for k in self.sigmas:
            row[f"beyond_{k:g}"] = int((absv > k).sum())
        return row

    def on_batch_end(self, state: TrainState) -> None:
        for name in self.modules:
            if name in self._current:
                self.history.append({"iteration": self.iteration, "step": state.step,
                                     "layer": name, **self._current[name]})
        super().on_batch_end(state)

    def write_artifacts(self, out_dir: Path) -> list[Path]:
        return _write_history(self.history, out_dir, "diag_band_history", plot_band_history)


# ---------------------------------------------------------------------------------------
class MomentConsistency(_HookedCallback):
    """Moments of a random sub-batch against the full batch ([HA20] Fig. 9).

    At every ``every``-th step, for each batch-statistics layer (BN, filtered BN, batch
    renorm) the input ``x`` of the training forward is taken; ``sub_batch`` samples are drawn
    without replacement (own generator); per channel the moments over ``(N, *spatial)`` give,
    averaged over channels:

    * ``bn``:       ``|μ_sub − μ_full|``, ``|σ²_sub − σ²_full|`` (plain moments, BN16 vs BN128);
    * ``fbn``:      filtered sub-batch moments (threshold ``T``, eq. 4–7) vs plain full
      moments (FBN16 vs BN128, the comparison of [HA20] Fig. 9);
    * ``fbn_gc``:   as ``fbn`` with the filtered variance divided by κ(T) (Gaussian-consistent:
      at T = 2 the raw filtered variance of a Gaussian is κ(2) ≈ 0.774 of the plain one, a
      bias that ``fbn`` includes);
    * ``fbn_self``: filtered sub vs filtered full (the filtered estimator's own consistency).

    ``|Δσ²|`` is also reported relative to ``σ²_full`` (``rel_dvar``). Note the sub-batch
    moments are taken at the layer's input as computed with full-batch statistics upstream
    ([HA20] ran the small batch through the network again); this isolates each layer's
    estimator.
    """

    kinds = ("batch", "renorm")

    def __init__(self, layers: Sequence[str] | None = None, every: int = 1, *,
                 sub_batch: int = 16, threshold: float = 2.0, seed: int = 0) -> None:
        super().__init__(layers, every)
        if isinstance(sub_batch, bool) or not isinstance(sub_batch, int) or sub_batch < 2:
            raise ValueError(f"sub_batch must be an int >= 2, got {sub_batch!r}")
        if not isinstance(threshold, (int, float)) or not threshold > 0:
            raise ValueError(f"threshold must be a number > 0, got {threshold!r}")
        self.sub_batch, self.threshold = sub_batch, float(threshold)
        self._gen = torch.Generator().manual_seed(seed)
        self.history: list[dict[str, Any]] = []
        self.skipped: dict[str, str] = {}

    def capture(self, name, module, x, running):
        return (x.detach(), module.eps)

    def on_after_backward(self, state: TrainState) -> None:
        for name in self.modules:
            if name not in self._current:
                continue
            x, eps = self._current[name]
            n = x.shape[0]
            if n <= self.sub_batch:
                self.skipped[name] = f"batch size {n} <= sub_batch {self.sub_batch}"
                continue
            with torch.no_grad():
                self.history.append({"iteration": self.iteration, "step": state.step, "layer": name,
                                     **self._measure(x, eps)})
        self._current = {k: v for k, v in self._current.items() if k not in self.modules}

    def _measure(self, x: Tensor, eps: float) -> dict[str, float]:
        xv = x.reshape(x.shape[0], x.shape[1], -1).float()
        idx = torch.randperm(x.shape[0], generator=self._gen)[: self.sub_batch].to(x.device)
        sub = xv.index_select(0, idx)
        T = self.threshold
        full = F.moments(xv, (0, 2))
        ffull = F.filtered_moments(xv, (0, 2), T, eps=eps, plain=full)
        plain_sub = F.moments(sub, (0, 2))
        fsub = F.filtered_moments(sub, (0, 2), T, eps=eps, plain=plain_sub)
        kappa = F.truncated_normal_variance_factor(T)
        est = {
            "bn": (plain_sub, full),
            "fbn": (fsub, full),
            "fbn_gc": (F.Moments(fsub.mean, fsub.var / kappa, fsub.count), full),
            "fbn_self": (fsub, ffull),
        }
        row = {}
        var_scale = full.var.reshape(-1) + eps
        for key, (s, ref) in est.items():
            dvar = (s.var - ref.var).abs().reshape(-1)
            row[f"{key}_dmean"] = float((s.mean - ref.mean).abs().mean())
            row[f"{key}_dvar"] = float(dvar.mean())
            row[f"{key}_rel_dvar"] = float((dvar / var_scale).mean())
        return row

    def write_artifacts(self, out_dir: Path) -> list[Path]:
        if not self.history:
            return []

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        return [write_json({"threshold": self.threshold, "sub_batch": self.sub_batch,
                            "skipped": self.skipped, "history": self.history},
                           out_dir / "diag_consistency.json"),
                write_csv(self.history, out_dir / "diag_consistency.csv"),
                plot_consistency(self.history, out_dir / "diag_consistency.png",
                                 title=f"sub-batch {self.sub_batch} vs full batch, T={self.threshold:g}")]


# ---------------------------------------------------------------------------------------
class LossLandscape(Callback):
    """Loss and gradient along the gradient direction ([HA20] Fig. 7; Santurkar et al.).

    At every ``every``-th step (in ``on_after_backward``), on the current batch, with the model
    in its training mode: ``g = ∇L(θ)``; for each ``η``: ``L(θ − η g)`` and
    ``‖∇L(θ − η g) − g‖₂``. Rows hold the losses, the gradient changes, and over
    ``{L(θ)} ∪ {L(θ − η g)}`` the range (max − min) and variance — [HA20] plots the
    variance, Santurkar et al. the range.

    Exactness: gradients come from ``torch.autograd.grad`` (``.grad`` is untouched);
    parameters and every buffer (running statistics, ``num_batches_tracked``) are copied
    back bit for bit after each evaluation; the global RNG is forked, and each evaluation
    re-seeds it identically so dropout masks are the same for every ``η``.
    """

    def __init__(self, steps: Sequence[float] = DEFAULT_LANDSCAPE_STEPS, every: int = 10, *,
                 seed: int = 0) -> None:
        steps = tuple(float(s) for s in steps)
        if not steps or any(not s > 0 for s in steps):
            raise ValueError(f"steps must be positive step sizes, e.g. (0.02, 0.01), got {steps!r}")
        self.steps = steps
        self.every = _check_every(every)
        self.seed = seed
        self.iteration = 0
        self.history: list[dict[str, Any]] = []

    def on_after_backward(self, state: TrainState) -> None:
        if self.iteration % self.every == 0 and state.inputs is not None and state.targets is not None:
            row = measure_landscape(state.model, state.loss_fn, state.inputs, state.targets,
                                    self.steps, seed=self.seed + self.iteration)
            self.history.append({"iteration": self.iteration, "step": state.step, **row})

    def on_batch_end(self, state: TrainState) -> None:
        self.iteration += 1

    def write_artifacts(self, out_dir: Path) -> list[Path]:
        if not self.history:
            return []

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        return [write_json({"steps": list(self.steps), "history": self.history},
                           out_dir / "diag_landscape.json"),
                write_csv(self.history, out_dir / "diag_landscape.csv"),
                plot_landscape(self.history, out_dir / "diag_landscape.png")]


def measure_landscape(model: nn.Module, loss_fn, inputs: Tensor, targets: Tensor,
                      steps: Sequence[float] = DEFAULT_LANDSCAPE_STEPS, *, seed: int = 0) -> dict[str, Any]:
    """One landscape measurement (see :class:`LossLandscape`); the model is left unchanged."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters to step along")
    saved_params = [p.detach().clone() for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index for p in params if p.device.type == "cuda"})

    def evaluate() -> tuple[float, list[Tensor]]:
        torch.manual_seed(seed)
        with torch.enable_grad():
            loss = loss_fn(model(inputs), targets)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
        return float(loss.detach()), grads

    try:
        with paused(), torch.random.fork_rng(devices=devices):
            loss0, g0 = evaluate()
            gnorm = math.sqrt(sum(float(g.double().square().sum()) for g in g0))
            losses, changes = {}, {}
            for eta in steps:
                with torch.no_grad():
                    for p, saved, g in zip(params, saved_params, g0):
                        p.copy_(saved - eta * g)
                loss, grads = evaluate()
                losses[eta] = loss
                changes[eta] = math.sqrt(sum(float((g - h).double().square().sum())
                                             for g, h in zip(grads, g0)))
    finally:
        with torch.no_grad():
            for p, saved in zip(params, saved_params):
                p.copy_(saved)
            for b, saved in buffers:
                b.copy_(saved)
    all_losses = [loss0, *losses.values()]
    all_changes = [0.0, *changes.values()]
    row: dict[str, Any] = {"loss": loss0, "grad_norm": gnorm}
    for eta in steps:
        row[f"loss_{eta:g}"] = losses[eta]
        row[f"grad_change_{eta:g}"] = changes[eta]
    row.update({
        "loss_min": min(all_losses), "loss_max": max(all_losses),
        "loss_range": max(all_losses) - min(all_losses),
        "loss_var": float(np.var(all_losses)),
        "grad_change_max": max(all_changes),
        "grad_change_var": float(np.var(all_changes)),
    })
    return row


# ---------------------------------------------------------------------------------------
class GradientFactorTracker(_HookedCallback):
    """BN gradient factor ``γ / sqrt(σ_B² + ε)`` ([DF21] eq. 20) and γ, β drift.

    At every ``every``-th step, per normalization layer: the per-channel factor
    ``γ_c · inv_std_c`` with ``inv_std`` the layer's own statistics in the training forward
    (filtered for filtered layers; averaged over samples/groups for per-sample norms; γ = 1
    without affine) — mean, median, min and max over channels; and ``|γ − γ₀|``, ``|β|``
    (mean and max over channels; γ₀ = values at ``on_train_begin``).
    """

    def __init__(self, layers: Sequence[str] | None = None, every: int = 1) -> None:
        super().__init__(layers, every)
        self.history: list[dict[str, Any]] = []
        self._gamma0: dict[str, Tensor] = {}

    def on_train_begin(self, state: TrainState) -> None:
        super().on_train_begin(state)
        self._gamma0 = {n: m.weight.detach().clone() for n, m in self.modules.items()
                        if getattr(m, "weight", None) is not None}

    def capture(self, name, module, x, running):
        return norm_parts(module, x, running=running).inv_std.detach().float().cpu()

    def on_after_backward(self, state: TrainState) -> None:
        for name, module in self.modules.items():
            if name not in self._current:
                continue
            inv = self._current.pop(name)
            c = inv.numel()
            weight = getattr(module, "weight", None)
            bias = getattr(module, "bias", None)
            gamma = (weight.detach().float().cpu().reshape(c, -1).mean(1) if weight is not None
                     else torch.ones(c))
            factor = (gamma * inv).abs()
            row: dict[str, Any] = {
                "iteration": self.iteration, "step": state.step, "layer": name,
                "factor_mean": float(factor.mean()), "factor_median": float(factor.median()),
                "factor_min": float(factor.min()), "factor_max": float(factor.max()),
                "gamma_mean": float(gamma.mean()),
            }
            if weight is not None:
                drift = (weight.detach() - self._gamma0[name].to(weight.device)).abs().float()
                row["gamma_drift_mean"] = float(drift.mean())
                row["gamma_drift_max"] = float(drift.max())
            if bias is not None:
                b = bias.detach().abs().float()
                row["beta_abs_mean"] = float(b.mean())
                row["beta_abs_max"] = float(b.max())
            self.history.append(row)

    def write_artifacts(self, out_dir: Path) -> list[Path]:
        return _write_history(self.history, out_dir, "diag_gradient_factor",
                              plot_gradient_factor)


# ---------------------------------------------------------------------------------------
_KNOWN = ("bands", "consistency", "landscape", "gradient_factor")


def default_callbacks(config: dict | None = None) -> list[Callback]:
    """The diagnostics callbacks for ``normlab compare --diagnose``.

    Options are read from ``config["diagnose"]`` when it is a dict (other keys of
    ``config`` are ignored; ``config["seed"]`` seeds the callbacks' own generators):

    ``callbacks`` (subset of ``["bands", "consistency", "landscape", "gradient_factor"]``,
    default all), ``layers`` (layer names for bands / factors, default all norms),
    ``every`` (1), ``landscape_every`` (10), ``landscape_steps`` ((0.02, 0.01, 0.005,
    0.001)), ``sub_batch`` (16), ``threshold`` (2.0), ``max_values`` (200000).
    """
    config = config or {}
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    opts = config.get("diagnose")
    opts = dict(opts) if isinstance(opts, dict) else {}
    seed = int(config.get("seed", 0) or 0)
    names = opts.get("callbacks", _KNOWN)
    unknown = [n for n in names if n not in _KNOWN]
    if unknown:
        raise ValueError(f"unknown diagnostics callbacks {unknown}; choose from {list(_KNOWN)}")
    every = opts.get("every", 1)
    layers = opts.get("layers")
    out: list[Callback] = []
    if "bands" in names:
        out.append(BandTracker(layers, every, max_values=opts.get("max_values", 200_000), seed=seed))
    if "consistency" in names:
        out.append(MomentConsistency(None, every, sub_batch=opts.get("sub_batch", 16),
                                     threshold=opts.get("threshold", 2.0), seed=seed))
    if "landscape" in names:
        out.append(LossLandscape(opts.get("landscape_steps", DEFAULT_LANDSCAPE_STEPS),
                                 opts.get("landscape_every", 10), seed=seed))
    if "gradient_factor" in names:
        out.append(GradientFactorTracker(layers, every))
    return out


def _write_history(history: list[dict[str, Any]], out_dir: Path, stem: str, plot) -> list[Path]:
    """``stem``.json, .csv and .png (``plot(history, path)``) of a callback's per-step rows
    in ``out_dir`` (created); nothing without rows."""
    if not history:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [write_json(history, out_dir / f"{stem}.json"),
            write_csv(history, out_dir / f"{stem}.csv"),
            plot(history, out_dir / f"{stem}.png")]
