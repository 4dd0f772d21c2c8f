"""``normlab bench``: speed and memory of normlab's layers as ratios to torch's own.

Every number is measured in one process, interleaved round by round with its baseline, so
ratios stay meaningful on a busy machine: ``fwd``/``fwd+bwd`` are the best (minimum) time
over the rounds divided by native ``torch.nn.BatchNorm2d`` (BN family) or
``torch.nn.GroupNorm`` (GN family) on the same input. ``GB/s`` is the effective bandwidth
for the minimum traffic (forward: read x, write y; backward: read x and ∂ℓ/∂y, write
∂ℓ/∂x) and ``%copy`` compares it with a plain ``tensor.clone()`` timed the same way.
``saved MB`` counts the bytes autograd keeps for backward (``saved_tensors_hooks``);
``peak MB`` is the CUDA allocator's peak during fwd+bwd (CUDA only). The training-step
table times forward + backward + SGD step of LeNet-5 and ResNet-18 on CIFAR-size input; the
compile table times forward + backward of a two-block CNN and LeNet-5 eager and under
``torch.compile`` (inductor), as ratios to the compiled BN model and to eager.

Layer rows run in ``--dtype`` and, with ``--channels-last``, in NHWC memory format, against
torch's BN/GN in the same dtype and format (on CPU, normlab's fused kernels compute in
float32: bfloat16 is loaded and stored as is, float16 is upcast around them). Example: ``normlab bench --quick`` (CPU, seconds),
``normlab bench --dtype bfloat16 --channels-last`` or ``normlab bench --device cuda``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from typing import Callable

import torch
from torch import nn

import normlab  # the public names, as a user writes them

from . import kernels
from ._checks import int_range, resolve_device
from .kernels import cpu
from .lab.models import build_model
from .nn.activation import TLU
from .registry import create_norm_act

__all__ = ["register", "run_layer_bench", "run_model_bench", "run_compile_bench", "small_cnn",
           "main"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved(fns: dict[str, Callable[[], None]], rounds: int, device: torch.device,
                 inner: int = 1) -> dict[str, tuple[float, float]]:
    """(min, median) seconds per call of each fn, timed round-robin after one warm-up."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / inner)
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def _saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return total


def _layers(c: int, groups: int) -> dict[str, tuple[str, Callable[[], nn.Module]]]:
    return {
        "bn (torch)": ("bn", lambda: nn.BatchNorm2d(c)),
        "fbn": ("bn", lambda: normlab.FilteredBatchNorm2d(c, threshold=2.0)),
        "fbn reference": ("bn", lambda: _Reference(normlab.FilteredBatchNorm2d(c, threshold=2.0))),
        "frn+tlu": ("bn", lambda: normlab.FilterResponseNorm2d(c)),
        "frn+tlu reference": ("bn", lambda: _Reference(normlab.FilterResponseNorm2d(c))),
        "bn+relu (torch)": ("bn", lambda: nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())),
        "gn+tlu (torch+normlab)": ("gn", lambda: nn.Sequential(nn.GroupNorm(groups, c), TLU(c))),
        "gn (torch)": ("gn", lambda: nn.GroupNorm(groups, c)),
        "fgn": ("gn", lambda: normlab.FilteredGroupNorm(groups, c, threshold=2.0)),
        "fgn reference": ("gn", lambda: _Reference(normlab.FilteredGroupNorm(groups, c, threshold=2.0))),
    }


class _Reference(nn.Module):
    """Runs the wrapped module with the analytic reference kernels (the pre-fusion path)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x):
        with kernels.use_backend("reference"):
            return self.module(x)


def run_layer_bench(shape=(64, 64, 32, 32), *, device="cpu", dtype=torch.float32,
                    channels_last=False, rounds=10, groups=8, layers=None) -> list[dict]:
    """Time each layer; returns one dict per layer (see the module docstring)."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    grad = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    if channels_last:
        grad = grad.contiguous(memory_format=torch.channels_last)
    specs = _layers(shape[1], groups)
    if layers:
        specs = {k: v for k, v in specs.items() if k in layers or k in ("bn (torch)", "gn (torch)")}
    modules = {k: make().to(device=device, dtype=dtype).train() for k, (_, make) in specs.items()}

    def fwd(m):
        def f():
            with torch.no_grad():
                m(x)
        return f

    def fwd_bwd(m):
        def f():
            m(x).backward(grad)
            x.grad = None
        return f

    inner = 10 if device.type == "cuda" else 1
    fns = {"copy": lambda: x.detach().clone()}
    for k, m in modules.items():
        fns[k + "|f"] = fwd(m)
        fns[k + "|fb"] = fwd_bwd(m)
    t = _interleaved(fns, rounds, device, inner)
    nbytes = x.numel() * x.element_size()
    copy_bw = 2 * nbytes / t["copy"][0]
    rows = []
    for k, m in modules.items():
        family = specs[k][0]
        base = "bn (torch)" if family == "bn" else "gn (torch)"
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            m(x).backward(grad)
            x.grad = None
            peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        bw = 5 * nbytes / t[k + "|fb"][0]
        rows.append({
            "layer": k, "shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""),
            "device": device.type + ("/cl" if channels_last else ""),
            "fwd_ms": t[k + "|f"][0] * 1e3, "fwdbwd_ms": t[k + "|fb"][0] * 1e3,
            "fwd_ratio": t[k + "|f"][0] / t[base + "|f"][0],
            "fwdbwd_ratio": t[k + "|fb"][0] / t[base + "|fb"][0],
            "baseline": base, "gbps": bw / 1e9, "pct_copy": 100 * bw / copy_bw,
            "saved_mb": _saved_bytes(m, x) / 2**20, "peak_mb": peak,
        })
    return rows


def run_model_bench(*, device="cpu", batch=32, rounds=5, models=("lenet5", "resnet18"),
                    norms=("bn", "fbn", "frn"), channels_last=False) -> list[dict]:
    """Time one SGD training step per (model, norm); ratio to the model's BN step."""
    device = torch.device(device)
    rows = []
    for name in models:
        steps = {}
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,), generator=gen).to(device)
        for norm in norms:
            torch.manual_seed(0)
            model = build_model(name, norm=norm, num_classes=10, in_channels=3, image_size=32)
            model = model.to(device).train()
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def step(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            steps[norm] = step
        t = _interleaved(steps, rounds, device)
        for norm in norms:
            rows.append({"model": name, "norm": norm, "batch": batch,
                         "step_ms": t[norm][0] * 1e3, "median_ms": t[norm][1] * 1e3,
                         "ratio": t[norm][0] / t[norms[0]][0]})
    return rows


def small_cnn(norm: str, channels: int = 32) -> nn.Module:
    """Two conv → norm → activation blocks, pooled and classified (issue 11's compile
    benchmark: batch 32, 32×32 inputs)."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False), create_norm_act(norm, channels),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False), create_norm_act(norm, channels),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))


def run_compile_bench(*, device="cpu", batch=32, rounds=10, norms=("bn", "fbn", "frn"),
                      models=("cnn2", "lenet5"), backend="inductor") -> list[dict]:
    """Forward + backward of each (model, norm), eager and ``torch.compile``d, interleaved.

    Ratios: ``vs compiled bn`` (the model's compiled BN step) and ``compiled/eager`` (the same
    norm). ``cnn2`` is :func:`small_cnn`; compile time is excluded (one warm-up call).
    """
    device = torch.device(device)
    rows = []
    for name in models:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
        y = torch.randint(0, 10, (batch,), generator=gen).to(device)
        steps = {}
        for norm in norms:
            torch.manual_seed(0)
            if name == "cnn2":
                model = small_cnn(norm)
            else:
                model = build_model(name, norm=norm, num_classes=10, in_channels=3,
                                    image_size=32)
            model = model.to(device).train()
            for mode, run in (("eager", model), ("compiled", torch.compile(model,
                                                                          backend=backend))):
                def step(run=run, model=model):
                    model.zero_grad(set_to_none=True)
                    nn.functional.cross_entropy(run(x), y).backward()
                steps[norm, mode] = step
        t = _interleaved(steps, rounds, device)
        base = t[norms[0], "compiled"][0]
        for norm in norms:
            for mode in ("eager", "compiled"):
                rows.append({"model": name, "norm": norm, "mode": mode, "batch": batch,
                             "step_ms": t[norm, mode][0] * 1e3,
                             "median_ms": t[norm, mode][1] * 1e3,
                             "vs_compiled_bn": t[norm, mode][0] / base,
                             "compiled_over_eager": t[norm, "compiled"][0] / t[norm, "eager"][0]})
    return rows


def format_compile_table(rows: list[dict]) -> str:
    lines = ["| model | norm | mode | batch | fwd+bwd ms (min) | median ms | vs compiled "
             f"{rows[0]['norm'] if rows else 'bn'} | compiled / eager |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['norm']} | {r['mode']} | {r['batch']} | "
                     f"{r['step_ms']:.2f} | {r['median_ms']:.2f} | {r['vs_compiled_bn']:.3f}× | "
                     f"{r['compiled_over_eager']:.3f}× |")
    return "\n".join(lines)


def machine_description(device: str) -> str:
    text = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
        text = f"{model}, {torch.get_num_threads()} threads" if model else text
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f"; GPU {torch.cuda.get_device_name()}"
    return f"{text}; torch {torch.__version__}"


def format_layer_table(rows: list[dict]) -> str:
    head = ("| layer | shape | dtype | device | fwd ms | fwd+bwd ms | fwd ratio | fwd+bwd ratio "
            "| GB/s | %copy | saved MB | peak MB |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        lines.append(
            f"| {r['layer']} | {r['shape']} | {r['dtype']} | {r['device']} | {r['fwd_ms']:.3f} | "
            f"{r['fwdbwd_ms']:.3f} | {r['fwd_ratio']:.2f}× | {r['fwdbwd_ratio']:.2f}× "
            f"(vs {r['baseline']}) | {r['gbps']:.1f} | {r['pct_copy']:.0f}% | "
            f"{r['saved_mb']:.1f} | {peak} |")
    return "\n".join(lines)


def format_model_table(rows: list[dict]) -> str:
    lines = ["| model | norm | batch | step ms (min) | median ms | ratio to bn |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['norm']} | {r['batch']} | {r['step_ms']:.2f} | "
                     f"{r['median_ms']:.2f} | {r['ratio']:.3f}× |")
    return "\n".join(lines)


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) <= 0:
        raise ValueError(f"--shape must be N,C,H,W with positive ints, got {text!r}")
    if shape[0] < 2:
        raise ValueError(f"--shape: N must be >= 2 (batch statistics), got {text!r}")
    return shape


def _memory_bytes(device: torch.device) -> int:
    """Memory the benchmark may use: the GPU's total memory, or the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover - not POSIX
        return 2**40


def check_options(shape: tuple[int, ...], groups: int, dtype: torch.dtype,
                  device: torch.device) -> None:
    """Refuse, before timing anything, what cannot run: ``groups`` not dividing C, and shapes
    whose tensors (x, ∂ℓ/∂x, outputs and saved tensors of ~10 live copies) exceed memory."""
    if shape[1] % groups:
        raise ValueError(f"--groups {groups} must divide the {shape[1]} channels of --shape "
                         f"{','.join(map(str, shape))}")
    need = math.prod(shape) * torch.tensor([], dtype=dtype).element_size() * 10
    have = _memory_bytes(device)
    if need > have:
        raise ValueError(f"--shape {','.join(map(str, shape))} needs about {need / 2**30:.1f} GiB "
                         f"on {device.type}, which has {have / 2**30:.1f} GiB; use a smaller shape")


def main(args: argparse.Namespace) -> int:
    device = str(resolve_device(args.device))
    dtype = DTYPES[args.dtype]  # every dtype on every device: ratios are to torch in that dtype
    shape = _parse_shape(args.shape) if args.shape else ((16, 32, 16, 16) if args.quick else (64, 64, 32, 32))
    check_options(shape, args.groups, dtype, torch.device(device))
    rounds = args.rounds or (5 if args.quick else 15)
    print(f"# normlab bench on {machine_description(device)}")
    if device == "cpu":
        print(f"# fused CPU kernels: {'available' if cpu.available() else 'unavailable: ' + str(cpu.build_error())}")
    print(f"# backend: {kernels.get_backend()}; ratios are min-of-{rounds} times, interleaved\n")
    rows = run_layer_bench(shape, device=device, dtype=dtype, channels_last=args.channels_last,
                           rounds=rounds, groups=args.groups)
    print(format_layer_table(rows))
    if not args.no_models:
        batch = args.batch or (8 if args.quick else (128 if device == "cuda" else 32))
        models = ("lenet5",) if args.quick else ("lenet5", "resnet18")
        mrows = run_model_bench(device=device, batch=batch, rounds=3 if args.quick else 8,
                                models=models, channels_last=args.channels_last)
        print()
        print(format_model_table(mrows))
    if not args.no_compile:
        crows = run_compile_bench(device=device, batch=32, rounds=3 if args.quick else 10,
                                  models=("cnn2",) if args.quick else ("cnn2", "lenet5"))
        print()
        print(format_compile_table(crows))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="time normlab's layers against torch's native BN/GN",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--quick", action="store_true", help="small shape, few rounds, LeNet only")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--shape", default=None, help="N,C,H,W (default 64,64,32,32)")
    parser.add_argument("--groups", type=int_range(1, 4096), default=8,
                        help="groups for GN / filtered GN (must divide C)")
    parser.add_argument("--rounds", type=int_range(1, 10_000), default=None,
                        help="timing rounds per layer")
    parser.add_argument("--channels-last", action="store_true", help="channels_last inputs")
    parser.add_argument("--batch", type=int_range(2, 65536), default=None,
                        help="batch for the training steps (>= 2: batch statistics)")
    parser.add_argument("--no-models", action="store_true", help="skip the training-step table")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the eager vs torch.compile table (compiling takes a while)")
    parser.set_defaults(func=main)
