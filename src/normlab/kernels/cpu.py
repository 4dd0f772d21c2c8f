"""Fused CPU kernels: a small C/OpenMP library compiled at first use, called through ctypes.

Why C: normalization is memory-bound, so its cost is passes over the activation. Each
kernel walks one reduction set at a time (a BN channel, or a GN/FRN/IN/LN row): the first
pass reads the set from memory, the filter pass and the normalize pass re-read it from
cache. Per set, forward is ≈ one read and one write of ``x``; backward ≈ two reads of
``x`` and ``∂ℓ/∂y`` and one write, with the robust-filter mask recomputed from ``x`` and the
saved plain moments. Only ``x`` and per-set statistics are saved for backward.

Exact statistics: moments are accumulated per in-cache chunk in two sweeps (the chunk's
mean in double, then its centred sums) and merged in double with Chan's update; the
filtered moments do the same over the kept values, centred on their own mean; means reach
the loops as hi + lo pairs and ``y = (x − μ)·(γ r) + β``. NaN and Inf follow the reference.
The rule and its cost: ``docs/performance.md``; the C: ``kernels/csrc`` (:mod:`._cpu_source`).

Layouts (``Plan.layout``): contiguous, and channels_last — ``x`` stored as rows of ``C``
contiguous channel values (a ``channels_last`` NHWC activation after the modules' reshape).
There the loops run over channels with per-channel accumulators: batch norm makes three
passes over the rows split among the threads (plain moments, filtered moments, normalize; a
channel is spread over the whole tensor, so nothing is re-read from cache), the row family
(GN/FRN/IN) one sample at a time as above. ``y`` and ``∂ℓ/∂x`` keep ``x``'s strides.

dtypes: float32, float64 and bfloat16. The bfloat16 kernels read and write the bf16 tensors
in place (``x``, ``y``, ``∂ℓ/∂y``, ``∂ℓ/∂x``; a load is a shift, a store rounds to nearest-even)
and compute in float32, with float32 statistics and parameter vectors (half parameters are
converted: a few values); no float32 copy of ``x`` is made. float16 inputs take the upcast
path (``_storage_dtype``): ``x`` (and ``∂ℓ/∂y``) copied to float32 for the float32 kernels,
``y``/``∂ℓ/∂x`` cast back. Either way only the half ``x`` is saved for backward.

Build and cache: ``gcc -O3 -march=native -ffp-contract=off -fno-trapping-math -fopenmp``
(no torch headers, 5–7 s of CPU), cached under ``$NORMLAB_CACHE_DIR`` or
``~/.cache/normlab/kernels`` as ``normlab_kernels_<key>.so``, the key hashing the sources,
the flags and the CPU (:func:`_cpu_identity`: the machine and /proc/cpuinfo's processor
description — model and flags on x86, part, variant, revision and features on aarch64 —, or
gcc's resolution of ``-march=native`` where there is no /proc/cpuinfo), so every CPU model
and feature set gets its own library and a cached one loads without a compiler. Next to each
library its sha256 (``.so.sha256``), written at build time and checked before every
``dlopen``: a truncated or altered library is rebuilt, never mapped. Libraries are loaded
only from a directory owned by the current user and writable by nobody else (created
``0700``); a directory that is not is refused with one ``RuntimeWarning`` and the library is
built in a private temporary directory instead. No compiler, a failed build (the warning
shows the compiler's first error line), or ``NORMLAB_NO_COMPILE=1`` leave the reference
Function (:mod:`normlab.kernels.analytic`) in charge.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import stat
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
from .spec import KERNEL_ACT_CODES

__all__ = ["available", "library_path", "forward", "backward", "ACT_CODES", "build_error",
           "STATS_ROWS"]

ACT_CODES = KERNEL_ACT_CODES  # the kernels' act argument (spec.py)
_FLAG_SETS = (
    ["-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"],
    ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"],
    ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-shared", "-fPIC"],
)

# The C functions and their ctypes argument types, in one table. "{t}" stands for each storage
# dtype suffix (_SFX). Pointers are data pointers of tensors (or NULL); st is the (NSTATS, sets)
# statistics block (rows: mean0, var0, mean, var, rstd, count, mean0_lo, mean_lo); work the
# channels_last scratch ((threads + 1) · WORK_PER · C doubles).
_P, _I64, _D, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
_STATS_ARGS = (_I, _D, _D, _D)  # centered, eps, threshold (≤ 0: none), κ
_SIGNATURES: dict[str, tuple] = {
    # x, y, w, b, τ, κ_a, N, C, L, centered, eps, thr, kap, act, st, running mean,
    # running var, factor, [work,] nt
    "bn_fwd_{t}": (None, (*(_P,) * 6, *(_I64,) * 3, *_STATS_ARGS, _I, _P, _P, _P, _D, _I)),
    "bnc_fwd_{t}": (None, (*(_P,) * 6, *(_I64,) * 3, *_STATS_ARGS, _I, _P, _P, _P, _D, _P, _I)),
    # x, dz, dx, w, b, τ, κ_a, N, C, L, centered, eps, thr, kap, act, st, Σdy, Σdy·x̂,
    # Στ-branch dz, Σ dz·y there (NULL, NULL without an activation), [work,] nt
    "bn_bwd_{t}": (None, (*(_P,) * 7, *(_I64,) * 3, *_STATS_ARGS, _I, *(_P,) * 5, _I)),
    "bnc_bwd_{t}": (None, (*(_P,) * 7, *(_I64,) * 3, *_STATS_ARGS, _I, *(_P,) * 6, _I)),
    # x, y, w, b, τ, κ_a, R|N, G, Cg, L, centered, eps, thr, kap, act, st, [work,] nt
    "row_fwd_{t}": (None, (*(_P,) * 6, *(_I64,) * 4, *_STATS_ARGS, _I, _P, _I)),
    "rowc_fwd_{t}": (None, (*(_P,) * 6, *(_I64,) * 4, *_STATS_ARGS, _I, _P, _P, _I)),
    # x, dz, dx, w, b, τ, κ_a, R|N, G, Cg, L, centered, eps, thr, kap, act, st,
    # Σdy, Σdy·x̂, Στ-branch dz, Σ dz·y there, Σ g·x̂ per set, [work,] nt
    "row_bwd_{t}": (None, (*(_P,) * 7, *(_I64,) * 4, *_STATS_ARGS, _I, _P, *(_P,) * 5, _I)),
    "rowc_bwd_{t}": (None, (*(_P,) * 7, *(_I64,) * 4, *_STATS_ARGS, _I, _P, *(_P,) * 5, _P,
                            _I)),
    "bf16_convert": (None, (_P, _P, _P, _P, _I64)),
    "normlab_work_per": (ctypes.c_int, ()),
    "normlab_nstats": (ctypes.c_int, ()),
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_error: str | None = None
_WORK_PER = 0  # read from the library (normlab_work_per) when it is loaded
# rows of the statistics block (see _SIGNATURES); fixed here so that the op's fake
# implementation knows its shape without the library, checked against it at load
STATS_ROWS = 8


def _cache_dir() -> Path:
    root = os.environ.get("NORMLAB_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "normlab")
    return Path(root) / "kernels"


def _compiler() -> str:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    return compiler


# /proc/cpuinfo fields that change while the CPU does not (clock, boot-time calibration,
# which core, kernel-reported bugs, microcode revision): left out of the CPU's identity
_VOLATILE_CPUINFO = ("processor", "cpu mhz", "bogomips", "core id", "apicid", "initial apicid",
                     "siblings", "cpu cores", "physical id", "bugs", "microcode")


def _cpu_identity(cpuinfo: str | None = None) -> str:
    """The CPU the library is built for (``-march=native``): the machine and the first
    processor's description in /proc/cpuinfo without its volatile fields — model and feature
    flags on x86; implementer, architecture, variant, part, revision and features on aarch64
    (which has no "model name" or "flags"); the equivalent lines elsewhere. Where there is no
    /proc/cpuinfo, what the compiler resolves ``-march=native`` to (``-Q --help=target``).
    Needs no compiler when /proc/cpuinfo exists, so a cached library loads without one."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    first = cpuinfo.strip().split("\n\n")[0]
    lines = [" ".join(ln.split()) for ln in first.splitlines()
             if ":" in ln and ln.split(":")[0].strip().lower() not in _VOLATILE_CPUINFO]
    if not lines:
        lines = [_native_target() or platform.processor()]
    return "\n".join([platform.machine(), *lines])


def _native_target() -> str:
    """``gcc -march=native -Q --help=target`` (the CPU as the compiler sees it), or ""."""
    try:
        proc = subprocess.run([_compiler(), "-march=native", "-Q", "--help=target"],
                              capture_output=True, text=True, timeout=60)
        return proc.stdout if proc.returncode == 0 else ""
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return ""


def _first_error(log: str) -> str:
    """The compiler's first error line (warnings before it would hide it), or the log's
    first line. A link failure reports ``collect2: error: ld returned ...`` after the
    linker's own line, which is kept in front."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    at = next((i for i, ln in enumerate(lines) if re.search(r"(^|:\s*)(fatal )?error:", ln)),
              None)
    if at is None:
        return lines[0] if lines else "no output"
    if lines[at].startswith("collect2") and at > 0:
        return f"{lines[at - 1]} ({lines[at]})"
    return lines[at]


def _not_private(path: Path) -> str | None:
    """Why ``path`` may not hold libraries we load (None: it may): it must be a directory
    owned by this user and writable by no one else, and no ancestor may be writable by
    others unless sticky (as /tmp)."""
    try:
        st = os.stat(path)
    except OSError as error:
        return str(error)
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.geteuid():
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"{path} is writable by group or others (mode {st.st_mode & 0o777:o})"
    for parent in path.resolve().parents:
        try:
            pst = os.stat(parent)
        except OSError as error:
            return str(error)
        if pst.st_mode & 0o002 and not pst.st_mode & stat.S_ISVTX:
            return f"{parent} is writable by others (mode {pst.st_mode & 0o777:o}, not sticky)"
    return None


def _digest_file(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def _verified(lib: Path) -> bool:
    """Whether ``lib`` is a regular file of ours, writable by no one else, whose sha256 is
    the one recorded when it was built (a truncated or altered file is not)."""
    try:
        st = os.lstat(lib)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return False
        want = _digest_file(lib).read_text().strip()
        return hashlib.sha256(lib.read_bytes()).hexdigest() == want
    except (OSError, UnicodeDecodeError):
        return False


def _compile(compiler: str, flags: list[str], target: Path) -> str:
    """Build the library into ``target`` with its digest next to it; both appear atomically
    (concurrent builders never see half a file; a reader that sees a new library with the
    old digest rebuilds). Returns the compiler's messages (empty: the source builds without
    a warning); a failed build raises with the compiler's first error line."""
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([compiler, *flags, str(_cpu_source.main_path()), "-o", str(out),
                               "-lm"], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(compiler).name} {' '.join(flags)}: "
                               f"{_first_error(proc.stderr + proc.stdout)}")
        os.chmod(out, 0o700)
        digest = Path(tmp) / (target.name + ".sha256")
        digest.write_text(hashlib.sha256(out.read_bytes()).hexdigest() + "\n")
        os.replace(out, target)
        os.replace(digest, _digest_file(target))
    return proc.stderr


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name_pattern, (restype, argtypes) in _SIGNATURES.items():
        for name in {name_pattern.format(t=sfx) for sfx in _SFX.values()}:
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, list(argtypes)
    return lib


def _cache_location() -> tuple[Path | None, str | None]:
    """The kernel cache directory (created 0700), or None and why it may not be used."""
    directory = _cache_dir()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        return None, f"cannot create {directory}: {error}"
    why = _not_private(directory)
    return (None, why) if why else (directory, None)


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, _error, _WORK_PER
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("NORMLAB_NO_COMPILE", "") not in ("", "0"):
            _error = "disabled by NORMLAB_NO_COMPILE"
            return None
        try:
            source = _cpu_source.digest()
        except OSError as error:
            _error = str(error)
        else:
            directory, why = _cache_location()
            private = None
            if directory is None:
                warnings.warn(
                    f"normlab: not loading kernels from the cache directory ({why}); building "
                    f"them in a private temporary directory for this process instead. Set "
                    f"NORMLAB_CACHE_DIR to a directory only you can write (mode 700).",
                    RuntimeWarning, stacklevel=3)
                private = directory = Path(tempfile.mkdtemp(prefix="normlab-kernels-"))
            try:
                _lib = _build_and_open(source, directory)
            finally:
                if private is not None:
                    shutil.rmtree(private, ignore_errors=True)  # the mapping stays valid
        if _lib is not None and _lib.normlab_nstats() != STATS_ROWS:
            _error = (f"the kernels' statistics block has {_lib.normlab_nstats()} rows, "
                      f"cpu.py expects {STATS_ROWS}")
            _lib = None
        if _lib is not None:
            _WORK_PER = _lib.normlab_work_per()
            return _lib
        warnings.warn(f"normlab: fused CPU kernels unavailable, using the reference path "
                      f"({_error})", RuntimeWarning, stacklevel=3)
        return None


def _library_name(source: str, flags: list[str]) -> str:
    """``normlab_kernels_<key>.so``, the key hashing the source digest, the flags and
    :func:`_cpu_identity` (the CPU ``-march=native`` builds for)."""
    key = hashlib.sha256("\0".join([source, *flags, _cpu_identity()]).encode()).hexdigest()[:20]
    return f"normlab_kernels_{key}.so"


def _build_and_open(source: str, directory: Path) -> ctypes.CDLL | None:
    """The first flag set that is cached (verified) or builds, and loads; records why none
    did. The compiler is looked for only when a library must be built."""
    global _error
    errors: list[str] = []
    for flags in _FLAG_SETS:
        path = directory / _library_name(source, flags)
        try:
            if not _verified(path):
                _compile(_compiler(), flags, path)
                if not _verified(path):  # replaced meanwhile by another process's build
                    raise RuntimeError(f"{path} changed while it was being loaded")
            return _open(path)
        except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as error:
            if str(error) not in errors:
                errors.append(str(error))
    _error = "; ".join(errors)
    return None


def available() -> bool:
    """Whether the fused CPU library is built and loaded (builds it on first call)."""
    return _load() is not None


def library_path() -> str | None:
    """The file of the loaded fused CPU library (builds it on first call), ``None`` if none."""
    lib = _load()
    return None if lib is None else lib._name


def build_error() -> str | None:
    """Why the library is unavailable, if it is."""
    _load()
    return _error


def _ptr(t: Tensor | None) -> int | None:
    """A tensor's data pointer as the kernels take it (``None``: NULL)."""
    return None if t is None else t.data_ptr()


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
        _trace.append((name, args[0], args[1] if "bwd" in name else None))
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
    if p is None:
        return None
    v = canonical_param(p, pl)
    return v if v.dtype == dtype else v.to(dtype)


_ZEROS: dict[tuple[int, torch.dtype], Tensor] = {}


def _zeros(n: int, dtype: torch.dtype) -> Tensor:
    """A read-only vector of ``n`` zeros (ReLU's τ), made once per size and dtype."""
    z = _ZEROS.get((n, dtype))
    if z is None:
        z = _ZEROS[n, dtype] = torch.zeros(n, dtype=dtype)
    return z


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Same shape and the same strides on every axis longer than 1."""
    sa, sb = a.stride(), b.stride()
    return a.shape == b.shape and (sa == sb or all(
        n == 1 or i == j for n, i, j in zip(a.shape, sa, sb)))


def _empty_as(x: Tensor, pl: Plan, dtype: torch.dtype) -> Tensor:
    """An uninitialized tensor shaped like ``x`` in the plan's memory layout (``empty_like``:
    the cheapest allocation from Python)."""
    if pl.layout == "contiguous":
        return torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)
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
    return torch.empty((nt + 1) * _WORK_PER * pl.g * pl.cg, dtype=torch.float64)


def _row_pointers(t: Tensor) -> tuple[int, ...]:
    """Addresses of the rows of a contiguous 2-D tensor (no view tensors: cheaper per call)."""
    step, base = t.stride(0) * t.element_size(), t.data_ptr()
    return tuple(base + i * step for i in range(t.shape[0]))


def _filter_args(threshold, gaussian_consistent) -> tuple[float, float]:
    """The kernels' threshold (≤ 0: no filter) and variance factor κ."""
    thr = -1.0 if threshold is None else float(threshold)
    return thr, F.variance_factor(threshold, gaussian_consistent)


def running_supported(running, pl: Plan, kdt: torch.dtype) -> bool:
    """Whether the batch-norm kernels can update ``running`` (a
    :class:`~normlab.kernels.analytic.RunningStats`) themselves: per-channel statistics, and
    contiguous buffers of the kernel dtype with one value per channel."""
    return pl.kind == "channel" and _buffer_ok(running.mean, pl.g, kdt) and _buffer_ok(
        running.var, pl.g, kdt)


def _buffer_ok(t: Tensor, n: int, dtype: torch.dtype) -> bool:
    return (type(t) in PLAIN_TENSORS and t.dtype == dtype and t.is_contiguous()
            and t.numel() == n and t.device.type == "cpu")


#: tensors with storage of their own (not fake, functional or other subclasses)
PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _running_args(running, pl: Plan, kdt: torch.dtype) -> tuple:
    """The kernels' ``(running mean, running var, factor)`` arguments: NULL without ``running``
    (the ops are functional: the dispatcher updates the buffers from the statistics)."""
    if running is None:
        return None, None, 0.0
    if not running_supported(running, pl, kdt):
        raise ValueError("the fused CPU kernels update only contiguous per-channel running "
                         "averages of the kernel dtype; update them from the statistics")
    return _ptr(running.mean), _ptr(running.var), float(running.factor)


def forward(x, weight, bias, eps_extra, tau, akappa, pl: Plan, threshold, centered, eps,
            gaussian_consistent, act, running=None):
    """``z = act(γ · normalize(x) + β)`` with (filtered) statistics, one fused C call.

    The CPU body of the ``normlab::normalize`` op (:mod:`normlab.kernels.ops`); same math as
    :class:`normlab.kernels.analytic.NormalizeAffineFunction` (whose docstring derives the
    backward), plus an optional TLU / affine TLU (Singh & Krishnan 2020, arXiv 1911.09737,
    eq. 3–5) fused into the same passes. Inputs: x (float16/bfloat16/float32/float64, in the
    plan's layout: contiguous or channels_last), weight, bias, eps_extra, tau, kappa_act (x's
    dtype, or float32 for half x), plan, threshold (None: no filter), centered, eps,
    gaussian_consistent, act (:data:`ACT_CODES`). Returns ``y`` in x's dtype and strides and
    the ``(STATS_ROWS, sets)`` statistics block in the kernel dtype (float32 for half x):
    rows 0–5 mean0, var0, mean, var, rstd, count (the op's contract), 6–7 the low parts of
    the two means (what keeps the backward exact when |μ|/σ is large).

    ``running`` (batch norm, :func:`running_supported`): a
    :class:`~normlab.kernels.analytic.RunningStats` the kernel updates from the statistics
    (``mean ← mean + a (μ′ − mean)``, ``var ← var + a (σ′² M/(M − 1) − var)`` in double);
    ``None``: the buffers are the caller's to update (the ops are functional).
    """
    if pl.layout not in ("contiguous", "channels_last"):
        raise ValueError(f"the fused CPU kernels need x contiguous or channels_last, got "
                         f"layout {pl.layout!r}; use the reference Function")
    lib = _load()
    eps_total = eps + (float(eps_extra) if eps_extra is not None else 0.0)
    thr, kap = _filter_args(threshold, gaussian_consistent)
    kdt = _kernel_dtype(x.dtype)  # statistics and parameter vectors (float32 for half x)
    sdt = _storage_dtype(x.dtype)  # x's own dtype; float32 for float16
    w, b, t, k = _vector(weight, pl, kdt), _vector(bias, pl, kdt), _vector(tau, pl, kdt), \
        _vector(akappa, pl, kdt)
    if act == ACT_CODES["tlu"] and t is None:  # ReLU: TLU with τ = 0
        t = _zeros(pl.g * pl.cg, kdt)
    xk = x if x.dtype == sdt else _as_kernel_input(x, x, pl, sdt)  # a float32 copy for float16
    y = _empty_as(x, pl, sdt)
    nsets = pl.g if pl.kind == "channel" else pl.n * pl.g
    stats = torch.empty(STATS_ROWS, nsets, dtype=kdt)
    nt = _threads(x)
    work = _work(pl, nt)
    sfx = _sfx(sdt)
    run = _running_args(running, pl, kdt)
    if pl.kind == "channel" and pl.layout == "contiguous":
        _call(lib, f"bn_fwd_{sfx}", _ptr(xk), _ptr(y), _ptr(w), _ptr(b), _ptr(t), _ptr(k),
              pl.n, pl.g, pl.l, int(centered), eps_total, thr, kap, act, _ptr(stats), *run, nt)
    elif pl.kind == "channel":
        _call(lib, f"bnc_fwd_{sfx}", _ptr(xk), _ptr(y), _ptr(w), _ptr(b), _ptr(t), _ptr(k),
              pl.n, pl.g, pl.l, int(centered), eps_total, thr, kap, act, _ptr(stats), *run,
              _ptr(work), nt)
    elif pl.layout == "contiguous":
        _call(lib, f"row_fwd_{sfx}", _ptr(xk), _ptr(y), _ptr(w), _ptr(b), _ptr(t), _ptr(k),
              pl.n * pl.g, pl.g, pl.cg, pl.l, int(centered), eps_total, thr, kap, act,
              _ptr(stats), nt)
    else:
        _call(lib, f"rowc_fwd_{sfx}", _ptr(xk), _ptr(y), _ptr(w), _ptr(b), _ptr(t), _ptr(k),
              pl.n, pl.g, pl.cg, pl.l, int(centered), eps_total, thr, kap, act, _ptr(stats),
              _ptr(work), nt)
    if running is not None:  # written through pointers: tell autograd, as an in-place op would
        torch._C._increment_version((running.mean, running.var))  # (autograd.graph's own call)
    return (y if y.dtype == x.dtype else y.to(x.dtype)), stats  # float16: cast back


def backward(x, grad_y, weight, bias, eps_extra, tau, akappa, stats, pl: Plan, threshold,
             centered, eps, gaussian_consistent, act, need_dx, need_gxhat=True):
    """The fused backward of :func:`forward` (body of ``normlab::normalize_backward``).

    ``stats`` is the block :func:`forward` returned. Returns ``(dx, sums, gxhat)``:
    ``∂ℓ/∂x`` in x's dtype and strides (``None`` unless ``need_dx``); per parameter
    ``Σ∂ℓ/∂y``, ``Σ∂ℓ/∂y·x̂`` (and for rows ``∂ℓ/∂τ``, ``∂ℓ/∂κ``) as a ``(2, C)`` or
    ``(4, G·Cg)`` tensor; ``Σ γ∂ℓ/∂y·x̂`` per set (batch norm: ``None`` unless
    ``need_gxhat``; only ε's gradient uses it).
    """
    lib = _load()
    eps_total = eps + (float(eps_extra) if eps_extra is not None else 0.0)
    thr, kap = _filter_args(threshold, gaussian_consistent)
    kdt = stats.dtype
    w, b, t, k = _vector(weight, pl, kdt), _vector(bias, pl, kdt), _vector(tau, pl, kdt), \
        _vector(akappa, pl, kdt)
    if act == ACT_CODES["tlu"] and t is None:
        t = _zeros(pl.g * pl.cg, kdt)
    sdt = _storage_dtype(x.dtype)
    xk = x if x.dtype == sdt else _as_kernel_input(x, x, pl, sdt)
    dz = _as_kernel_input(grad_y, x, pl, sdt)  # ∂ℓ/∂z in x's layout and storage dtype
    dx = _empty_as(x, pl, sdt) if need_dx else None
    nt = _threads(x)
    work = _work(pl, nt)
    sfx = _sfx(sdt)
    st = _ptr(stats)
    if pl.kind == "channel":
        # Σdy, Σdy·x̂ (and with an activation Σdτ, Σdκ): 2 or 4 rows, as the op's contract
        sums = torch.empty(2 if act == ACT_CODES["none"] else 4, pl.g, dtype=kdt)
        per_channel = (_row_pointers(sums) + (None, None))[:4]
        if pl.layout == "contiguous":
            _call(lib, f"bn_bwd_{sfx}", _ptr(xk), _ptr(dz), _ptr(dx), _ptr(w), _ptr(b),
                  _ptr(t), _ptr(k), pl.n, pl.g, pl.l, int(centered), eps_total, thr, kap, act,
                  st, *per_channel, nt)
        else:
            _call(lib, f"bnc_bwd_{sfx}", _ptr(xk), _ptr(dz), _ptr(dx), _ptr(w), _ptr(b),
                  _ptr(t), _ptr(k), pl.n, pl.g, pl.l, int(centered), eps_total, thr, kap, act,
                  st, *per_channel, _ptr(work), nt)
        if need_gxhat:
            s_gxhat = sums[1] * w if w is not None else sums[1].clone()  # an output of its own
        else:
            s_gxhat = None
    else:
        rows = pl.n * pl.g
        buf = torch.empty(4, rows * pl.cg, dtype=kdt)
        s_gxhat = torch.empty(rows, dtype=kdt)
        per_set = (*_row_pointers(buf), _ptr(s_gxhat))  # Σdy, Σdy·x̂, Σdτ, Σdκ, Σg·x̂
        if pl.layout == "contiguous":
            _call(lib, f"row_bwd_{sfx}", _ptr(xk), _ptr(dz), _ptr(dx), _ptr(w), _ptr(b),
                  _ptr(t), _ptr(k), rows, pl.g, pl.cg, pl.l, int(centered), eps_total, thr,
                  kap, act, st, *per_set, nt)
        else:
            _call(lib, f"rowc_bwd_{sfx}", _ptr(xk), _ptr(dz), _ptr(dx), _ptr(w), _ptr(b),
                  _ptr(t), _ptr(k), pl.n, pl.g, pl.cg, pl.l, int(centered), eps_total, thr,
                  kap, act, st, *per_set, _ptr(work), nt)
        sums = buf.view(4, pl.n, pl.g * pl.cg).sum(1)
    if dx is not None and dx.dtype != x.dtype:
        dx = dx.to(x.dtype)  # float16: cast back (strides kept)
    return dx, sums, s_gxhat
