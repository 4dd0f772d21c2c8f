"""Check the Triton path on a real GPU: correctness, adversarial inputs, torch.compile.

Usage::

    python benchmarks/gpu_check.py [--sections matrix,adversarial,compile]

Sections (each check is guarded: an exception prints one ``ERROR`` line and the script goes
on, so one broken kernel does not hide the others):

* ``matrix``: modules on the Triton path against the reference path (forward + backward,
  outputs and every gradient), NCHW and channels_last: filtered BN, filtered GN, filtered
  IN, FRN+TLU, FRN+affine TLU in float32; filtered BN and FRN+TLU in float16 and bfloat16
  (``tests/triton_cases.py``, which the GPU session also runs, covers the other dtypes).
* ``adversarial``: the CUDA path in float32 against the same module in float64 on CPU
  (reference backend) fed the very same float32 values — error of ``y`` and ``∂ℓ/∂x`` on the
  non-outlier values, relative to max(1, |value|), target 1e-5 — on a 1e6 outlier in a
  4096-value BN channel (both layouts, running variance too), 1e4 in a 64-value IN row,
  1e5 in a GN group, sets keeping one or two values, mean 1e6 (sd 0.01) and 1e8 (sd 10),
  random planted outliers up to 1e6; and the NaN/Inf rule (a set holding NaN/Inf is NaN,
  TLU and ReLU included; the other sets finite; running averages NaN for that channel;
  FRN is checked with NaN only: an uncentered set holding Inf has ν² = Inf, not NaN).
* ``compile``: ``torch.compile(conv → FilteredBatchNorm2d → ReLU, fullgraph=True)`` on CUDA,
  forward + backward and the running averages against eager.

Prints one line per check (``ok`` / ``FAIL`` / ``ERROR``) and exits 1 if any check did not
pass. ``benchmarks/gpu_session.sh`` runs it as part of the GPU session.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch
from torch import nn

import normlab
from normlab import kernels as K

RESULTS = {"ok": 0, "FAIL": 0, "ERROR": 0}
DEVICE = "cuda"  # --device cpu runs the same checks on the CPU kernels (a dry run of the script)


def report(name: str, ok: bool, detail: str) -> None:
    status = "ok" if ok else "FAIL"
    RESULTS[status] += 1
    print(f"{status:5s} {name:58s} {detail}", flush=True)


def guarded(name: str, fn) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 — one line, then the next check
        RESULTS["ERROR"] += 1
        where = traceback.extract_tb(exc.__traceback__)[-1]
        print(f"ERROR {name:58s} {type(exc).__name__}: {str(exc).splitlines()[0][:200]} "
              f"({where.filename.rsplit('/', 1)[-1]}:{where.lineno})", flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / (1 + b.float().abs().max())).item()


# ---- matrix --------------------------------------------------------------------------------

LAYERS = {
    "fbn": lambda: normlab.FilteredBatchNorm2d(32),
    "fgn": lambda: normlab.FilteredGroupNorm(8, 32),
    "fin": lambda: normlab.FilteredInstanceNorm2d(32, affine=True),
    "frn+tlu": lambda: normlab.FilterResponseNorm2d(32),
    "frn+affine_tlu": lambda: normlab.FilterResponseNorm2d(32, activation="affine_tlu",
                                                           learnable_eps=True),
}


def matrix_check(name, dtype, channels_last, tol):
    x = torch.randn(8, 32, 12, 12, device=DEVICE) * 2 + 0.5
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    outs = []
    for backend in ("reference", "auto"):
        torch.manual_seed(0)
        m = LAYERS[name]().to(DEVICE).to(dtype)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        xx = x.clone().requires_grad_()
        with K.use_backend(backend):
            y = m(xx)
            y.float().square().sum().backward()
        outs.append([y, xx.grad] + [p.grad for p in m.parameters()])
    err = max(rel(a, b) for a, b in zip(outs[1], outs[0]))
    report(f"matrix {name} {str(dtype)[6:]} channels_last={channels_last}", err < tol,
           f"rel.err {err:.2e} (tol {tol:g})")


def run_matrix():
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 6e-2)):
        for cl in (False, True):  # half dtypes: BN and rows kernels once each (compile time)
            for name in LAYERS if dtype == torch.float32 else ("fbn", "frn+tlu"):
                guarded(f"matrix {name} {dtype} {cl}",
                        lambda n=name, d=dtype, c=cl, t=tol: matrix_check(n, d, c, t))


# ---- adversarial ---------------------------------------------------------------------------

def outlier(shape, value, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x.view(-1)[0] = value
    return x


def planted(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 2 + torch.randn(1, shape[1], 1, 1, generator=g) * 3
    pick = torch.rand(*shape, generator=g) < 0.01
    mags = 10.0 ** (1 + 5 * torch.rand(*shape, generator=g))
    return torch.where(pick, torch.where(torch.rand(*shape, generator=g) < 0.5, -mags, mags), x)


def spread(shape, mean, sd, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * sd + mean


def run_module(make, x, device, dtype, backend):
    torch.manual_seed(0)
    m = make().to(device=device, dtype=dtype).train()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    xx = x.to(device=device, dtype=dtype).detach().requires_grad_()
    with K.use_backend(backend):
        y = m(xx)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
        (y * g.to(device=device, dtype=y.dtype)).sum().backward()
    running = getattr(m, "running_var", None)
    return (y.detach().double().cpu(), xx.grad.double().cpu(),
            None if running is None else running.double().cpu())


def adversarial_check(name, make, x, layout=None):
    x = x.float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y64, g64, rv64 = run_module(make, x.double(), "cpu", torch.float64, "reference")
    centre = x.double().median()
    sel = (x.double() - centre).abs() < 100

    def err(a, b):
        return ((a - b)[sel].abs().max() / b[sel].abs().max().clamp_min(1)).item()

    parts = []
    worst = 0.0
    for backend in ("auto", "reference"):
        y, g, rv = run_module(make, x, DEVICE, torch.float32, backend)
        e = [err(y, y64), err(g, g64)]
        if rv is not None:
            e.append(((rv - rv64).abs() / rv64.abs()).max().item())
        if backend == "auto":
            worst = max(e)
        parts.append(f"{backend}: y {e[0]:.1e} dx {e[1]:.1e}"
                     + (f" running_var {e[2]:.1e}" if len(e) > 2 else ""))
    report(f"adversarial {name}", worst < 1e-5, " | ".join(parts))


def nan_check(name, make, x, set_index, value):
    x = x.float().clone()
    x[(0,) * x.dim()] = value
    y, g, rv = run_module(make, x, DEVICE, torch.float32, "auto")
    bad = torch.zeros_like(y, dtype=torch.bool)
    bad[set_index] = True
    ok = bool(y[bad].isnan().all() and y[~bad].isfinite().all()
              and g[bad].isnan().all() and g[~bad].isfinite().all())
    detail = f"NaN y {int(y.isnan().sum())}/{int(bad.sum())} in the set, dx likewise {ok}"
    if rv is not None:
        ok = ok and bool(rv[0].isnan() and rv[1:].isfinite().all())
        detail += f", running_var NaN only for channel 0: {bool(rv[0].isnan())}"
    report(f"nan/inf {name}", ok, detail)


def run_adversarial():
    fbn = lambda: normlab.FilteredBatchNorm2d(4)  # noqa: E731
    cases = {
        "fbn one 1e6 in a 4096-value channel": (fbn, outlier((16, 4, 16, 16), 1e6)),
        "fbn one 1e6 in a 4096-value channel, channels_last":
            (fbn, outlier((16, 4, 16, 16), 1e6), "channels_last"),
        "fin one 1e4 in a 64-value row": (lambda: normlab.FilteredInstanceNorm2d(8),
                                          outlier((4, 8, 8, 8), 1e4)),
        "fin one 1e4 in a 64-value row, channels_last":
            (lambda: normlab.FilteredInstanceNorm2d(8), outlier((4, 8, 8, 8), 1e4),
             "channels_last"),
        "fgn one 1e5": (lambda: normlab.FilteredGroupNorm(4, 16), outlier((4, 16, 8, 8), 1e5)),
        "fbn threshold 0.5, sets of 3 values": (
            lambda: normlab.FilteredBatchNorm2d(8, threshold=0.5), outlier((3, 8, 1, 1), 0.3)),
        "fin threshold 0.5, rows of 4 values": (
            lambda: normlab.FilteredInstanceNorm2d(8, threshold=0.5),
            outlier((2, 8, 2, 2), 0.3)),
        "fbn mean 1e6 sd 0.01": (fbn, spread((16, 4, 8, 8), 1e6, 0.01)),
        "fbn mean 1e6 sd 0.01, channels_last":
            (fbn, spread((16, 4, 8, 8), 1e6, 0.01), "channels_last"),
        "fin mean 1e6 sd 0.01": (lambda: normlab.FilteredInstanceNorm2d(4),
                                 spread((4, 4, 8, 8), 1e6, 0.01)),
        "fbn mean 1e8 sd 10": (fbn, spread((16, 4, 8, 8), 1e8, 10)),
    }
    for seed in range(2):
        cases[f"fbn planted outliers up to 1e6, seed {seed}"] = (fbn, planted((16, 4, 8, 8),
                                                                                seed))
        cases[f"fgn planted outliers up to 1e6, seed {seed}"] = (
            lambda: normlab.FilteredGroupNorm(2, 8), planted((4, 8, 8, 8), seed),
            "channels_last")
    for name, (make, x, *layout) in cases.items():
        guarded(f"adversarial {name}",
                lambda n=name, mk=make, xx=x, lo=layout: adversarial_check(n, mk, xx, *lo))
    x = torch.randn(4, 4, 4, 4)
    for value in (float("nan"), float("inf")):
        frn = (("frn+tlu", lambda: normlab.FilterResponseNorm2d(4), (0, 0)),
               ("frn+relu", lambda: normlab.FilterResponseNorm2d(4, activation="relu"), (0, 0)))
        for name, make, index in (frn if value != value else ()) + (
                ("fbn", lambda: normlab.FilteredBatchNorm2d(4), (slice(None), 0)),
                ("fgn", lambda: normlab.FilteredGroupNorm(2, 4), (0, slice(0, 2)))):
            guarded(f"nan/inf {name} {value}",
                    lambda n=name, mk=make, i=index, v=value: nan_check(f"{n} {v}", mk, x, i, v))


# ---- compile -------------------------------------------------------------------------------

def compile_check():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1),  # noqa: E731
                                 normlab.FilteredBatchNorm2d(16), nn.ReLU()).to(DEVICE)
    eager, compiled_model = make(), make()
    compiled_model.load_state_dict(eager.state_dict())
    x = torch.randn(8, 3, 16, 16, device=DEVICE)
    t0 = time.perf_counter()
    fn = torch.compile(compiled_model, fullgraph=True)
    outs = []
    for model in (eager, fn):
        xx = x.clone().requires_grad_()
        y = model(xx)
        y.square().sum().backward()
        mod = eager if model is eager else compiled_model
        outs.append([y, xx.grad, mod[0].weight.grad, mod[1].running_mean, mod[1].running_var])
    seconds = time.perf_counter() - t0
    err = max(rel(a, b) for a, b in zip(outs[1], outs[0]))
    report("compile conv→fbn→relu fullgraph=True, fwd+bwd+running", err < 1e-4,
           f"rel.err {err:.2e}, {seconds:.0f} s incl. compile")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default="matrix,adversarial,compile")
    ap.add_argument("--device", default="cuda", help="cuda; cpu for a dry run of the script")
    a = ap.parse_args(argv)
    global DEVICE
    DEVICE = a.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("ERROR no CUDA device")
        return 1
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"# torch {torch.__version__}, {name}, "
          f"triton {getattr(sys.modules.get('triton'), '__version__', '?')}", flush=True)
    sections = {"matrix": run_matrix, "adversarial": run_adversarial,
                "compile": lambda: guarded("compile", compile_check)}
    for section in a.sections.split(","):
        t0 = time.perf_counter()
        sections[section]()
        print(f"# {section}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"# {RESULTS['ok']} ok, {RESULTS['FAIL']} FAIL, {RESULTS['ERROR']} ERROR")
    return 0 if RESULTS["FAIL"] == RESULTS["ERROR"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
