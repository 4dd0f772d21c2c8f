"""The fast paths checked against the reference: on first use (CUDA) and ``normlab selftest``.

A *check* runs one fused path (``"cpu"``: the ``normlab::normalize`` ops with the C kernels;
``"triton"``: the ``normlab::normalize_triton`` ops) forward and backward on a small input
and compares outputs, statistics and gradients with the exact result — the reference math
(:func:`~normlab.kernels.analytic.canonical_forward` / ``canonical_backward``) in float64
on the same input values. It passes when the fused error is below the dtype's tolerance, or
no worse than 4× the error of the reference implementation run in the input's own precision
(the rule for inputs where the precision itself runs out, e.g. ``|μ|/σ = 1e8``). NaN and
Inf must appear in the same places as in the exact result.

:func:`fast_path_verified`: the dispatcher asks it before the first use of each
(path, family, dtype, layout) on the devices in :data:`VERIFIED_DEVICES` (CUDA: a GPU the
kernels may never have run on), on the plain case with :data:`FIRST_USE_SLACK` times the
tolerance (it is there to catch a kernel that is broken on this machine). A failing or crashing check warns once and the reference
serves that key for the rest of the process. It is a ``torch.compiler.assume_constant_result``
function, so the check also runs (on real tensors) while ``torch.compile`` traces a model.

:func:`run_selftest`: the whole matrix — every family × dtype × layout × adversarial case
(planted outliers up to 1e6, sets that keep one value, ``|μ|/σ = 1e8``, NaN, Inf, an empty
batch) — behind ``normlab selftest``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import analytic, cpu
from .spec import Activation, NormSpec, Reduction

__all__ = ["VERIFIED_DEVICES", "fast_path_verified", "run_check", "run_selftest", "CASES",
           "CONFIGS", "CheckResult", "paths_on"]

VERIFIED_DEVICES = {"cuda"}  # device types whose fast path is checked before its first use
FIRST_USE_SLACK = 10.0  # the first-use check catches broken kernels; selftest is the strict one
CASES = ("normal", "outlier_1e6", "keeps_one", "mean_std_1e8", "nan", "inf", "empty")
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2,
             torch.float16: 1e-2}

# (label, spec) per family: what the layers call
CONFIGS = {
    "channel": (("fbn", NormSpec(Reduction.CHANNEL, threshold=2.0)),
                ("bn", NormSpec(Reduction.CHANNEL))),
    "rows": (("fgn", NormSpec(Reduction.ROWS, threshold=2.0, groups=3)),
             ("frn+tlu", NormSpec(Reduction.ROWS, centered=False, eps=1e-6,
                                  activation=Activation.TLU, groups=6)),
             ("ffrn+affine_tlu", NormSpec(Reduction.ROWS, threshold=2.0, centered=False,
                                          eps=1e-6, activation=Activation.AFFINE_TLU,
                                          groups=6))),
}


@dataclass(frozen=True)
class CheckResult:
    path: str
    layer: str
    dtype: torch.dtype
    layout: str
    case: str
    error: float        # worst normalized error of the fused path vs the exact result
    allowed: float      # the bound it must stay under
    message: str = ""   # set when the fused path raised

    @property
    def passed(self) -> bool:
        return not self.message and self.error <= self.allowed


def _ops(path: str) -> tuple[Callable, Callable]:
    from . import ops  # lazy: import cycle (kernels/__init__ and ops import check)
    if path == "cpu":
        return torch.ops.normlab.normalize.default, torch.ops.normlab.normalize_backward.default
    fwd, bwd = ops.triton_ops()
    return fwd._opoverload, bwd._opoverload


def _shape(spec: NormSpec, case: str) -> tuple[int, ...]:
    """``(N, C, L)`` shapes that cover several tiles and splits; tiny sets for
    ``keeps_one`` (three values per set)."""
    if spec.reduction is Reduction.CHANNEL:
        return {"keeps_one": (3, 4, 1), "empty": (0, 4, 7)}.get(case, (6, 5, 211))
    c = 6  # 3 or 6 groups
    return {"keeps_one": (4, c, 3 * spec.groups // c), "empty": (0, c, 9)}.get(case, (4, c, 97))


def _layout(t: Tensor, layout: str) -> Tensor:
    """``t`` (``(N, C, L)``, contiguous) stored channels_last or with gaps (``strided``)."""
    if layout == "channels_last":  # (N, C, L) stored as (N, L, C)
        return t.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    if layout == "strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def _inputs(spec: NormSpec, case: str, dtype: torch.dtype, seed: int = 0):
    """float64 values (exactly representable in ``dtype``) of x, ∂ℓ/∂z and the parameters."""
    gen = torch.Generator().manual_seed(seed)
    shape = _shape(spec, case)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.7
    flat = x.view(-1)
    big = 1e6 if dtype != torch.float16 else 3e4  # float16 ends at 65504
    if case == "normal" and flat.numel():
        flat[::97] += 8.0  # a few outliers the filter drops
    elif case == "outlier_1e6":
        flat[3] = big
    elif case == "mean_std_1e8":
        x = big + big * 1e-8 * x
    elif case == "nan":
        flat[5] = math.nan
    elif case == "inf":
        flat[5] = math.inf
    params = x.shape[1]
    w = torch.rand(params, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(params, generator=gen, dtype=torch.float64) * 0.3
    tau = torch.randn(params, generator=gen, dtype=torch.float64) * 0.3
    kappa = torch.rand(params, generator=gen, dtype=torch.float64) * 0.2
    gz = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    cast = [t.to(dtype).to(torch.float64) for t in (x, gz)]  # the values dtype can hold
    return (*cast, w, b, tau, kappa)


def _run(fwd, bwd, x, gz, params, spec: NormSpec, dtype, layout, device):
    from .ops import spec_args  # lazy: import cycle (kernels/__init__ and ops import check)
    w, b, tau, kappa = params
    pdtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w, b, tau, kappa = (p.to(device=device, dtype=pdtype) for p in (w, b, tau, kappa))
    if spec.activation is not Activation.AFFINE_TLU:
        kappa = None
    if spec.activation not in (Activation.TLU, Activation.AFFINE_TLU):
        tau = None
    xk = _layout(x.to(device=device, dtype=dtype), layout)
    gk = _layout(gz.to(device=device, dtype=dtype), layout)
    args = spec_args(spec)
    with torch.no_grad():
        z, stats = fwd(xk, w, b, None, tau, kappa, *args)
        dx, sums, gxhat = bwd(xk, gk, w, b, None, tau, kappa, stats, *args, True)
    return [t.to(torch.float64).cpu() for t in (z, stats[2:4], stats[5], dx, sums, gxhat)]


# outputs of _run: z, (mean, var), count, dx compared value by value; the parameter sums and
# per-set Σγ∂ℓ/∂y·x̂ (sums over a set, with cancellation) relative to the largest of them
_PER_VALUE = (True, True, True, True, False, False)


def _error(got: list[Tensor], exact: list[Tensor]) -> float:
    """Worst ``|got − exact| / (1 + |exact|)`` (or ``/ (1 + max |exact|)`` for sums);
    infinite where the NaN/Inf patterns differ."""
    worst = 0.0
    for a, e, per_value in zip(got, exact, _PER_VALUE):
        if a.shape != e.shape:
            return math.inf
        finite = torch.isfinite(e)
        same_special = torch.equal(torch.isnan(a), torch.isnan(e)) and torch.equal(
            a[torch.isinf(e)], e[torch.isinf(e)])
        if not same_special:
            return math.inf
        if finite.any():
            a, e = a[finite], e[finite]
            scale = 1 + (e.abs() if per_value else e.abs().max())
            diff = (a - e).abs() / scale
            if not torch.isfinite(diff).all():
                return math.inf
            worst = max(worst, float(diff.max()))
    return worst


def run_check(path: str, layer: str, spec: NormSpec, dtype: torch.dtype, layout: str,
              case: str, device="cpu", slack: float = 1.0) -> CheckResult:
    """One fused path vs the exact result on one input (see the module docstring);
    ``slack`` multiplies the allowed error."""
    if case == "keeps_one" and spec.filtered:  # sets of 3 values: T = 0.5 keeps one or two
        spec = dataclasses.replace(spec, threshold=0.5)
    x, gz, *params = _inputs(spec, case, dtype)
    with warnings.catch_warnings():  # e.g. var_mean of the empty batch
        warnings.simplefilter("ignore")
        exact = _run(*_reference_ops(), x, gz, params, spec, torch.float64, "contiguous", "cpu")
        reference = _run(*_reference_ops(), x, gz, params, spec, dtype, "contiguous", "cpu")
        allowed = slack * max(TOLERANCE[dtype], 4 * _error(reference, exact))
        try:
            got = _run(*_ops(path), x, gz, params, spec, dtype, layout, device)
        except Exception as error:  # noqa: BLE001 — a crashing kernel is a failed check
            return CheckResult(path, layer, dtype, layout, case, math.inf, allowed,
                               f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
    return CheckResult(path, layer, dtype, layout, case, _error(got, exact), allowed)


def _reference_ops() -> tuple[Callable, Callable]:
    """The ops' contract in torch ops (:mod:`analytic`), in the input's precision."""
    # lazy: import cycle (kernels/__init__ and ops import check)
    from .layout import canonical_view
    from .ops import plan_of, spec_of  # lazy: import cycle (kernels/__init__ and ops import check)

    def fwd(x, w, b, e, tau, kappa, *config):
        spec = spec_of(*config)
        xv = canonical_view(x, plan_of(x, spec))
        z, stats = analytic.canonical_forward(xv, w, b, e, tau, kappa, spec)
        return z.reshape(x.shape), stats

    def bwd(x, gz, w, b, e, tau, kappa, stats, *args):
        *config, need_dx = args
        spec = spec_of(*config)
        xv = canonical_view(x, plan_of(x, spec))
        dx, sums, gxhat = analytic.canonical_backward(
            xv, gz.reshape(xv.shape), w, b, e, tau, kappa, stats, spec, need_dx)
        return dx.reshape(x.shape) if need_dx else dx, sums, gxhat
    return fwd, bwd


# --------------------------------------------------------------------------------------
# first use on a device the kernels may never have run on
# --------------------------------------------------------------------------------------
_verdicts: dict[tuple, bool] = {}


@torch.compiler.assume_constant_result
def fast_path_verified(path: str, family: str, dtype: torch.dtype, layout: str,
                       device: str) -> bool:
    """Whether ``path`` computes ``family`` in ``dtype``/``layout`` on ``device`` correctly
    (checked once per process and key on the ``"normal"`` case; warns once on failure)."""
    key = (path, family, dtype, layout, device)
    verdict = _verdicts.get(key)
    if verdict is None:
        try:
            with torch.inference_mode(False):
                results = [run_check(path, layer, spec, dtype, layout, "normal", device,
                                     slack=FIRST_USE_SLACK) for layer, spec in CONFIGS[family]]
        except Exception as error:  # noqa: BLE001 — a check that cannot run fails
            results = [CheckResult(path, family, dtype, layout, "normal", math.inf, 0.0,
                                   f"{type(error).__name__}: {error}")]
        bad = [r for r in results if not r.passed]
        verdict = _verdicts[key] = not bad
        if bad:
            r = bad[0]
            detail = r.message or f"error {r.error:.3g} > {r.allowed:.3g}"
            warnings.warn(
                f"normlab: the {path} kernels disagree with the reference for {r.layer} "
                f"({dtype}, {layout}) on {device} ({detail}); using the reference "
                f"implementation for this case from now on. Run `normlab selftest --device "
                f"{device.split(':')[0]}` for the full table and report it.",
                RuntimeWarning, stacklevel=2)
    return verdict


# --------------------------------------------------------------------------------------
# normlab selftest
# --------------------------------------------------------------------------------------
def paths_on(device: str) -> list[str]:
    """The fused paths available on a device type (``"cpu"`` or ``"cuda"``)."""
    if device == "cpu":
        return ["cpu"] if cpu.available() else []
    from . import ops  # lazy: import cycle (kernels/__init__ and ops import check)
    return ["triton"] if torch.cuda.is_available() and ops.triton_ops() is not None else []


def run_selftest(device: str = "cpu", *, cases=CASES) -> list[CheckResult]:
    """Every fused path on ``device`` × family × dtype × layout × case (module docstring)."""
    # lazy: import cycle (kernels/__init__ and ops import check)
    from .ops import CPU_DTYPES, TRITON_DTYPES
    results = []
    for path in paths_on(device):
        dtypes = CPU_DTYPES if path == "cpu" else TRITON_DTYPES
        layouts = ("contiguous", "channels_last") + (("strided",) if path == "triton" else ())
        for family, configs in CONFIGS.items():
            for layer, spec in configs:
                for dtype in dtypes:
                    for layout in layouts:
                        for case in cases:
                            results.append(run_check(path, layer, spec, dtype, layout, case,
                                                     device))
    return results
