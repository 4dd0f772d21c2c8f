"""Compile every Triton kernel ahead of time for CUDA targets — no GPU needed.

The Triton kernels only ever ran in the interpreter on CI machines, and the interpreter
skips the GPU compiler: on the first real GPU (H200, triton 3.6) the rows backward kernel did
not compile. This check runs that compiler: triton's own front end, MLIR passes, LLVM and
the bundled ``ptxas`` down to a cubin, for each ``GPUTarget("cuda", cc, 32)``.

Two steps, so that the compile can run under another triton than torch's (a venv holding
the GPU machine's triton version, without torch):

1. :func:`launch_matrix` (torch): drives the launch helpers of
   :mod:`normlab.kernels.triton_kernels` over the flag combinations they produce, on small
   CPU tensors, with ``_launch`` replaced by a recorder → one JSON-able record per distinct
   launch (kernel name, arguments described, ``num_warps``).
2. :func:`compile_launches` (triton only): specializes each record as the JIT does on a GPU
   (triton's own binder, with stand-in tensors: dtype and a 16-byte-aligned address) and
   calls ``triton.compile``.

Command line::

    python -m normlab.kernels.triton_aot [--arch 80,90] [--full] [--python OTHER_PYTHON]

records the launches and compiles them: by default a covering set of configurations for
the newest architecture given and the float32 all-flags-on ones for the others; with
``--full`` every combination for every architecture (thousands of compiles, ~0.5 s each).
With ``--python`` the compile runs in that interpreter, which runs this file as a script
(``python triton_aot.py --compile launches.json --arch 90``: triton only). Prints one line
per failure and a summary line ``AOT <n> compiled, <m> failed``; exit 1 on any
failure, 3 when triton has no CUDA backend.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import itertools
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

_HERE = Path(__file__).resolve().parent


# ---- the structural rule (no triton needed) ----------------------------------------------

_REDUCTIONS = {"sum", "max", "min", "reduce", "argmax", "argmin", "xor_sum"}


def _calls(node) -> set[str]:
    """Names of the functions called in ``node``: ``tl.sum`` → "sum", ``_merge`` → "_merge"."""
    out = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            f = sub.func
            out.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return out


def _assigned(stmt) -> set[str]:
    names = set()
    for sub in ast.walk(stmt):
        if isinstance(sub, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = sub.targets if isinstance(sub, ast.Assign) else [sub.target]
            for t in targets:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(sub, ast.For):
            names |= {n.id for n in ast.walk(sub.target) if isinstance(n, ast.Name)}
    return names


def reduction_in_loop_violations(source: str) -> list[str]:
    """Loops that carry an accumulator fed by a reduction, in the ``@triton.jit`` functions
    of ``source`` (e.g. ``acc += tl.sum(x, 1)`` in a loop, ``acc`` defined before it).

    Triton 3.6's ``OptimizeThreadLocality`` pass rewrites such loops and asserts
    (``loopResult.hasOneUse()``) when the loop result has more than one use — the crash of
    the rows backward kernel on the first GPU. The kernels accumulate register tiles in
    loops and reduce after them instead. A call to a jit helper that itself reduces counts
    as a reduction. Returns one line per violation.
    """
    tree = ast.parse(source)
    funcs = {f.name: f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
    reducing = {name for name, f in funcs.items() if _calls(f) & _REDUCTIONS}
    changed = True
    while changed:  # helpers calling reducing helpers reduce too
        grown = {name for name, f in funcs.items() if _calls(f) & reducing}
        changed = not grown <= reducing
        reducing |= grown
    reducers = _REDUCTIONS | reducing
    problems = []
    for name, func in funcs.items():
        if not any("jit" in ast.unparse(d) for d in func.decorator_list):
            continue
        problems += _check_block(name, func.body, {a.arg for a in func.args.args}, reducers)
    return problems


def _check_block(func: str, body: list, defined: set[str], reducers: set[str]) -> list[str]:
    problems = []
    defined = set(defined)
    for stmt in body:
        if isinstance(stmt, (ast.For, ast.While)):
            carried = defined & _assigned(stmt)
            tainted: set[str] = set()
            for _ in range(2):  # twice: a taint can come round the loop
                for sub in ast.walk(stmt):
                    if isinstance(sub, (ast.Assign, ast.AugAssign)):
                        value_names = {n.id for n in ast.walk(sub.value)
                                       if isinstance(n, ast.Name)}
                        if _calls(sub.value) & reducers or value_names & tainted:
                            tainted |= _assigned(sub)
            for var in sorted(carried & tainted):
                problems.append(f"{func}: line {stmt.lineno}: loop carries {var!r}, "
                                "fed by a reduction inside the loop")
            problems += _check_block(func, stmt.body, defined, reducers)
        elif isinstance(stmt, ast.If):
            problems += _check_block(func, stmt.body, defined, reducers)
            problems += _check_block(func, stmt.orelse, defined, reducers)
        defined |= _assigned(stmt)
    return problems


# ---- step 1: record the launches (torch) ------------------------------------------------

def _describe(value):
    import torch  # lazy: step 2 runs under a triton without torch
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, (bool, int, float)):
        return value
    raise TypeError(f"cannot describe a kernel argument of type {type(value).__name__}")


def _specialization_class(name: str, value):
    """What the JIT's specialization keeps of an argument: constexprs (upper-case names) and
    tensors as they are; integers as 1, a multiple of 16, or other; floats as float."""
    if name.isupper() or isinstance(value, (dict, bool)):
        return value
    if isinstance(value, int):
        return "one" if value == 1 else "16k" if value % 16 == 0 else "int"
    return "float"


_BN_FLAGS = ("weight", "bias", "eps_extra", "centered", "threshold", "running")
_ROWS_FLAGS = ("weight", "bias", "eps_extra", "centered", "threshold")


def _configs(flags: tuple, n_layouts: int, full: bool, acts: tuple = (None,),
             flip_layouts: tuple = (0,)):
    """(layout index, dtype pair, flag dict, activation, core) combinations to launch.

    ``full``: every flag combination × activation × dtype pair × layout. Otherwise a covering
    set: float32 with all flags on (each activation) and all off on every layout; half
    inputs (float16 with float32 parameters, bfloat16 with bfloat16 ones) with all flags on
    on every layout, the other dtype pairs on layout 0, each flag turned off alone on
    ``flip_layouts``. ``core`` marks the float32 all-on configurations (compiled for every
    architecture).
    """
    dtype_pairs = ("float32/float32", "float16/float32", "bfloat16/float32",
                   "float16/float16", "bfloat16/bfloat16")
    on = dict.fromkeys(flags, True)
    if full:
        return [(layout, dt, dict(zip(flags, values)), act, True)
                for layout, dt, values, act in itertools.product(
                    range(n_layouts), dtype_pairs,
                    itertools.product((False, True), repeat=len(flags)), acts)]
    out = []
    for layout in range(n_layouts):
        out += [(layout, "float32/float32", on, act, True) for act in acts]
        out.append((layout, "float32/float32", dict.fromkeys(flags, False), acts[0], False))
        out += [(layout, dt, on, acts[-1], False)
                for dt in (dtype_pairs[1:] if layout == 0 else dtype_pairs[1::3])]
    out += [(layout, "float32/float32", dict(on, **{f: False}), acts[-1], False)
            for layout in flip_layouts for f in flags]
    return out


def _bn_calls(full: bool):
    """Thunks calling the batch-norm launch helpers (forward, backward with and without
    ∂ℓ/∂x) on NCHW and channels_last (N, C, L) tensors."""
    import torch  # lazy: step 2 runs under a triton without torch

    from . import triton_kernels as TK  # lazy: step 2 runs under a triton without torch
    from .analytic import RunningStats  # lazy: step 2 runs under a triton without torch

    def tensor(layout, dtype):
        if layout == 0:
            return torch.zeros(3, 5, 7, dtype=dtype)
        return torch.zeros(4, 16, 32, dtype=dtype).transpose(1, 2)  # strides (L·C, 1, C)

    for layout, dts, on, _, core in _configs(_BN_FLAGS, 2, full):
        xd, pd = (getattr(torch, n) for n in dts.split("/"))
        x = tensor(layout, xd)
        c = x.shape[1]
        w = torch.ones(c, dtype=pd) if on["weight"] else None
        b = torch.zeros(c, dtype=pd) if on["bias"] else None
        epsx = torch.zeros((), dtype=torch.float32) if on["eps_extra"] else None
        thr = 2.0 if on["threshold"] else None
        centered = on["centered"]
        running = RunningStats(torch.zeros(c, dtype=pd), torch.ones(c, dtype=pd), 0.1) \
            if on["running"] else None
        yield core, lambda: TK._bn_forward(x, w, b, epsx, thr, 1.0, centered, 1e-5, running)
        stats = torch.zeros(TK.STATS_ROWS, c)
        for need_dx in (True, False) if core else (True,):
            yield core, lambda need_dx=need_dx: TK._bn_backward(
                x, torch.zeros_like(x), w, epsx, stats, thr, 1.0, centered, 1e-5, need_dx)


def _rows_calls(full: bool):
    """Thunks calling the rows launch helpers: GN contiguous, GN channels_last (tiles along
    the group's channels), IN channels_last (several rows per program), LN (one position
    per channel)."""
    import torch  # lazy: step 2 runs under a triton without torch

    from . import triton_kernels as TK  # lazy: step 2 runs under a triton without torch
    from .layout import plan  # lazy: step 2 runs under a triton without torch

    def layout_case(layout, dtype):
        x = torch.zeros(2, 12, 3, 5, dtype=dtype)
        if layout == 0:
            return x.view(2, 3, 4, 15), (2, 3), (1, 3, 4, 1)
        xc = x.contiguous(memory_format=torch.channels_last)
        if layout == 1:
            return xc.view(2, 3, 4, 15), (2, 3), (1, 3, 4, 1)
        if layout == 2:
            return xc.view(2, 12, 1, 15), (2, 3), (1, 12, 1, 1)
        return torch.zeros(6, 40, dtype=dtype), (1,), (1, 40)

    # layout 2 (rows1) exists only with a per-channel parameter: flip its flags too
    for layout, dts, on, act, core in _configs(_ROWS_FLAGS, 4, full, acts=(0, 1, 2),
                                               flip_layouts=(0, 2)):
        xd, pd = (getattr(torch, n) for n in dts.split("/"))
        x, dims, pshape = layout_case(layout, xd)
        params = [torch.ones(pshape, dtype=pd) if flag else None
                  for flag in (on["weight"], on["bias"], act >= 1, act == 2)]
        pl = plan(x, params, dims)
        x = TK._as_viewable(x, pl)  # as TK.forward does
        w, b, t, k = (TK.canonical_param(q, pl) for q in params)
        epsx = torch.zeros((), dtype=torch.float32) if on["eps_extra"] else None
        thr = 2.0 if on["threshold"] else None
        centered = on["centered"]
        yield core, lambda: TK._rows_forward(x, pl, w, b, t, k, epsx, thr, 1.0, centered,
                                             1e-5, act)
        stats = torch.zeros(TK.STATS_ROWS, pl.n * pl.g)
        for need_dx in (True, False) if core else (True,):
            yield core, lambda need_dx=need_dx: TK._rows_backward(
                x, torch.zeros_like(x), pl, w, b, t, k, epsx, stats, thr, 1.0, centered, 1e-5,
                act, need_dx)


def launch_matrix(full: bool = False) -> list[dict]:
    """Every distinct launch the helpers make over :func:`_configs`; a record's ``core``
    says it came from a float32 all-flags-on configuration."""
    from unittest import mock  # lazy: step 1 only (mock of the launcher)

    from . import triton_kernels as TK  # lazy: step 2 runs under a triton without torch

    records: dict[str, dict] = {}
    core = False

    def record(kernel, grid, num_warps, **args):
        rec = {"kernel": kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__,
               "num_warps": num_warps, "args": {k: _describe(v) for k, v in args.items()}}
        key = json.dumps(dict(rec, args={k: _specialization_class(k, v)
                                         for k, v in rec["args"].items()}), sort_keys=True)
        rec = records.setdefault(key, dict(rec, core=core))
        rec["core"] = rec["core"] or core

    with mock.patch.object(TK, "_launch", record):
        for core, call in itertools.chain(_bn_calls(full), _rows_calls(full)):
            call()
    return list(records.values())


# ---- step 2: compile (triton only) ------------------------------------------------------

def _load_source():
    """The kernels module, imported without the normlab package (no torch needed)."""
    spec = importlib.util.spec_from_file_location("normlab_triton_source",
                                                  _HERE / "_triton_source.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Dtype:
    def __init__(self, name):
        self.name = name

    def __str__(self):
        return "torch." + self.name


class _StandIn:
    """What triton's binder reads of a tensor argument: its dtype and an aligned address."""

    def __init__(self, dtype: str):
        self.dtype = _Dtype(dtype)

    def data_ptr(self) -> int:
        return 1 << 20


def nvidia_backend_available() -> str | None:
    """None if triton can compile for CUDA here, else the reason."""
    try:
        from triton.backends import backends  # lazy: optional dependency (triton)
        from triton.backends.compiler import GPUTarget  # lazy: optional dependency (triton)
        from triton.compiler import make_backend  # lazy: optional dependency (triton)
    except Exception as exc:  # noqa: BLE001
        return f"triton not importable: {exc}"
    if "nvidia" not in backends:
        return "triton has no nvidia backend"
    try:
        make_backend(GPUTarget("cuda", 90, 32))
    except Exception as exc:  # noqa: BLE001
        return f"triton's nvidia backend is unusable: {exc}"
    return None


def compile_one(kernels, record: dict, capability: int) -> str | None:
    """Compile one recorded launch for ``sm_<capability>``; None or the error text."""
    import triton  # lazy: optional dependency (triton)
    from triton.backends.compiler import GPUTarget  # lazy: optional dependency (triton)
    from triton.compiler import ASTSource, make_backend  # lazy: optional dependency (triton)
    # lazy: optional dependency (triton)
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(kernels, record["kernel"])
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    args = {k: _StandIn(v["tensor"]) if isinstance(v, dict) else v
            for k, v in record["args"].items()}
    kwargs = dict(args, num_warps=record["num_warps"])
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    try:
        bound, specialization, options = binder(**kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                              specialization, options)
        triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                       options=options.__dict__)
    except Exception as exc:  # noqa: BLE001
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return last[:500]
    return None


_SOURCE = None


def _compile_worker(job):
    global _SOURCE
    if _SOURCE is None:
        _SOURCE = _load_source()
    record, capability = job
    return record, capability, compile_one(_SOURCE, record, capability)


def compile_launches(records: list[dict], capabilities, jobs: int = 1, core_only=()):
    """Compile the records for each capability (only the ``core`` records for those in
    ``core_only``); returns [(record, capability, error or None)]."""
    todo = [(r, cc) for cc in capabilities for r in records
            if cc not in core_only or r.get("core", True)]
    if jobs <= 1:
        kernels = _load_source()
        return [(r, cc, compile_one(kernels, r, cc)) for r, cc in todo]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        return pool.map(_compile_worker, todo, chunksize=4)


def _report(results) -> int:
    failed = [(r, cc, err) for r, cc, err in results if err is not None]
    for r, cc, err in failed:
        constexprs = {k: v for k, v in r["args"].items() if k.isupper()}
        tensors = sorted({v["tensor"] for v in r["args"].values() if isinstance(v, dict)})
        print(f"FAIL sm_{cc} {r['kernel']} {constexprs} {tensors}: {err}")
    import triton  # lazy: optional dependency (triton)
    print(f"AOT triton {triton.__version__}: {len(results) - len(failed)} compiled, "
          f"{len(failed)} failed")
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="80,90", help="compute capabilities, e.g. 80,90")
    ap.add_argument("--full", action="store_true", help="every flag combination (slow)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--python", help="compile in this interpreter (another triton)")
    ap.add_argument("--compile", metavar="JSON", help="compile recorded launches (no torch)")
    ap.add_argument("--save", metavar="JSON", help="write the recorded launches here")
    a = ap.parse_args(argv)
    caps = [int(c) for c in a.arch.split(",")]
    # the covering set for the newest architecture, the core configurations for the others
    core_only = () if a.full else tuple(c for c in caps if c != max(caps))
    if a.compile:
        reason = nvidia_backend_available()
        if reason:
            print(f"SKIP {reason}")
            return 3
        records = json.loads(Path(a.compile).read_text())
        return _report(compile_launches(records, caps, a.jobs, core_only))
    records = launch_matrix(full=a.full)
    if a.save:
        Path(a.save).write_text(json.dumps(records))
    if a.python:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "launches.json"
            path.write_text(json.dumps(records))
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            cmd = [a.python, str(Path(__file__).resolve()), "--compile", str(path),
                   "--arch", a.arch, "--jobs", str(a.jobs)] + (["--full"] if a.full else [])
            return subprocess.run(cmd, env=env).returncode
    reason = nvidia_backend_available()
    if reason:
        print(f"SKIP {reason}")
        return 3
    return _report(compile_launches(records, caps, a.jobs, core_only))


if __name__ == "__main__":
    sys.exit(main())
