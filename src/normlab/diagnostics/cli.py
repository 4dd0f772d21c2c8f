"""``normlab inspect``: where are the outliers in a trained model's normalization layers?

Builds a model (the lab's ``--model NAME --norm SPEC`` or any ``--factory module:function``),
loads ``--checkpoint``, runs a dataset split through it (eval mode by default: running
statistics, as [HA20] Fig. 1) with an :class:`ActivationRecorder`, and writes
``layer_bands.png``, channel densities of the most outlying channels, the Wu+b / x̂ / u shape
plot, ``summary.json``, ``bands.csv`` and ``summary.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from .._checks import check_out_dir, float_range, int_range, resolve_device
from .recorder import ActivationRecorder
from .report import write_recorder_report
from .shape import distribution_shapes

__all__ = ["register", "run_inspect", "load_factory", "load_checkpoint", "load_inputs"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect", help="activation outliers of a trained model's normalization layers",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--model", help="lab model name (normlab.lab.models.list_models())")
    src.add_argument("--norm", default=None, help="norm spec for --model (default: the "
                     "checkpoint's config, else 'bn')")
    src.add_argument("--placement", default=None, help="norm placement for --model")
    src.add_argument("--width", type=float_range(0.0, high=64.0), default=None,
                     help="channel multiplier for --model")
    src.add_argument("--factory", help="module:function returning an nn.Module (instead of --model)")
    src.add_argument("--factory-kwargs", default="{}", help="JSON keyword arguments for --factory")
    src.add_argument("--checkpoint", help="state_dict file (.pt, loaded with "
                     "weights_only=True: tensors and plain containers only, never code); dicts "
                     "with a 'model', 'state_dict' or 'model_state' entry are unwrapped")
    data = p.add_argument_group("data")
    data.add_argument("--data", default=None,
                      help="lab dataset name (normlab.lab.data.list_datasets()), a .pt file "
                           "holding (x, y), {'x','y'}, x alone or a TensorDataset (loaded with "
                           "weights_only=True), or a .npz file with arrays x (and y) (default: "
                           "the dataset of the checkpoint's lab run config)")
    data.add_argument("--split", default="test", choices=("train", "val", "test", "all"))
    data.add_argument("--limit", type=int_range(3), default=None,
                      help="dataset subsample (lab datasets)")
    data.add_argument("--input-norm", default="offline", choices=("offline", "fixed", "none"),
                      help="lab dataset input normalization")
    data.add_argument("--batch-size", type=int_range(1, 10**6), default=256)
    data.add_argument("--max-batches", type=int_range(1), default=None)
    rec = p.add_argument_group("recording")
    rec.add_argument("--mode", default="eval", choices=("eval", "train"),
                     help="eval: running statistics (default); train: batch statistics "
                          "(running statistics are restored afterwards)")
    rec.add_argument("--sample-size", type=int_range(1, 10**7), default=200_000,
                     help="reservoir per layer")
    rec.add_argument("--top-k", type=int_range(1, 10_000), default=16,
                     help="inputs kept per channel")
    rec.add_argument("--channels", type=int_range(0, 1000), default=3,
                     help="channel density plots to draw")
    rec.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--out", default="inspect_out", help="output folder")
    p.set_defaults(func=run_inspect)


# ---------------------------------------------------------------------------------------
def load_factory(spec: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Import ``module:function`` and call it with ``kwargs``; it must return an ``nn.Module``."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"--factory must look like 'package.module:function', got {spec!r}")
    mod_name, fn_name = spec.split(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as error:
        raise ValueError(f"cannot import {mod_name!r} for --factory {spec!r}: {error}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"{mod_name!r} has no callable {fn_name!r} (from --factory {spec!r})")
    model = fn(**(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise TypeError(f"--factory {spec!r} returned {type(model).__name__}, expected an nn.Module")
    return model


_UNSAFE = re.compile(r"GLOBAL ([\w.]+)")


def _torch_load(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and plain
    containers only (plus ``TensorDataset``) — a file can never run code. Anything else is a
    one-line ``ValueError`` naming the file (and, for pickled objects, what it tried to load)."""
    if not path.is_file():
        if path.exists():
            raise ValueError(f"{what} {str(path)!r} is a folder, not a file")
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals([torch.utils.data.TensorDataset]), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": not our line
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        if "weights" in text.lower():
            match = _UNSAFE.search(text)
            name = match.group(1) if match else "a Python object"
            raise ValueError(f"{what} {str(path)!r} is refused: it holds {name}, not only "
                             f"tensors, and loading it could run code (normlab loads tensors, "
                             f"numbers, strings, dicts and lists only)") from None
        raise ValueError(f"{what} {str(path)!r} is not a readable torch file "
                         f"({' '.join(text.split())[:200]})") from None
    except (FileNotFoundError, PermissionError):
        raise
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError,
            AttributeError, TypeError, IndexError) as error:
        raise ValueError(f"{what} {str(path)!r} is not a readable torch file (truncated or "
                         f"corrupt: {type(error).__name__}: "
                         f"{' '.join(str(error).split())[:200]})") from None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, config)`` from a checkpoint file (config: the lab's, if stored).

    Loaded with ``weights_only=True``: a file that holds anything but tensors and plain
    containers is refused with one line, never executed."""
    path = Path(path)
    obj = _torch_load(path, "checkpoint")
    config: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key in ("config", "model_config"):
            if isinstance(obj.get(key), dict):
                config = obj[key]
        for key in ("model", "state_dict", "model_state", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key], config
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj, config
    raise ValueError(f"checkpoint {str(path)!r} holds no state_dict (got {type(obj).__name__} "
                     f"with keys {list(obj)[:8] if isinstance(obj, dict) else '-'})")


def load_tensor_file(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, y)`` from a ``.pt`` file — ``(x, y)``, ``{"x", "y"}``, ``x`` alone or a
    ``TensorDataset`` — or a ``.npz`` file with arrays ``x`` (and ``y``). ``.pt`` files are
    loaded with ``weights_only=True`` and ``.npz`` with ``allow_pickle=False``: no file can
    run code. ``x`` must be a non-empty float tensor ``(N, C, ...)``, ``y`` (optional) ``N``
    class indices >= 0; anything else is a one-line ``ValueError`` naming the file."""
    path = Path(path)
    name = str(path)
    if path.suffix == ".npz":
        obj = _load_npz(path)
    else:
        obj = _torch_load(path, "data file")
    if isinstance(obj, torch.utils.data.TensorDataset):
        obj = obj.tensors
    if isinstance(obj, dict):
        if "x" not in obj:
            raise ValueError(f"data file {name!r} holds a dict without 'x' (keys "
                             f"{sorted(map(str, obj))[:8]}); save {{'x': images, 'y': labels}}")
        obj = (obj["x"], obj.get("y"))
    if isinstance(obj, torch.Tensor):
        obj = (obj, None)
    if not isinstance(obj, (tuple, list)) or not 1 <= len(obj) <= 2:
        raise ValueError(f"data file {name!r} holds {type(obj).__name__}; save (x, y), "
                         f"{{'x': x, 'y': y}} or a TensorDataset")
    x, y = obj[0], (obj[1] if len(obj) > 1 else None)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2 \
            or x.shape[0] == 0:
        what = (f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor)
                else type(x).__name__)
        raise ValueError(f"data file {name!r}: x must be a non-empty float tensor (N, C, ...), "
                         f"got a {what}")
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() \
                or y.dim() != 1 or len(y) != len(x) or (len(y) and int(y.min()) < 0):
            what = (f"{y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor)
                    else type(y).__name__)
            raise ValueError(f"data file {name!r}: y must be {len(x)} class indices >= 0 "
                             f"(an integer tensor (N,)), got a {what}")
        y = y.long()
    return x, y


def _load_npz(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        if path.exists():
            raise ValueError(f"data file {str(path)!r} is a folder, not a file")
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (FileNotFoundError, PermissionError):
        raise
    except ValueError as error:
        if "allow_pickle" in str(error) or "Object arrays" in str(error):
            raise ValueError(f"data file {str(path)!r} is refused: it holds Python objects "
                             f"(pickled), and loading them could run code; save numeric "
                             f"arrays") from None
        raise ValueError(f"data file {str(path)!r} is not a readable .npz file ({error})"
                         ) from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, TypeError) as error:
        raise ValueError(f"data file {str(path)!r} is not a readable .npz file (truncated or "
                         f"corrupt: {type(error).__name__}: {error})") from None
    out = {}
    for key, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise ValueError(f"data file {str(path)!r}: array {key!r} has dtype {array.dtype}; "
                             f"save numeric arrays")
        out[key] = torch.from_numpy(np.ascontiguousarray(array))
    return out


def _run_config(config: dict[str, Any]):
    """The lab's ``RunConfig`` if ``config`` is one (``RunConfig.to_dict()``), else ``None``."""
    if not config or "data" not in config or "model" not in config:
        return None
    try:
        # lazy: import cycle (lab imports diagnostics); only to rebuild a lab run
        from ..lab.train import RunConfig

        return RunConfig.from_dict(config)
    except (ImportError, ValueError, TypeError):
        return None


def _split_tensors(splits, split: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    parts = ("train", "val", "test") if split == "all" else (split,)
    xs, ys = zip(*(getattr(splits, s).tensors for s in parts))
    return torch.cat(xs), torch.cat(ys), {"num_classes": splits.num_classes,
                                          "in_channels": splits.in_channels,
                                          "image_size": splits.image_size,
                                          "class_names": list(splits.class_names)}


def load_inputs(args: argparse.Namespace, run_config=None) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """``(x, y, info)`` of the requested split; ``info`` has the data's shape for the lab.

    Without ``--data``, the dataset (and input normalization) of the checkpoint's lab run
    config ``run_config`` is used.
    """
    if args.data is None:
        if run_config is None:
            raise ValueError("give --data NAME (or a .pt file), or a --checkpoint that stores "
                             "the lab's run config")
        # lazy: import cycle (lab imports diagnostics); only to rebuild a lab run
        from ..lab.train import load_data

        return _split_tensors(load_data(run_config), args.split)
    path = Path(args.data)
    if path.suffix in (".pt", ".pth", ".npz"):
        x, y = load_tensor_file(path)
        return x, y, {"num_classes": int(y.max()) + 1 if y is not None else None,
                      "in_channels": x.shape[1], "image_size": x.shape[-1] if x.dim() == 4
                      else None}
    # lazy: import cycle (lab imports diagnostics); only to rebuild a lab run
    from ..lab.data import load_dataset

    splits = load_dataset(args.data, limit=args.limit, input_norm=args.input_norm)
    return _split_tensors(splits, args.split)


def _build(args: argparse.Namespace, info: dict[str, Any], state: dict[str, torch.Tensor],
           config: dict[str, Any], run_config) -> tuple[nn.Module, str]:
    if args.factory:
        try:
            kwargs = json.loads(args.factory_kwargs)
        except ValueError as error:
            raise ValueError(f"--factory-kwargs must be a JSON object such as '{{\"width\": 2}}', "
                             f"got {args.factory_kwargs!r} ({error})") from None
        if not isinstance(kwargs, dict):
            raise ValueError(f"--factory-kwargs must be a JSON object, got {args.factory_kwargs!r}")
        model = load_factory(args.factory, kwargs)
        desc = args.factory
    elif run_config is not None and not args.model:
        # lazy: import cycle (lab imports diagnostics); only to rebuild a lab run
        from ..lab.train import build

        model = build(run_config, SimpleNamespace(**info))
        desc = f"{run_config.model} with norm {run_config.norm!r}"
    else:
        name = args.model or config.get("model")
        if not name:
            raise ValueError("give --model NAME (a lab model) or --factory module:function")
        # lazy: import cycle (lab imports diagnostics); only to rebuild a lab run
        from ..lab.models import build_model

        norm = args.norm or config.get("norm") or "bn"
        kwargs: dict[str, Any] = {}
        placement = args.placement or config.get("placement")
        if placement:
            kwargs["placement"] = placement
        width = args.width or (config.get("model_options") or {}).get("width") or config.get("width")
        if width:
            kwargs["width"] = float(width)
        for key in ("num_classes", "in_channels", "image_size"):
            value = info.get(key) or config.get(key)
            if value:
                kwargs[key] = int(value)
        model = build_model(name, norm=norm, **kwargs)
        desc = f"{name} with norm {norm!r}"
    if state:
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as error:  # shapes that differ
            raise ValueError(f"checkpoint does not fit the model: "
                             f"{' '.join(str(error).split())[:300]}") from None
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        desc += f", checkpoint {args.checkpoint}"
    else:
        desc += ", untrained (no --checkpoint)"
    return model, desc


def run_inspect(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    check_out_dir(args.out)
    state, config = load_checkpoint(args.checkpoint) if args.checkpoint else ({}, {})
    run_config = None if (args.factory or args.model) else _run_config(config)
    x, y, info = load_inputs(args, run_config)
    model, desc = _build(args, info, state, config, run_config)
    model = model.to(device)
    model.train(args.mode == "train")
    saved = {k: b.detach().clone() for k, b in model.named_buffers()}
    recorder = ActivationRecorder(model, sample_size=args.sample_size, top_k=args.top_k)
    n = x.shape[0]
    try:
        with torch.no_grad():
            for b, start in enumerate(range(0, n, args.batch_size)):
                if args.max_batches is not None and b >= args.max_batches:
                    break
                model(x[start:start + args.batch_size].to(device))
    finally:
        recorder.remove()
        with torch.no_grad():
            named = dict(model.named_buffers())
            for k, v in saved.items():
                named[k].copy_(v)
    shapes = distribution_shapes(model, x[: args.batch_size].to(device))
    labels = y.tolist() if y is not None else None
    data_name = args.data or (run_config.data if run_config is not None else "?")
    context = (f"Model: {desc}. Data: {data_name} ({args.split} split, {recorder._seen} inputs, "
               f"{args.mode} mode). Input indices are positions in that split.")
    paths = write_recorder_report(recorder, args.out, labels=labels, context=context,
                                  density_channels=args.channels, shapes=shapes,
                                  title=f"Normalized activations: {desc.split(',')[0]}")
    totals = recorder.totals()
    print(f"normlab inspect: {len(recorder.layer_names)} norm layers, {totals['n']:,} values")
    for k, t in totals["beyond"].items():
        print(f"  beyond {k:g}σ: {t['count']:,} (a Gaussian: {t['expected_gaussian']:.3g})")
    print(f"wrote {len(paths)} files to {args.out}: " + ", ".join(Path(p).name for p in paths))
    return 0
