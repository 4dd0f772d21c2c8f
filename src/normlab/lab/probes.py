"""Measurements taken during training for the classic-BN presets (``RunConfig.probe``).

Ioffe & Szegedy 2015 (arXiv 1502.03167) Fig. 1(b, c) show "the evolution of input
distributions to a typical sigmoid, over the course of training, shown as {15, 50, 85}th
percentiles", with and without BN; §3.2 argues that ``Wu + b`` is "more Gaussian" than the
nonlinearity's output ``u`` (the question in ``qa-why-normalize-wu-plus-b.txt``). Two probes
measure exactly these on the :class:`~normlab.lab.models.MLP`:

* ``"percentiles"`` — :class:`InputPercentiles`: at step 0 and ``points`` evenly spaced steps,
  the 15th/50th/85th percentiles, over the probe images, of the input of the last hidden
  layer's nonlinearity for its first ``units`` units;
* ``"shape"`` — :class:`ShapeTrace`: at step 0 and every evaluation, for every hidden layer,
  the skewness, excess kurtosis (:func:`normlab.diagnostics.stats.skewness` /
  :func:`~normlab.diagnostics.stats.excess_kurtosis`: 0 and 0 for a Gaussian) and fraction of
  exact zeros of ``Wu + b`` (the linear layer's output) and of ``u`` (the nonlinearity's
  output), each computed per unit over the probe images and summarized by the median over
  units (the zero fraction by the mean).

The probe images are the test split. Each measurement runs a copy of the model under
``no_grad`` with its batch-statistics layers in training mode — the distribution training
sees, with the statistics of the probe images, not the running averages — and everything
else (dropout) in eval mode; the model itself, its buffers and the RNG are untouched, as
the callback contract (:mod:`normlab.lab.callbacks`) requires.
"""

from __future__ import annotations

import copy
import math
import statistics
from typing import Any

import torch
from torch import Tensor, nn

from ..precise_bn import batch_stat_layers
from .callbacks import Callback, TrainState
from .models import MLP

__all__ = ["InputPercentiles", "ShapeTrace", "make_probe", "PERCENTILES"]

PERCENTILES = (15.0, 50.0, 85.0)


def _hidden_blocks(model: nn.Module) -> nn.Sequential:
    """The ``hidden`` blocks of an :class:`~normlab.lab.models.MLP` (also inside the online
    input norm's ``nn.Sequential``)."""
    for m in model.modules():
        if isinstance(m, MLP):
            return m.hidden
    raise ValueError(f"the probes measure the fully connected net (--model mlp), got "
                     f"{type(model).__name__}; drop the probe or use model mlp")


def _probe_copy(model: nn.Module) -> nn.Module:
    """A copy in eval mode with its batch-statistics layers in training mode."""
    twin = copy.deepcopy(model).eval()
    for m in batch_stat_layers(twin).values():
        m.train()
    return twin


def _capture(model: nn.Module, inputs: Tensor, targets: dict[str, tuple[str, str]]
             ) -> dict[str, Tensor]:
    """Run a probe copy of ``model`` on ``inputs``; ``targets`` maps a key to ``(module path
    in the hidden blocks, "in"|"out")``; returns ``{key: (N, units) float64}``."""
    twin = _probe_copy(model)
    blocks = _hidden_blocks(twin)
    modules = dict(blocks.named_modules())
    got: dict[str, Tensor] = {}
    handles = []
    for key, (path, where) in targets.items():
        def hook(module, args, output=None, key=key, where=where):
            value = args[0] if where == "in" else output
            got[key] = value.detach().to(torch.float64).reshape(value.shape[0], -1).cpu()
        module = modules[path]
        handles.append(module.register_forward_pre_hook(hook) if where == "in"
                       else module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            twin(inputs)
    finally:
        for h in handles:
            h.remove()
    return got


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class _Probe(Callback):
    """Shared: the probe images and the record (``{"steps": [...], ...}``)."""

    def __init__(self, inputs: Tensor, *, max_inputs: int = 1000,
                 channels_last: bool = False) -> None:
        self.inputs = inputs[:max_inputs]
        self.channels_last = channels_last
        self.record: dict[str, Any] = {"steps": []}

    def _inputs(self, model: nn.Module) -> Tensor:
        x = self.inputs.to(_device_of(model))
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def on_train_begin(self, state: TrainState) -> None:
        _hidden_blocks(state.model)  # fail early, with the message
        self.measure(state.model, 0)

    def measure(self, model: nn.Module, step: int) -> None:
        raise NotImplementedError


class InputPercentiles(_Probe):
    """15th/50th/85th percentiles of the input of the last hidden nonlinearity (BN paper
    Fig. 1(b, c)), for units ``0 .. units−1``, at step 0 and ``points`` evenly spaced steps.

    ``record = {"steps": [s…], "layer": i, "p15": [[unit 0, unit 1, …] per step], "p50": …,
    "p85": …}``.
    """

    def __init__(self, inputs: Tensor, *, total_steps: int, points: int = 50, units: int = 4,
                 **kwargs: Any) -> None:
        super().__init__(inputs, **kwargs)
        every = max(1, total_steps // max(1, points))
        self.at = set(range(every, total_steps + 1, every)) | {total_steps}
        self.units = units
        for q in PERCENTILES:
            self.record[f"p{q:g}"] = []

    def measure(self, model: nn.Module, step: int) -> None:
        blocks = _hidden_blocks(model)
        last = len(blocks) - 1
        x = _capture(model, self._inputs(model), {"act": (f"{last}.act", "in")})["act"]
        x = x[:, :self.units]
        qs = torch.quantile(x, torch.tensor(PERCENTILES, dtype=x.dtype) / 100.0, dim=0)
        self.record["steps"].append(step)
        self.record["layer"] = last
        for q, row in zip(PERCENTILES, qs):
            self.record[f"p{q:g}"].append([float(v) for v in row])

    def on_batch_end(self, state: TrainState) -> None:
        if state.step + 1 in self.at:
            self.measure(state.model, state.step + 1)


def _per_unit_shape(values: Tensor) -> dict[str, float]:
    """Median over units of skewness and excess kurtosis, mean fraction of exact zeros;
    ``values`` is ``(N, units)``. Units with zero variance give NaN moments and are left out
    of the medians (counted in ``constant_units``)."""
    # lazy: import cycle (diagnostics imports lab)
    from ..diagnostics.stats import excess_kurtosis, skewness

    skews, kurts = [], []
    for unit in values.T:
        skews.append(skewness(unit))
        kurts.append(excess_kurtosis(unit))
    finite = [i for i, k in enumerate(kurts) if k == k]

    def median(xs):  # the mean of the two middle values for an even count
        xs = [xs[i] for i in finite]
        return statistics.median(xs) if xs else math.nan

    return {"skewness": median(skews), "excess_kurtosis": median(kurts),
            "zero_fraction": float((values == 0).double().mean()),
            "constant_units": len(kurts) - len(finite)}


class ShapeTrace(_Probe):
    """Per hidden layer, the shape of ``Wu + b`` and of ``u`` at step 0 and every evaluation.

    ``record = {"steps": [s…], "epochs": [0, 1, …], "layers": {"0": {"wub": [{skewness,
    excess_kurtosis, zero_fraction, constant_units} per point], "u": [...]}, ...}}``.
    """

    def __init__(self, inputs: Tensor, **kwargs: Any) -> None:
        super().__init__(inputs, **kwargs)
        self.record["epochs"] = []
        self.record["layers"] = {}

    def measure(self, model: nn.Module, step: int, epoch: int = 0) -> None:
        blocks = _hidden_blocks(model)
        targets = {}
        for i in range(len(blocks)):
            targets[f"{i}/wub"] = (f"{i}.linear", "out")
            targets[f"{i}/u"] = (f"{i}.act", "out")
        got = _capture(model, self._inputs(model), targets)
        self.record["steps"].append(step)
        self.record["epochs"].append(epoch)
        for key, values in got.items():
            layer, part = key.split("/")
            entry = self.record["layers"].setdefault(layer, {"wub": [], "u": []})
            entry[part].append(_per_unit_shape(values))

    def on_epoch_end(self, state: TrainState) -> None:
        self.measure(state.model, state.step + 1, state.epoch)


def make_probe(name: str, model: nn.Module, inputs: Tensor, *, total_steps: int,
               channels_last: bool = False) -> _Probe:
    """The probe ``name`` (``"percentiles"`` or ``"shape"``) for ``model``, measuring on
    ``inputs``."""
    _hidden_blocks(model)
    if name == "percentiles":
        return InputPercentiles(inputs, total_steps=total_steps, channels_last=channels_last)
    if name == "shape":
        return ShapeTrace(inputs, channels_last=channels_last)
    raise ValueError(f"unknown probe {name!r}; valid probes: percentiles, shape")
