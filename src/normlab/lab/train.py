"""One training run: a model with a normalization spec, trained on a dataset, evaluated each
epoch on the train/validation/test splits.

Protocol ([DF21] §4.1–4.3, and [SK20] §4.1):

* **Seeds.** Run ``i`` (``1, 2, ...``) seeds *every* RNG (Python, NumPy, torch on CPU and
  CUDA, and the batch order) with ``seed_value(i) = int(md5(str(i)).hexdigest()[-8:], 16)``,
  so a run is repeatable and different ``i`` are well separated.
* **Optimizer.** SGD with momentum 0.9 and weight decay 1e-4 on conv/linear weights only,
  through :func:`normlab.param_groups` (normalization parameters and biases get no decay; the
  γ's learning rate is divided by ``gamma_lr_divisor`` = c).
* **Schedule.** Half-period cosine decay over all steps, optionally preceded by a cosine
  ramp-up from 0 over ``warmup`` epochs ([SK20] §4.1):
  ``lr(t) = lr·½(1 − cos(π t / W))`` for ``t < W``, then
  ``lr(t) = lr·½(1 + cos(π (t − W) / (T − W)))``, updated every step.
* **Model selection.** The epoch with the best validation accuracy (the first one on ties) is
  the reported epoch; its test accuracy is the run's score.

``steps`` (optional) trains for a fixed number of iterations instead of whole epochs (the
[HA20] Fig. 6); the run is then evaluated ``epochs`` times, evenly spaced.

Options added for the classic-BN experiments (Ioffe & Szegedy 2015, arXiv 1502.03167); each is
left out of :meth:`RunConfig.to_dict` (and the config hash) at its default, so stores written
before they existed still resume:

* ``schedule="constant"`` keeps the peak rate after the warm-up (no cosine decay);
* ``augment="flip"`` / ``"crop-flip"``: random horizontal flips (and random 4-pixel-padded
  crops) of every training batch, drawn from their own seeded generator;
* ``precise_bn=N``: every evaluation uses the population statistics of the paper's
  Algorithm 2 (:func:`normlab.precise_bn_` over N training batches, drawn once per run)
  instead of the running averages; training is unaffected (the averages are restored after
  each evaluation, and its dropout draws use a forked RNG), the final model keeps the
  population statistics;
* ``probe="percentiles"`` / ``"shape"`` (``mlp`` only): record the 15th/50th/85th percentiles
  of the input to the last hidden layer's nonlinearity over training (the paper's
  Fig. 1(b, c)), or per-unit skewness, excess kurtosis and fraction of zeros of ``Wu + b`` and
  ``u`` at every evaluation (:mod:`normlab.lab.probes`), into ``RunResult.extra["probe"]``.

A run whose loss becomes non-finite stops there and is stored with ``extra["diverged"] =
True`` (its validation accuracy at that evaluation is NaN, so the reported epoch is the best
one before it); the report counts diverged runs per method.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .. import __version__
from .._checks import check_output_file, resolve_device as check
from ..distributed import DistContext, shard_indices, unwrap, wrap_ddp
from ..nn.input_norm import with_input_norm
from ..optim import init_norm_, param_groups
from ..precise_bn import batch_stat_layers, precise_bn_
from ..registry import uses_batch_stats
from .callbacks import Callback, TrainState
from .data import load_dataset
from .models import build_model
from .probes import make_probe

__all__ = ["RunConfig", "RunResult", "seed_value", "seed_everything", "train_run",
           "resolve_device", "cosine_lr_factor", "lr_factor", "augment_batch", "save_checkpoint",
           "CheckpointError", "INPUT_NORM_MODES", "SCHEDULES", "AUGMENTS", "PROBES"]

INPUT_NORM_MODES = ("offline", "fixed", "online", "none")
SCHEDULES = ("cosine", "constant")
AUGMENTS = ("none", "flip", "crop-flip")
PROBES = ("percentiles", "shape")


def seed_value(i: int) -> int:
    """The RNG seed of run ``i``: ``int(md5(str(i)).hexdigest()[-8:], 16)`` ([DF21]
    §4.3: sequential seeds "made more complex using MD5")."""
    if isinstance(i, bool) or not isinstance(i, int):
        raise TypeError(f"run index must be an int, got {i!r}")
    return int(hashlib.md5(str(i).encode()).hexdigest()[-8:], 16)


def seed_everything(value: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device) RNGs with ``value``."""
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)  # also seeds every CUDA device


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``"auto"``/None → CUDA when available, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"``;
    anything else (``"tpu"``, ``"meta"``, a GPU that is not there) is a one-line
    ``ValueError``."""
    return check(device)


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's result, except the seed and the device.

    ``config_hash()`` identifies the configuration in the run store.
    """

    data: str = "mnist"
    model: str = "lenet5"
    norm: str = "bn"
    placement: str = "all"
    gamma: float | None = None           # γ init of every norm layer (None: the layer default)
    gamma_lr_divisor: float = 1.0        # c: γ's learning rate is lr / c
    input_norm: str = "offline"          # offline | fixed | online (BN-based layer) | none
    batch_size: int = 64
    epochs: int = 10
    steps: int | None = None             # fixed number of iterations instead of epochs
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup: float = 0.0                  # epochs of cosine ramp-up
    amp: bool = False
    channels_last: bool = False
    sync_stats: bool = False             # SyncBN-style statistics under torchrun
    limit: int | None = None             # dataset subsample (smoke runs)
    data_root: str | None = None
    data_options: tuple[tuple[str, Any], ...] = ()
    model_options: tuple[tuple[str, Any], ...] = ()
    # added later: left out of to_dict()/config_hash() at their defaults (old stores resume)
    schedule: str = "cosine"             # cosine | constant (after the optional warm-up)
    augment: str = "none"                # none | flip | crop-flip
    precise_bn: int | None = None        # evaluate with Algorithm 2 over N training batches
    probe: str | None = None             # percentiles | shape (mlp)

    def __post_init__(self) -> None:
        def positive(name: str, value: Any, kind=int, allow_zero=False) -> None:
            ok = (not isinstance(value, bool) and isinstance(value, (int, float) if kind is float
                                                              else int))
            if ok and not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
            if not ok or value < 0 or (value == 0 and not allow_zero):
                what = "a non-negative" if allow_zero else "a positive"
                raise ValueError(f"{name} must be {what} {kind.__name__}, got {value!r}")

        positive("batch_size", self.batch_size)
        positive("epochs", self.epochs)
        if self.steps is not None:
            positive("steps", self.steps)
        positive("lr", self.lr, float)
        positive("gamma_lr_divisor", self.gamma_lr_divisor, float)
        positive("momentum", self.momentum, float, allow_zero=True)
        positive("weight_decay", self.weight_decay, float, allow_zero=True)
        positive("warmup", self.warmup, float, allow_zero=True)
        if self.gamma is not None:
            positive("gamma", self.gamma, float)
        if self.input_norm not in INPUT_NORM_MODES:
            raise ValueError(f"input_norm must be one of {', '.join(INPUT_NORM_MODES)}, got "
                             f"{self.input_norm!r}")
        for name, value, valid in (("schedule", self.schedule, SCHEDULES),
                                   ("augment", self.augment, AUGMENTS),
                                   ("probe", self.probe, PROBES + (None,))):
            if value not in valid:
                shown = ", ".join(str(v) for v in valid if v is not None)
                raise ValueError(f"{name} must be one of {shown}, got {value!r}")
        if self.precise_bn is not None:
            positive("precise_bn", self.precise_bn)
        if self.batch_size < 2 and uses_batch_stats(self.norm):
            raise ValueError(f"batch_size {self.batch_size} is too small for batch statistics "
                             f"({self.norm!r}); use at least 2")

    def to_dict(self) -> dict[str, Any]:
        """Every field, except the later additions (:data:`_LATER_FIELDS`) at their defaults."""
        d = asdict(self)
        d["data_options"] = dict(self.data_options)
        d["model_options"] = dict(self.model_options)
        for name, default in _LATER_FIELDS.items():
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown run config key(s) {unknown}; valid keys: {sorted(known)}")
        d = dict(d)
        d["data_options"] = tuple(sorted(dict(d.get("data_options") or {}).items()))
        d["model_options"] = tuple(sorted(dict(d.get("model_options") or {}).items()))
        return cls(**d)

    def config_hash(self) -> str:
        """First 16 hex digits of the SHA-256 of the canonical JSON of :meth:`to_dict`."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


#: Fields added after stores existed, with the defaults at which they are left out of
#: :meth:`RunConfig.to_dict`, so the hash of every earlier configuration is unchanged.
_LATER_FIELDS: dict[str, Any] = {"schedule": "cosine", "augment": "none", "precise_bn": None,
                                 "probe": None}


@dataclass
class RunResult:
    """A finished run: per-epoch metrics, the chosen (best-validation) epoch and its scores."""

    config: RunConfig
    seed: int
    epochs: list[dict[str, float]]
    chosen_epoch: int
    val_acc: float
    test_acc: float
    wall_time: float
    device: str
    versions: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)


def cosine_lr_factor(step: int, total: int, warmup: int = 0) -> float:
    """The learning-rate multiplier at ``step`` (0-based) of ``total`` steps: a cosine ramp-up
    ``½(1 − cos(π (step+1) / warmup))`` over the first ``warmup`` steps ([SK20] §4.1), then a
    half-period cosine decay ``½(1 + cos(π (step − warmup) / (total − warmup)))``."""
    if warmup > 0 and step < warmup:
        return 0.5 * (1.0 - math.cos(math.pi * (step + 1) / warmup))
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """The learning-rate multiplier of ``schedule`` at ``step``: ``"cosine"`` is
    :func:`cosine_lr_factor`; ``"constant"`` is the same cosine ramp-up over ``warmup`` steps,
    then 1."""
    if schedule == "constant":
        return cosine_lr_factor(step, total, warmup) if (warmup > 0 and step < warmup) else 1.0
    if schedule != "cosine":
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    return cosine_lr_factor(step, total, warmup)


def augment_batch(x: torch.Tensor, mode: str, generator: torch.Generator,
                  pad: int = 4) -> torch.Tensor:
    """Random horizontal flips (probability ½ per image) for ``"flip"``; for ``"crop-flip"``
    first a random ``H × W`` crop of the image zero-padded by ``pad`` pixels on every side
    (the usual CIFAR augmentation). Draws come from ``generator`` (on the CPU)."""
    if mode == "none" or x.dim() != 4:
        return x
    n, _, h, w = x.shape
    if mode == "crop-flip":
        padded = nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def versions() -> dict[str, str]:
    """Versions of what shapes a result: normlab, torch, numpy, Python, platform."""
    return {"normlab": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(terse=True)}


# ---- data -------------------------------------------------------------------------------------

_DATA_CACHE: dict[str, Any] = {}


def load_data(config: RunConfig):
    """The dataset of ``config`` (cached per process: all runs of a comparison share it)."""
    data_norm = "none" if config.input_norm == "online" else config.input_norm
    key = json.dumps([config.data, config.data_root, data_norm, config.limit,
                      list(config.data_options)], sort_keys=True, default=str)
    if key not in _DATA_CACHE:
        if len(_DATA_CACHE) > 4:
            _DATA_CACHE.clear()
        _DATA_CACHE[key] = load_dataset(config.data, root=config.data_root, input_norm=data_norm,
                                        limit=config.limit, **dict(config.data_options))
    return _DATA_CACHE[key]


def build(config: RunConfig, data) -> nn.Module:
    """The model of ``config`` for ``data``, with γ init and the online input norm applied."""
    model = build_model(config.model, norm=config.norm, num_classes=data.num_classes,
                        in_channels=data.in_channels, image_size=data.image_size,
                        placement=config.placement, **dict(config.model_options))
    if config.gamma is not None:
        init_norm_(model, gamma=config.gamma)
    if config.input_norm == "online":
        model = with_input_norm(model, data.in_channels, gamma=config.gamma or 1.0)
    return model


def make_param_groups(model: nn.Module, config: RunConfig) -> list[dict[str, Any]]:
    """SGD parameter groups via :func:`normlab.param_groups` (no decay on norm parameters and
    biases; γ's lr divided by c)."""
    return param_groups(model, lr=config.lr, weight_decay=config.weight_decay,
                        gamma_lr_divisor=config.gamma_lr_divisor)


# ---- evaluation -------------------------------------------------------------------------------

def _batches(n: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """Index batches of one pass: shuffled with ``generator`` (or in order when None). Only
    full batches are used for training (a last batch of 1 would break batch statistics); if
    ``n < batch_size`` the single batch holds everything."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    if n < batch_size:
        return [order]
    return list(order[: (n // batch_size) * batch_size].split(batch_size))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, device: torch.device,
             batch_size: int = 500, amp: bool = False, channels_last: bool = False
             ) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (%) of ``model`` in eval mode on ``(x, y)``."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        xb = _to(x[start:start + batch_size], device, channels_last)
        yb = y[start:start + batch_size].to(device)
        with _autocast(device, amp):
            logits = model(xb)
        total_loss += float(nn.functional.cross_entropy(logits.float(), yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    n = max(1, len(y))
    return total_loss / n, 100.0 * correct / n


def _to(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _autocast(device: torch.device, amp: bool):
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=amp)


# ---- the run ----------------------------------------------------------------------------------

def train_run(config: RunConfig, seed: int = 1, *, device: str | torch.device | None = None,
              callbacks: Sequence[Callback] = (), progress: bool = False,
              distributed: DistContext | None = None, artifacts_dir: str | Path | None = None,
              on_epoch: Callable[[dict[str, float]], None] | None = None,
              checkpoint_path: str | Path | None = None,
              on_result: Callable[[RunResult], None] | None = None) -> RunResult:
    """Train ``config`` with run index ``seed`` and return its :class:`RunResult`.

    Args:
        config: the :class:`RunConfig`.
        seed: run index ``i >= 1``; every RNG is seeded with :func:`seed_value` ``(i)``.
        device: ``"auto"``/None (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        callbacks: :class:`~normlab.lab.callbacks.Callback` s, called as documented there.
        progress: show a tqdm bar over the epochs.
        distributed: a context from :func:`normlab.distributed.setup_from_env` (torchrun):
            each process trains on its shard of every batch order, gradients are averaged
            (DDP), and with ``config.sync_stats`` batch statistics span all processes.
        artifacts_dir: where callbacks write their artifacts (``write_artifacts``).
        on_epoch: called with each epoch's metrics dict.
        checkpoint_path: where to save the trained model (rank 0 only) as
            ``{"model": state_dict, "config": config.to_dict(), "seed": i, "epochs": [...]}``,
            the format ``normlab inspect --checkpoint`` reads. The path is checked before
            training (not a folder, writable: ``ValueError``); the file is written to a
            temporary file and renamed, so a failed or interrupted save leaves no
            half-written checkpoint (a failure raises :class:`CheckpointError`).
        on_result: called with the finished :class:`RunResult` *before* the checkpoint is
            saved — store the result there, and a failed save (a full disk) loses nothing.
            A failure to write the callbacks' artifacts is raised after it too (and noted
            in ``extra["artifacts_error"]``).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 1:
        raise ValueError(f"seed (run index) must be an int >= 1, got {seed!r}")
    dev = distributed.device if distributed is not None else resolve_device(device)
    rank, world = _rank_world(distributed)
    if checkpoint_path is not None and rank == 0:
        checkpoint_path = check_output_file(checkpoint_path, "checkpoint")
    if config.amp and dev.type == "cpu" and not _cpu_bf16_ok():
        raise ValueError("--amp on CPU needs bfloat16 support; drop --amp")
    start_time = time.perf_counter()
    data = load_data(config)
    seed_everything(seed_value(seed))
    model = build(config, data)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if distributed is not None:  # convert_sync (with sync_stats), move, DDP for > 1 process
        train_model = wrap_ddp(model, distributed, sync_stats=config.sync_stats)
        model = unwrap(train_model)
    else:
        train_model = model = model.to(dev)
    optimizer = torch.optim.SGD(make_param_groups(model, config), lr=config.lr,
                                momentum=config.momentum)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    scaler = torch.amp.GradScaler("cuda") if (config.amp and dev.type == "cuda") else None

    x_train, y_train = data.train.tensors
    x_val, y_val = data.val.tensors
    x_test, y_test = data.test.tensors
    generator = torch.Generator().manual_seed(seed_value(seed))
    steps_per_pass = len(_batches(len(y_train), config.batch_size, None))
    if config.steps is not None:
        total_steps = config.steps
        evals = min(config.epochs, total_steps)
        eval_at = {round(total_steps * (k + 1) / evals) for k in range(evals)}
    else:
        total_steps = config.epochs * steps_per_pass
        eval_at = {steps_per_pass * (k + 1) for k in range(config.epochs)}
    warmup_steps = int(round(config.warmup * steps_per_pass))

    probes = []
    if config.probe is not None:
        probes = [make_probe(config.probe, model, x_test, total_steps=total_steps,
                             channels_last=config.channels_last)]
        callbacks = list(callbacks) + probes
    augment_gen = torch.Generator().manual_seed(seed_value(seed) + 2)
    precise_batches = (_precise_bn_batches(len(y_train), config, seed, distributed)
                       if config.precise_bn else None)
    state = TrainState(model=model, optimizer=optimizer, loss_fn=nn.functional.cross_entropy,
                       device=dev, config=config.to_dict())
    for cb in callbacks:
        cb.on_train_begin(state)

    epochs: list[dict[str, float]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm  # lazy: optional dependency (tqdm, for --progress)

        bar = tqdm(total=len(eval_at), desc=f"{config.norm} seed {seed}", unit="epoch",
                   leave=False)
    step, diverged = 0, False
    run_loss, run_correct, run_seen = 0.0, 0, 0
    model.train()
    while step < total_steps and not diverged:
        for idx in _batches(len(y_train), config.batch_size, generator):
            if step >= total_steps:
                break
            idx = _share(idx, distributed)
            xb = _to(augment_batch(x_train[idx], config.augment, augment_gen), dev,
                     config.channels_last)
            yb = y_train[idx].to(dev)
            factor = lr_factor(config.schedule, step, total_steps, warmup_steps)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            optimizer.zero_grad(set_to_none=True)
            with _autocast(dev, config.amp):
                logits = train_model(xb)
                loss = nn.functional.cross_entropy(logits.float(), yb)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            state.step, state.inputs, state.targets = step, xb, yb
            state.loss = float(loss.detach())
            for cb in callbacks:
                cb.on_after_backward(state)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            for cb in callbacks:
                cb.on_batch_end(state)
            step += 1
            if not math.isfinite(state.loss):
                diverged = True
            else:
                run_loss += state.loss * len(yb)
                run_correct += int((logits.detach().argmax(1) == yb).sum())
                run_seen += len(yb)
            if step in eval_at and not diverged:
                diverged = not _finite_state(model)  # a step can leave NaN/inf weights
            if step in eval_at or diverged:
                final = diverged or step >= total_steps
                with _precise_statistics(model, config, precise_batches, x_train, dev,
                                         keep=final):
                    metrics = _epoch_metrics(model, len(epochs) + 1, step, run_loss, run_correct,
                                             run_seen, optimizer, (x_val, y_val),
                                             (x_test, y_test), dev, config, diverged)
                if not (diverged or math.isfinite(metrics["val_loss"] + metrics["test_loss"])):
                    diverged = True  # finite weights whose outputs overflow to NaN/inf
                    metrics["val_acc"] = math.nan
                epochs.append(metrics)
                run_loss, run_correct, run_seen = 0.0, 0, 0
                state.epoch, state.metrics = metrics["epoch"], dict(metrics)
                for cb in callbacks:
                    cb.on_epoch_end(state)
                if on_epoch is not None:
                    on_epoch(metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(val=f"{metrics['val_acc']:.1f}",
                                    test=f"{metrics['test_acc']:.1f}")
                if diverged:
                    break
    if bar is not None:
        bar.close()
    for cb in callbacks:
        cb.on_train_end(state)
    artifacts: list[str] = []
    artifacts_error: OSError | None = None
    if artifacts_dir is not None and callbacks:
        out = Path(artifacts_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            for cb in callbacks:
                artifacts += [str(p) for p in cb.write_artifacts(out)]
        except OSError as error:  # raised after the result is handed over: the run is kept
            artifacts_error = error

    chosen = _choose_epoch(epochs)
    best = epochs[chosen - 1]
    extra: dict[str, Any] = {"diverged": diverged, "steps": step,
                             "sizes": {"train": len(y_train), "val": len(y_val),
                                       "test": len(y_test)}}
    if artifacts:
        extra["artifacts"] = artifacts
    if artifacts_error is not None:
        extra["artifacts_error"] = str(artifacts_error)
    if probes:
        extra["probe"] = {config.probe: probes[0].record}
    if world > 1:
        extra["world_size"] = world
    result = RunResult(config=config, seed=seed, epochs=epochs, chosen_epoch=chosen,
                       val_acc=best["val_acc"], test_acc=best["test_acc"],
                       wall_time=time.perf_counter() - start_time, device=str(dev),
                       versions=versions(), extra=extra)
    if on_result is not None:
        on_result(result)
    if checkpoint_path is not None and rank == 0:
        save_checkpoint(checkpoint_path, model, config, seed, epochs)
    if artifacts_error is not None:
        raise artifacts_error
    return result


class CheckpointError(OSError):
    """Saving a checkpoint failed; nothing was left behind (the run's result is unaffected)."""

    def __str__(self) -> str:
        return str(self.strerror)


def _share(idx: torch.Tensor, distributed: DistContext | None) -> torch.Tensor:
    """This process's rows of one global batch under torchrun (every rank takes every
    world-th index, :func:`normlab.distributed.shard_indices` without padding); DDP averages
    the gradients, so the global batch is ``config.batch_size`` as in one process."""
    if distributed is None or distributed.world_size == 1:
        return idx
    return idx[shard_indices(len(idx), distributed, pad=False)]


def _precise_bn_batches(n: int, config: RunConfig, seed: int,
                        distributed: DistContext | None) -> list[torch.Tensor]:
    """``config.precise_bn`` index batches of the training split at the training batch size,
    from passes shuffled by their own generator (this process's shard under torchrun)."""
    generator = torch.Generator().manual_seed(seed_value(seed) + 1)
    out: list[torch.Tensor] = []
    while len(out) < config.precise_bn:
        out += _batches(n, config.batch_size, generator)
    return [_share(idx, distributed) for idx in out[:config.precise_bn]]


@contextlib.contextmanager
def _precise_statistics(model: nn.Module, config: RunConfig, batches, x_train: torch.Tensor,
                        dev: torch.device, *, keep: bool):
    """With ``config.precise_bn``: the batch-statistics layers hold Algorithm 2's population
    statistics inside the block; their running averages come back afterwards unless ``keep``.
    The passes run under a forked RNG, so dropout in them leaves training's draws alone."""
    if not config.precise_bn:
        yield
        return

    layers = batch_stat_layers(model)
    saved = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in layers.items()}
    devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if (
        dev.type == "cuda") else []
    with torch.random.fork_rng(devices=devices):
        precise_bn_(model, (_to(x_train[idx], dev, config.channels_last) for idx in batches),
                    num_batches=len(batches), progress=False)
    try:
        yield
    finally:
        if not keep:
            with torch.no_grad():
                for name, m in layers.items():
                    m.running_mean.copy_(saved[name][0])
                    m.running_var.copy_(saved[name][1])


def save_checkpoint(path: str | Path, model: nn.Module, config: RunConfig, seed: int,
                    epochs: list[dict[str, float]]) -> Path:
    """Save ``{"model", "config", "seed", "epochs"}`` atomically: into a temporary file in the
    same folder, flushed to disk, then renamed over ``path``. On any failure (a full disk, a
    folder that vanished) the temporary file is removed and :class:`CheckpointError` raised."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            torch.save({"model": state, "config": config.to_dict(), "seed": seed,
                        "epochs": epochs}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise CheckpointError(error.errno, f"cannot save the checkpoint {str(path)!r}: "
                                           f"{error.strerror or error}") from error
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    return path


def _epoch_metrics(model, epoch, step, run_loss, run_correct, run_seen, optimizer, val, test,
                   dev, config, diverged) -> dict[str, float]:
    val_loss, val_acc = evaluate(model, *val, device=dev, amp=config.amp,
                                 channels_last=config.channels_last)
    test_loss, test_acc = evaluate(model, *test, device=dev, amp=config.amp,
                                   channels_last=config.channels_last)
    seen = max(1, run_seen)
    return {"epoch": epoch, "step": step,
            "train_loss": run_loss / seen if run_seen else math.nan,
            "train_acc": 100.0 * run_correct / seen if run_seen else math.nan,
            "val_loss": val_loss, "val_acc": val_acc if not diverged else math.nan,
            "test_loss": test_loss, "test_acc": test_acc,
            "lr": float(optimizer.param_groups[0]["lr"])}


def _finite_state(model: nn.Module) -> bool:
    """True when every floating parameter and buffer of ``model`` is finite."""
    tensors = list(model.parameters()) + list(model.buffers())
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def _choose_epoch(epochs: list[dict[str, float]]) -> int:
    """1-based epoch with the best validation accuracy (first on ties; NaN never wins)."""
    best, chosen = -math.inf, 1
    for m in epochs:
        v = m["val_acc"]
        if v == v and v > best:
            best, chosen = v, int(m["epoch"])
    return chosen


def _rank_world(distributed: DistContext | None) -> tuple[int, int]:
    if distributed is None:
        return 0, 1
    return distributed.rank, distributed.world_size


def _cpu_bf16_ok() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.ones(2, 2) @ torch.ones(2, 2)
        return True
    except RuntimeError:
        return False


def iter_seeds(seeds: Iterable[int]) -> list[int]:
    """Validate run indices (ints >= 1), keeping their order and dropping repeats."""
    out: list[int] = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"seeds are run indices >= 1, got {s!r}")
        if s not in out:
            out.append(s)
    return out
