"""Exact statistics and one NaN rule on the fused CPU kernels (issue 11, items 1 and 2).

Exactness: each case runs a module on the fused CPU path in float32 (or bfloat16) and the same
module in float64 on the reference path, on the *same* input values (the float32 / bfloat16
tensor widened to float64), and compares outputs, ∂ℓ/∂x, parameter gradients and running
statistics. The float64 run is the truth: it sees exactly the numbers the float32 kernels see,
so any difference is the kernels' own rounding, not the input's.

Tolerances (``_assert_close_to_float64``):

* float32: ``|y − y64| ≤ 1e-5 · max(1, |y64|)`` for every value (outliers included: their
  outputs are large, so the bound is relative there); the same for ∂ℓ/∂x with the scale
  ``max|∂ℓ/∂x64|`` of the tensor (a gradient is a difference of terms of that size); parameter
  gradients and running statistics within 1e-5 of the tensor's largest entry.
* bfloat16 (statistics and arithmetic in float32, ``y`` and ``∂ℓ/∂x`` stored as bfloat16):
  one rounding to bfloat16 costs up to 2^-9 relative, so ``|y − y64| ≤ 2^-8 |y64| + 1e-5 ·
  max(1, |y64|)``; ∂ℓ/∂x within 2^-8 of its scale; statistics, parameter gradients and running
  statistics (float32) as for float32 inputs.

The adversarial inputs are those measured in issue 11 (one 1e6 in a 4096-value BN channel —
also as the very first value, which used to be the shift of the plain sums —, one 1e4 in
64-value IN rows, 1e5 in GN, sets that keep one or two values, |mean|/std from 1e2 to 1e8)
and a randomized set with planted outliers up to 1e6.
"""

from __future__ import annotations

import math

import pytest
import torch

import normlab
from normlab import functional as F
from normlab import kernels as K
from normlab.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"no fused CPU kernels: {cpu.build_error()}")

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _run(make, x, dtype, backend, memory_format, seed=0, grad_dtype=None):
    """One training step of ``make()`` in ``dtype`` (bfloat16: float32 module, bf16 input);
    ∂ℓ/∂y is random, rounded to ``grad_dtype`` (default ``dtype``) and given in ``dtype``."""
    torch.manual_seed(seed)
    m = make().to(torch.float32 if dtype == torch.bfloat16 else dtype).train()
    with torch.no_grad():  # parameters away from their init, so γ, β matter
        for p in m.parameters():
            p.add_(torch.randn(p.shape, dtype=torch.float64).mul_(0.3).to(p.dtype))
    xx = x.to(dtype).contiguous(memory_format=memory_format).detach().requires_grad_()
    gen = torch.Generator().manual_seed(seed + 1)
    grad = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(grad_dtype or dtype)
    trace = []
    cpu._trace = trace if backend == "auto" else None  # kernel calls, to prove the fused path ran
    try:
        with K.use_backend(backend):
            y = m(xx)
            y.backward(grad.to(y.dtype).contiguous(memory_format=memory_format))
    finally:
        cpu._trace = None
    if backend == "auto":
        assert [n for n, _, _ in trace if "fwd" in n] and [n for n, _, _ in trace if "bwd" in n]
    params = {n: p.grad.double() for n, p in m.named_parameters() if p.grad is not None}
    buffers = {n: b.double().clone() for n, b in m.named_buffers() if b.is_floating_point()}
    return y.detach().double(), xx.grad.double(), params, buffers


def _errors(got, want, rel, abs_scale=None):
    """max over values of |got − want| / (rel · |want| + 1e-5 · max(1, |want|)) (≤ 1 passes)."""
    scale = want.abs().clamp_min(1) if abs_scale is None else abs_scale
    bound = rel * want.abs() + 1e-5 * scale
    return ((got - want).abs() / bound).max().item()


def _assert_close_to_float64(make, x, dtype, memory_format, *, check_grads=True):
    x = x.to(dtype).double()  # the float64 run sees exactly the rounded input
    y64, g64, p64, b64 = _run(make, x, torch.float64, "reference", torch.contiguous_format,
                              grad_dtype=dtype)  # the same ∂ℓ/∂y values as the tested run
    y, g, p, b = _run(make, x, dtype, "auto", memory_format)
    rel = 2.0 ** -8 if dtype == torch.bfloat16 else 0.0
    assert torch.isfinite(y).all()
    worst = {"y": _errors(y, y64, rel)}
    if check_grads:
        worst["dx"] = _errors(g, g64, rel, abs_scale=g64.abs().max().clamp_min(1))
        for name in p64:  # sums over the batch: relative to the tensor's largest entry
            worst[name] = _errors(p[name], p64[name], 0.0,
                                  abs_scale=p64[name].abs().max().clamp_min(1e-3))
    for name in b64:
        worst[name] = _errors(b[name], b64[name], 0.0, abs_scale=b64[name].abs().max())
    bad = {k: f"{v:.3g}" for k, v in worst.items() if not v <= 1.0}
    assert not bad, f"error / tolerance > 1: {bad}"


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _outlier_bn(first: bool):
    x = _randn(16, 4, 16, 16)  # 4096 values per channel
    if first:
        x[0, :, 0, 0] = 1e6  # the first value of every channel (in both memory orders)
    else:
        x[3, 1, 7, 9] = 1e6
        x[9, 2, 0, 4] = -1e6
    return x


def _outlier_in():
    x = _randn(4, 8, 8, 8, seed=1)  # 64-value rows
    x[0, 0, 0, 0] = 1e4
    x[1, 2, 3, 3] = 1e4
    x[3, 7, 5, 1] = -1e4
    return x


def _outlier_gn():
    x = _randn(4, 16, 8, 8, seed=2)
    x[0, 0, 0, 0] = 1e5
    x[1, 5, 2, 1] = 1e5
    x[2, 12, 7, 7] = -1e5
    return x


CASES = {
    "fbn one 1e6 in a 4096-value channel": (lambda: normlab.FilteredBatchNorm2d(4),
                                            lambda: _outlier_bn(first=False)),
    "fbn 1e6 as the first value of each channel": (lambda: normlab.FilteredBatchNorm2d(4),
                                                   lambda: _outlier_bn(first=True)),
    "fin one 1e4 in 64-value rows": (lambda: normlab.FilteredInstanceNorm2d(8, affine=True),
                                     _outlier_in),
    "fgn one 1e5": (lambda: normlab.FilteredGroupNorm(4, 16), _outlier_gn),
    "ffrn one 1e5": (lambda: normlab.FilterResponseNorm2d(16, threshold=2.0), _outlier_gn),
    "fbn threshold 0.5 keeps one or two values": (
        lambda: normlab.FilteredBatchNorm2d(3, threshold=0.5), lambda: _randn(4, 3, 2, 2, seed=3)),
    "fin threshold 0.5 keeps one or two values": (
        lambda: normlab.FilteredInstanceNorm2d(8, threshold=0.5, affine=True),
        lambda: _randn(4, 8, 2, 2, seed=4)),
    "fgn threshold 0.5 small groups": (lambda: normlab.FilteredGroupNorm(4, 8, threshold=0.5),
                                       lambda: _randn(3, 8, 1, 3, seed=5)),
}
# |mean| / std from 1e2 to 1e8 (float32 rounds the input; the float64 run sees the same values)
for _mean, _std in ((1e6, 0.01), (1e6, 1.0), (1e8, 1.0), (1e8, 100.0), (-3e4, 3e-4)):
    _x = (lambda m, s: lambda: _randn(8, 4, 8, 8, seed=6) * s + m)(_mean, _std)
    CASES[f"fbn mean {_mean:g} sd {_std:g}"] = (lambda: normlab.FilteredBatchNorm2d(4), _x)
    CASES[f"fgn mean {_mean:g} sd {_std:g}"] = (lambda: normlab.FilteredGroupNorm(2, 4), _x)
    CASES[f"fin mean {_mean:g} sd {_std:g}"] = (
        lambda: normlab.FilteredInstanceNorm2d(4, affine=True), _x)
CASES["fbn no filter (threshold 1e30) mean 1e6 sd 1"] = (
    lambda: normlab.FilteredBatchNorm2d(4, threshold=1e30), lambda: _randn(8, 4, 8, 8) + 1e6)
CASES["frn+tlu mean 1e6 sd 1"] = (lambda: normlab.FilterResponseNorm2d(4),
                                  lambda: _randn(8, 4, 8, 8) + 1e6)
# means that move inside a set: every chunk / block of rows is far from the shift carried over
# from the previous ones, so each one is summed again around its own mean
_drift = torch.arange(16, dtype=torch.float64).view(16, 1, 1, 1) * 1e3
CASES["fbn mean drifting 1e3 per sample"] = (lambda: normlab.FilteredBatchNorm2d(4),
                                             lambda: _randn(16, 4, 16, 16) + _drift)
_ramp = torch.linspace(0, 1e4, 1024, dtype=torch.float64).view(1, 1, 32, 32)
CASES["fin ramp 0..1e4 along positions"] = (
    lambda: normlab.FilteredInstanceNorm2d(4, affine=True, threshold=3.0),
    lambda: _randn(3, 4, 32, 32) + _ramp)
CASES["fgn ramp 0..1e4 along positions"] = (lambda: normlab.FilteredGroupNorm(2, 4),
                                            lambda: _randn(3, 4, 32, 32) + _ramp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_adversarial_inputs_match_float64(case, layout, dtype):
    make, data = CASES[case]
    _assert_close_to_float64(make, data(), dtype, LAYOUTS[layout])


def _flat_outliers(*shape, seed=9):
    x = _randn(*shape, seed=seed)
    x.view(-1)[0] = 1e6
    x.view(-1)[x.numel() // 2 + 3] = -1e5
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("make,shape", [
    (lambda: normlab.FilteredBatchNorm1d(8), (2048, 8)),  # runs of one value, stride C
    (lambda: normlab.FilteredBatchNorm1d(8), (64, 8, 40)),
    (lambda: normlab.FilteredLayerNorm(300), (16, 300)),
    (lambda: normlab.FilteredInstanceNorm1d(6, affine=True), (5, 6, 700)),
], ids=["bn1d (N, C)", "bn1d (N, C, L)", "ln (N, D)", "in1d"])
def test_other_shapes_match_float64(make, shape, dtype):
    _assert_close_to_float64(make, _flat_outliers(*shape), dtype, torch.contiguous_format)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", ["fbn 1e6 as the first value of each channel",
                                  "fbn mean drifting 1e3 per sample", "fgn one 1e5",
                                  "fin ramp 0..1e4 along positions"])
def test_adversarial_inputs_match_float64_on_two_threads(monkeypatch, case, layout):
    """The threaded passes (channels_last batch norm splits the rows among the threads and
    merges their moments) on the same cases."""
    monkeypatch.setattr(cpu, "PARALLEL_MIN_NUMEL", 0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        make, data = CASES[case]
        _assert_close_to_float64(make, data(), torch.float32, LAYOUTS[layout])
    finally:
        torch.set_num_threads(before)


_RANDOM_MODULES = (
    lambda c: normlab.FilteredBatchNorm2d(c, threshold=2.0),
    lambda c: normlab.FilteredBatchNorm2d(c, threshold=3.0, gaussian_consistent=True),
    lambda c: normlab.FilteredGroupNorm(2, c, threshold=2.0),
    lambda c: normlab.FilteredInstanceNorm2d(c, threshold=2.5, affine=True),
    lambda c: normlab.FilterResponseNorm2d(c, threshold=2.0),
    lambda c: normlab.FilterResponseNorm2d(c, activation="affine_tlu", threshold=3.0),
    lambda c: normlab.FilteredLayerNorm((c, 5, 3), threshold=2.0),
)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("seed", range(12))
def test_randomized_planted_outliers_match_float64(seed, layout):
    """Random shapes, modules and scales with 1–4 planted outliers of magnitude 1e1…1e6 (any
    sign, sometimes at the very first position)."""
    gen = torch.Generator().manual_seed(100 + seed)
    c = 2 * int(torch.randint(1, 5, (1,), generator=gen))
    n = int(torch.randint(2, 9, (1,), generator=gen))
    shape = (n, c, 5, 3)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x * 10 ** float(torch.empty(1).uniform_(-2, 2, generator=gen)) \
        + float(torch.randn(1, generator=gen, dtype=torch.float64)) * 10
    k = int(torch.randint(1, 5, (1,), generator=gen))
    where = torch.randint(0, x.numel(), (k,), generator=gen)
    if seed % 3 == 0:
        where[0] = 0
    mags = 10 ** torch.empty(k, dtype=torch.float64).uniform_(1, 6, generator=gen)
    signs = torch.randint(0, 2, (k,), generator=gen) * 2 - 1
    x.view(-1)[where] = mags * signs
    make = _RANDOM_MODULES[seed % len(_RANDOM_MODULES)]
    _assert_close_to_float64(lambda: make(c), x, torch.float32, LAYOUTS[layout])


# ---- NaN and Inf: one rule on every path -------------------------------------------------

def test_reference_rule_nan_in_a_set_gives_nan_for_that_set():
    """The reference defines the rule: a NaN, or an Inf that makes the moments NaN, in a
    reduction set gives NaN for every output of that set; other sets are untouched; TLU,
    affine TLU and ReLU propagate NaN (as torch.relu / torch.maximum)."""
    y = torch.tensor([float("nan"), -1.0, 2.0])
    tau = torch.tensor(0.5)
    assert F.tlu(y, tau)[0].isnan() and torch.equal(F.tlu(y, tau)[1:], torch.tensor([0.5, 2.0]))
    assert F.affine_tlu(y, torch.tensor(0.1), tau)[0].isnan()
    x = _randn(4, 3, 5)
    x[1, 1, 2] = float("nan")
    for threshold in (None, 2.0):
        with K.use_backend("reference"):
            y, st = K.normalize_affine(x, None, None, (0, 2), threshold=threshold)
        assert y[:, 1].isnan().all() and y[:, [0, 2]].isfinite().all()
        assert st.mean[0, 1].isnan() and st.var[0, 1].isnan()


def _nan_modules():
    return {
        "fbn": lambda: normlab.FilteredBatchNorm2d(4),
        "fbn gaussian": lambda: normlab.FilteredBatchNorm2d(4, threshold=3.0,
                                                            gaussian_consistent=True),
        "fbn act=tlu": lambda: normlab.create_norm("fbn:act=tlu", 4),
        "fbn act=relu": lambda: normlab.create_norm("fbn:act=relu", 4),
        "fgn": lambda: normlab.FilteredGroupNorm(2, 4),
        "fin": lambda: normlab.FilteredInstanceNorm2d(4, affine=True),
        "fln": lambda: normlab.FilteredLayerNorm((4, 3, 5)),
        "frn+tlu": lambda: normlab.FilterResponseNorm2d(4, learnable_eps=True),
        "ffrn+tlu": lambda: normlab.FilterResponseNorm2d(4, threshold=2.0),
        "frn relu": lambda: normlab.FilterResponseNorm2d(4, activation="relu"),
        "frn affine_tlu": lambda: normlab.FilterResponseNorm2d(4, activation="affine_tlu",
                                                               threshold=2.0),
    }


def _same_nan_pattern_and_values(a, b, what, tol):
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN pattern differs"
    assert torch.equal(a.isinf(), b.isinf()), f"{what}: Inf pattern differs"
    ok = a.isfinite()
    torch.testing.assert_close(a[ok], b[ok], atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", list(_nan_modules()))
def test_nan_and_inf_follow_the_reference(name, bad, layout, dtype):
    """Each fused CPU path gives the reference's NaN/Inf pattern — outputs, ∂ℓ/∂x, parameter
    gradients, running statistics — and its finite values."""
    make = _nan_modules()[name]
    x = _randn(3, 4, 3, 5, seed=7)
    x[1, 2, 1, 3] = float(bad)
    x[2, 0, 0, 0] = 30.0  # an ordinary outlier elsewhere
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    ref = _run(make, x, dtype, "reference", LAYOUTS[layout])
    got = _run(make, x, dtype, "auto", LAYOUTS[layout])
    # the rule itself, on the reference: a NaN makes its set NaN (and nothing else)
    if bad == "nan":
        assert ref[0].isnan().any() and not ref[0].isnan().all()
    for what, a, b in (("y", got[0], ref[0]), ("dx", got[1], ref[1])):
        _same_nan_pattern_and_values(a, b, what, tol)
    for key in ref[2]:
        _same_nan_pattern_and_values(got[2][key], ref[2][key], key, tol)
    for key in ref[3]:
        _same_nan_pattern_and_values(got[3][key], ref[3][key], key, tol)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_filtered_bn_running_stats_take_nan_as_torch_batch_norm(bad, layout):
    """As torch.nn.BatchNorm2d: a NaN (Inf) in a channel makes that channel's running mean NaN
    (Inf) and running variance NaN; the other channels are updated normally."""
    x = _randn(4, 3, 5, 5, seed=8)
    x[2, 1, 3, 3] = float(bad)
    x = x.float().contiguous(memory_format=LAYOUTS[layout])
    torch_bn, ours = torch.nn.BatchNorm2d(3), normlab.FilteredBatchNorm2d(3, threshold=1e30)
    torch_bn(x), ours(x)
    for name in ("running_mean", "running_var"):
        a, b = getattr(ours, name), getattr(torch_bn, name)
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), name
        torch.testing.assert_close(a[[0, 2]], b[[0, 2]])
    filtered = normlab.FilteredBatchNorm2d(3)
    filtered(x)
    assert torch.equal(filtered.running_var.isnan(), torch_bn.running_var.isnan())
    assert torch.equal(filtered.running_mean.isnan(), torch_bn.running_mean.isnan())
