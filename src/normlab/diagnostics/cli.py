"""``normlab inspect``: where are the outliers in a trained model's normalization layers?

Builds a model (the lab's ``--model NAME --norm SPEC`` or any ``--factory module:function``),
loads ``--checkpoint``, runs a dataset split through it (eval mode by default: running
statistics, as the filtered-BN seed's Fig. 1) with an :class:`ActivationRecorder`, and writes
``layer_bands.png``, channel densities of the most outlying channels, the Wu+b / x̂ / u shape
plot, ``summary.json``, ``bands.csv`` and ``summary.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
    src.add_argument("--width", type=float, default=None, help="channel multiplier for --model")
    src.add_argument("--factory", help="module:function returning an nn.Module (instead of --model)")
    src.add_argument("--factory-kwargs", default="{}", help="JSON keyword arguments for --factory")
    src.add_argument("--checkpoint", help="state_dict file (.pt); dicts with a 'model', "
                     "'state_dict' or 'model_state' entry are unwrapped")
    data = p.add_argument_group("data")
    data.add_argument("--data", default=None,
                      help="lab dataset name (normlab.lab.data.list_datasets()) or a .pt file "
                           "holding (x, y), {'x','y'} or a TensorDataset (default: the dataset "
                           "of the checkpoint's lab run config)")
    data.add_argument("--split", default="test", choices=("train", "val", "test", "all"))
    data.add_argument("--limit", type=int, default=None, help="dataset subsample (lab datasets)")
    data.add_argument("--input-norm", default="offline", help="lab dataset input normalization")
    data.add_argument("--batch-size", type=int, default=256)
    data.add_argument("--max-batches", type=int, default=None)
    rec = p.add_argument_group("recording")
    rec.add_argument("--mode", default="eval", choices=("eval", "train"),
                     help="eval: running statistics (default); train: batch statistics "
                          "(running statistics are restored afterwards)")
    rec.add_argument("--sample-size", type=int, default=200_000, help="reservoir per layer")
    rec.add_argument("--top-k", type=int, default=16, help="inputs kept per channel")
    rec.add_argument("--channels", type=int, default=3, help="channel density plots to draw")
    rec.add_argument("--device", default="cpu")
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


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, config)`` from a checkpoint file (config: the lab's, if stored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    config: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key in ("config", "model_config"):
            if isinstance(obj.get(key), dict):
                config = obj[key]
        for key in ("model", "state_dict", "model_state", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key], config
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj, config
    raise ValueError(f"checkpoint {str(path)!r} holds no state_dict (got {type(obj).__name__} "
                     f"with keys {list(obj)[:8] if isinstance(obj, dict) else '-'})")


def _run_config(config: dict[str, Any]):
    """The lab's ``RunConfig`` if ``config`` is one (``RunConfig.to_dict()``), else ``None``."""
    if not config or "data" not in config or "model" not in config:
        return None
    try:
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
        from ..lab.train import load_data

        return _split_tensors(load_data(run_config), args.split)
    path = Path(args.data)
    if path.suffix == ".pt":
        if not path.is_file():
            raise FileNotFoundError(f"data file {args.data!r} does not exist")
        obj = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(obj, torch.utils.data.TensorDataset):
            obj = obj.tensors
        if isinstance(obj, dict):
            obj = (obj["x"], obj.get("y"))
        if isinstance(obj, torch.Tensor):
            obj = (obj, None)
        x, y = obj[0], (obj[1] if len(obj) > 1 else None)
        return x, y, {"num_classes": int(y.max()) + 1 if y is not None else None,
                      "in_channels": x.shape[1] if x.dim() > 1 else None,
                      "image_size": x.shape[-1] if x.dim() == 4 else None}
    from ..lab.data import load_dataset

    splits = load_dataset(args.data, limit=args.limit, input_norm=args.input_norm)
    return _split_tensors(splits, args.split)


def _build(args: argparse.Namespace, info: dict[str, Any], state: dict[str, torch.Tensor],
           config: dict[str, Any], run_config) -> tuple[nn.Module, str]:
    if args.factory:
        model = load_factory(args.factory, json.loads(args.factory_kwargs))
        desc = args.factory
    elif run_config is not None and not args.model:
        from types import SimpleNamespace

        from ..lab.train import build

        model = build(run_config, SimpleNamespace(**info))
        desc = f"{run_config.model} with norm {run_config.norm!r}"
    else:
        name = args.model or config.get("model")
        if not name:
            raise ValueError("give --model NAME (a lab model) or --factory module:function")
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
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        desc += f", checkpoint {args.checkpoint}"
    else:
        desc += ", untrained (no --checkpoint)"
    return model, desc


def run_inspect(args: argparse.Namespace) -> int:
    from .recorder import ActivationRecorder
    from .report import write_recorder_report
    from .shape import distribution_shapes

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    state, config = load_checkpoint(args.checkpoint) if args.checkpoint else ({}, {})
    run_config = None if (args.factory or args.model) else _run_config(config)
    x, y, info = load_inputs(args, run_config)
    model, desc = _build(args, info, state, config, run_config)
    device = torch.device(args.device)
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
