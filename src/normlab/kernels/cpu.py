"""Fused CPU kernels: a small C/OpenMP library compiled at first use, called through ctypes.

Why C: normalization is memory-bound, so its cost is passes over the activation. Each
kernel walks one reduction set at a time (a BN channel, or a GN/FRN/IN/LN row): the first
pass reads the set from memory, the filter pass and the normalize pass re-read it from
cache. Per set, forward is ≈ one read and one write of ``x``; backward ≈ two reads of
``x`` and ``∂ℓ/∂y`` and one write, with the robust-filter mask recomputed from ``x`` and the
saved plain moments. Only ``x`` and per-set statistics are saved for backward.

Layouts (``Plan.layout``): contiguous, and channels_last — ``x`` stored as rows of ``C``
contiguous channel values (a ``channels_last`` NHWC activation after the modules' reshape).
There the loops run over channels with per-channel accumulators: batch norm makes three
passes over the rows split among the threads (plain sums, filter sums, normalize; a channel
is spread over the whole tensor, so nothing is re-read from cache), the row family (GN/FRN/
IN) one sample at a time as above. ``y`` and ``∂ℓ/∂x`` keep ``x``'s strides.

dtypes: float32, float64 and bfloat16. The bfloat16 kernels read and write the bf16 tensors
in place (``x``, ``y``, ``∂ℓ/∂y``, ``∂ℓ/∂x``; a load is a shift, a store rounds to nearest-even)
and compute and accumulate in float32, with float32 statistics and parameter vectors (half
parameters are converted: a few values); no float32 copy of ``x`` is made. float16 inputs
take the upcast path (``_storage_dtype``): ``x`` (and ``∂ℓ/∂y``) copied to float32 for the
float32 kernels, ``y``/``∂ℓ/∂x`` cast back — on gcc 12 no in-kernel float16 conversion was
faster (see ``_cpu_source``). Either way only the half ``x`` is saved for backward.

Build: ``gcc -O3 -march=native -fno-trapping-math -fopenmp`` (no torch headers, ~1 s), cached under
``$NORMLAB_CACHE_DIR`` or ``~/.cache/normlab/kernels`` keyed by a hash of the source, the
flags and the CPU. No compiler, a failed build, or ``NORMLAB_NO_COMPILE=1`` simply leave the
reference Function (:mod:`normlab.kernels.analytic`) in charge.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .. import functional as F
from . import _cpu_source
from .layout import Plan, canonical_param

__all__ = ["available", "library_path", "forward", "backward", "ACT_CODES", "build_error"]

ACT_CODES = {"none": 0, "tlu": 1, "relu": 1, "affine_tlu": 2}
_FLAG_SETS = (
    ["-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"],
    ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"],
    ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-shared", "-fPIC"],
)
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_error: str | None = None


def _cache_dir() -> Path:
    root = os.environ.get("NORMLAB_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "normlab")
    return Path(root) / "kernels"


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            lines = [ln for ln in fh if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _compile(src: str, flags: list[str], target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        c_file = Path(tmp) / "normlab_kernels.c"
        c_file.write_text(src)
        out = Path(tmp) / target.name
        proc = subprocess.run([compiler, *flags, str(c_file), "-o", str(out), "-lm"],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {proc.stderr.strip()[:500]}")
        os.replace(out, target)  # atomic: concurrent builders never see half a file


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, _error
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("NORMLAB_NO_COMPILE", "") not in ("", "0"):
            _error = "disabled by NORMLAB_NO_COMPILE"
            return None
        src = _cpu_source.source()
        errors = []
        for flags in _FLAG_SETS:
            key = hashlib.sha256("\0".join([src, *flags, _cpu_id(), platform.machine()])
                                 .encode()).hexdigest()[:16]
            path = _cache_dir() / f"normlab_kernels_{key}.so"
            try:
                if not path.exists():
                    _compile(src, flags, path)
                lib = ctypes.CDLL(str(path))
                _declare(lib)
                _lib = lib
                return lib
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                errors.append(f"{' '.join(flags)}: {error}")
        _error = "; ".join(errors)
        warnings.warn(f"normlab: fused CPU kernels unavailable, using the reference path "
                      f"({_error})", RuntimeWarning, stacklevel=3)
        return None


def _declare(lib: ctypes.CDLL) -> None:
    P, I64, D, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    for sfx in _SFX.values():
        getattr(lib, f"bn_fwd_{sfx}").argtypes = [P, P, P, P, I64, I64, I64, I, D, D, D,
                                                   P, P, P, P, P, P, P, P, D, I]
        getattr(lib, f"bn_bwd_{sfx}").argtypes = [P, P, P, P, I64, I64, I64, I, D, D, D,
                                                   P, P, P, P, P, P, P, I]
        getattr(lib, f"row_fwd_{sfx}").argtypes = [P, P, P, P, P, P, I64, I64, I64, I64, I,
                                                    D, D, D, I, P, P, P, P, P, P, I]
        getattr(lib, f"row_bwd_{sfx}").argtypes = [P, P, P, P, P, P, P, I64, I64, I64, I64, I,
                                                    D, D, D, I, P, P, P, P, P,
                                                    P, P, P, P, P, I]
        # channels_last: same arguments, plus a scratch buffer before the thread count
        getattr(lib, f"bnc_fwd_{sfx}").argtypes = [P, P, P, P, I64, I64, I64, I, D, D, D,
                                                    P, P, P, P, P, P, P, P, D, P, I]
        getattr(lib, f"bnc_bwd_{sfx}").argtypes = [P, P, P, P, I64, I64, I64, I, D, D, D,
                                                    P, P, P, P, P, P, P, P, I]
        getattr(lib, f"rowc_fwd_{sfx}").argtypes = [P, P, P, P, P, P, I64, I64, I64, I64, I,
                                                     D, D, D, I, P, P, P, P, P, P, P, I]
        getattr(lib, f"rowc_bwd_{sfx}").argtypes = [P, P, P, P, P, P, P, I64, I64, I64, I64, I,
                                                     D, D, D, I, P, P, P, P, P,
                                                     P, P, P, P, P, P, I]
        for kind in ("bn_fwd", "bn_bwd", "row_fwd", "row_bwd",
                     "bnc_fwd", "bnc_bwd", "rowc_fwd", "rowc_bwd"):
            getattr(lib, f"{kind}_{sfx}").restype = None
    lib.bf16_convert.argtypes, lib.bf16_convert.restype = [P, P, P, P, I64], None


def available() -> bool:
    """Whether the fused CPU library is built and loaded (builds it on first call)."""
    return _load() is not None


def library_path() -> str | None:
    lib = _load()
    return None if lib is None else lib._name


def build_error() -> str | None:
    """Why the library is unavailable, if it is."""
    _load()
    return _error


def _ptr(t: Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


# storage dtype of x / y / ∂ℓ/∂y / ∂ℓ/∂x → suffix of the C kernels (bf16 ones compute in float)
_SFX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}


def _sfx(dtype: torch.dtype) -> str:
    return _SFX[dtype]


def _storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels read and write: ``x``'s own, or float32 for float16 (upcast)."""
    return dtype if dtype in _SFX else torch.float32


def bf16_convert(h: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
    """The C kernels' own conversions, for tests: ``h`` (bfloat16) loaded to float32, and
    ``f`` (float32, as many values) stored to bfloat16."""
    h, f = h.contiguous(), f.contiguous()
    assert h.dtype == torch.bfloat16 and f.dtype == torch.float32 and h.numel() == f.numel()
    hf, fh = torch.empty(h.shape), torch.empty(f.shape, dtype=torch.bfloat16)
    _load().bf16_convert(_ptr(h), _ptr(hf), _ptr(f), _ptr(fh), h.numel())
    return hf, fh


# introspection for tests: while a list is installed here, each kernel call appends
# (kernel name, address of its x argument, address of its ∂ℓ/∂y argument or None)
_trace: list | None = None


def _call(lib, name: str, *args) -> None:
    if _trace is not None:
        _trace.append((name, args[0].value, args[1].value if "bwd" in name else None))
    getattr(lib, name)(*args)


# below this many values a call runs on one thread: waking OpenMP threads costs more than the
# work (milliseconds when other processes hold the cores)
PARALLEL_MIN_NUMEL = 1 << 15


def _threads(x: Tensor) -> int:
    return torch.get_num_threads() if x.numel() >= PARALLEL_MIN_NUMEL else 1


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the statistics and parameter vectors, and of the kernels' arithmetic: float32
    or float64; float32 for half inputs (``stats_dtype``), whose storage stays half."""
    return F.stats_dtype(dtype)


def _vector(p: Tensor | None, pl: Plan, dtype: torch.dtype) -> Tensor | None:
    """A parameter as the kernels' contiguous ``(G·Cg,)`` vector in the kernel dtype."""
    v = canonical_param(p, pl)
    return v if v is None or v.dtype == dtype else v.to(dtype)


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Same shape and the same strides on every axis longer than 1."""
    return a.shape == b.shape and all(
        n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def _empty_as(x: Tensor, pl: Plan, dtype: torch.dtype) -> Tensor:
    """An uninitialized tensor shaped like ``x`` in the plan's memory layout."""
    if pl.layout == "contiguous":
        return torch.empty(x.shape, dtype=dtype)
    return torch.empty_strided(x.shape, x.stride(), dtype=dtype)  # x's (dense) NHWC strides


def _as_kernel_input(t: Tensor, x: Tensor, pl: Plan, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` and laid out like ``x``; copies only when it is not already."""
    if t.dtype == dtype and _same_layout(t, x):
        return t
    return _empty_as(x, pl, dtype).copy_(t)


def _work(pl: Plan, nt: int) -> Tensor | None:
    """Scratch of the channels_last kernels: per-thread (and shared) per-channel vectors."""
    if pl.layout != "channels_last":
        return None
    return torch.empty((nt + 1) * _cpu_source.WORK_PER * pl.g * pl.cg, dtype=torch.float64)


def _row_pointers(t: Tensor) -> list[int]:
    """Addresses of the rows of a contiguous 2-D tensor (no view tensors: cheaper per call)."""
    step = t.stride(0) * t.element_size()
    base = t.data_ptr()
    return [base + i * step for i in range(t.shape[0])]


def forward(x, weight, bias, eps_extra, tau, akappa, pl: Plan, threshold, centered, eps,
            gaussian_consistent, act):
    """``z = act(γ · normalize(x) + β)`` with (filtered) statistics, one fused C call.

    The CPU body of the ``normlab::normalize`` op (:mod:`normlab.kernels.ops`); same math as
    :class:`normlab.kernels.analytic.NormalizeAffineFunction` (whose docstring derives the
    backward), plus an optional TLU / affine-TLU (FRN seed eq. 3–5) fused into the same
    passes. Inputs: x (float16/bfloat16/float32/float64, in the plan's layout: contiguous
    or channels_last), weight, bias, eps_extra, tau, kappa_act (x's dtype, or float32 for
    half x), plan, threshold (None: no filter), centered, eps, gaussian_consistent, act
    (:data:`ACT_CODES`). Returns ``y`` in x's dtype and strides and the ``(6, sets)``
    statistics (mean0, var0, mean, var, rstd, count) in the kernel dtype (float32 for half x).
    """
    if pl.layout not in ("contiguous", "channels_last"):
        raise ValueError(f"the fused CPU kernels need x contiguous or channels_last, got "
                         f"layout {pl.layout!r}; use the reference Function")
    lib = _load()
    eps_total = eps + (float(eps_extra) if eps_extra is not None else 0.0)
    thr = -1.0 if threshold is None else float(threshold)
    kap = (F.truncated_normal_variance_factor(threshold)
           if gaussian_consistent and threshold is not None else 1.0)
    kdt = _kernel_dtype(x.dtype)  # statistics and parameter vectors (float32 for half x)
    sdt = _storage_dtype(x.dtype)  # x's own dtype; float32 for float16
    w, b, t, k = (_vector(p, pl, kdt) for p in (weight, bias, tau, akappa))
    if act == ACT_CODES["tlu"] and t is None:  # ReLU: TLU with τ = 0
        t = torch.zeros(pl.g * pl.cg, dtype=kdt)
    xk = x if x.dtype == sdt else _as_kernel_input(x, x, pl, sdt)  # a float32 copy for float16
    y = _empty_as(x, pl, sdt)
    nsets = pl.g if pl.kind == "channel" else pl.n * pl.g
    stats = torch.empty(6, nsets, dtype=kdt)
    nt = _threads(x)
    work = _work(pl, nt)
    sfx = _sfx(sdt)
    outs = _row_pointers(stats)  # mean0, var0, mean, var, rstd, count
    run = (None, None, 0.0)  # running averages: updated by the dispatcher (a functional op)
    if pl.kind == "channel" and pl.layout == "contiguous":
        _call(lib, f"bn_fwd_{sfx}", _ptr(xk), _ptr(y), _ptr(w), _ptr(b), pl.n, pl.g, pl.l,
              int(centered), eps_total, thr, kap, *outs, *run, nt)
    elif pl.kind == "channel":
        _call(lib, f"bnc_fwd_{sfx}", _ptr(xk), _ptr(y), _ptr(w), _ptr(b), pl.n, pl.g, pl.l,
              int(centered), eps_total, thr, kap, *outs, *run, _ptr(work), nt)
    elif pl.layout == "contiguous":
        _call(lib, f"row_fwd_{sfx}", _ptr(xk), _ptr(y), _ptr(w), _ptr(b), _ptr(t), _ptr(k),
              pl.n * pl.g, pl.g, pl.cg, pl.l, int(centered), eps_total, thr, kap, act,
              *outs, nt)
    else:
        _call(lib, f"rowc_fwd_{sfx}", _ptr(xk), _ptr(y), _ptr(w), _ptr(b), _ptr(t), _ptr(k),
              pl.n, pl.g, pl.cg, pl.l, int(centered), eps_total, thr, kap, act, *outs,
              _ptr(work), nt)
    return (y if y.dtype == x.dtype else y.to(x.dtype)), stats  # float16: cast back


def backward(x, grad_y, weight, bias, eps_extra, tau, akappa, stats, pl: Plan, threshold,
             centered, eps, gaussian_consistent, act, need_dx):
    """The fused backward of :func:`forward` (body of ``normlab::normalize_backward``).

    Returns ``(dx, sums, gxhat)``: ``∂ℓ/∂x`` in x's dtype and strides (``None`` unless
    ``need_dx``); per parameter ``Σ∂ℓ/∂y``, ``Σ∂ℓ/∂y·x̂`` (and for rows ``∂ℓ/∂τ``,
    ``∂ℓ/∂κ``) as a ``(2, C)`` or ``(4, G·Cg)`` tensor; ``Σ γ∂ℓ/∂y·x̂`` per set.
    """
    lib = _load()
    eps_total = eps + (float(eps_extra) if eps_extra is not None else 0.0)
    thr = -1.0 if threshold is None else float(threshold)
    kap = (F.truncated_normal_variance_factor(threshold)
           if gaussian_consistent and threshold is not None else 1.0)
    mean0, var0, mean, _var, rstd, count = _row_pointers(stats)
    kdt = stats.dtype
    w, b, t, k = (_vector(p, pl, kdt) for p in (weight, bias, tau, akappa))
    if act == ACT_CODES["tlu"] and t is None:
        t = torch.zeros(pl.g * pl.cg, dtype=kdt)
    sdt = _storage_dtype(x.dtype)
    xk = x if x.dtype == sdt else _as_kernel_input(x, x, pl, sdt)
    dz = _as_kernel_input(grad_y, x, pl, sdt)  # ∂ℓ/∂z in x's layout and storage dtype
    dx = _empty_as(x, pl, sdt) if need_dx else None
    nt = _threads(x)
    work = _work(pl, nt)
    sfx = _sfx(sdt)
    saved = (mean0, var0, mean, rstd, count)
    if pl.kind == "channel":
        sums = torch.empty(2, pl.g, dtype=kdt)
        s_dy, s_dyxhat = _row_pointers(sums)
        if pl.layout == "contiguous":
            _call(lib, f"bn_bwd_{sfx}", _ptr(xk), _ptr(dz), _ptr(dx), _ptr(w), pl.n, pl.g,
                  pl.l, int(centered), eps_total, thr, kap, *saved, s_dy, s_dyxhat, nt)
        else:
            _call(lib, f"bnc_bwd_{sfx}", _ptr(xk), _ptr(dz), _ptr(dx), _ptr(w), pl.n, pl.g,
                  pl.l, int(centered), eps_total, thr, kap, *saved, s_dy, s_dyxhat,
                  _ptr(work), nt)
        s_gxhat = sums[1] * w if w is not None else sums[1].clone()  # an output of its own
    else:
        rows = pl.n * pl.g
        buf = torch.empty(4, rows * pl.cg, dtype=kdt)
        s_gxhat = torch.empty(rows, dtype=kdt)
        per_set = (*_row_pointers(buf), _ptr(s_gxhat))  # Σdy, Σdy·x̂, Σdτ, Σdκ, Σg·x̂
        if pl.layout == "contiguous":
            _call(lib, f"row_bwd_{sfx}", _ptr(xk), _ptr(dz), _ptr(dx), _ptr(w), _ptr(b),
                  _ptr(t), _ptr(k), rows, pl.g, pl.cg, pl.l, int(centered), eps_total, thr,
                  kap, act, *saved, *per_set, nt)
        else:
            _call(lib, f"rowc_bwd_{sfx}", _ptr(xk), _ptr(dz), _ptr(dx), _ptr(w), _ptr(b),
                  _ptr(t), _ptr(k), pl.n, pl.g, pl.cg, pl.l, int(centered), eps_total, thr,
                  kap, act, *saved, *per_set, _ptr(work), nt)
        sums = buf.view(4, pl.n, pl.g * pl.cg).sum(1)
    if dx is not None and dx.dtype != x.dtype:
        dx = dx.to(x.dtype)  # float16: cast back (strides kept)
    return dx, sums, s_gxhat
