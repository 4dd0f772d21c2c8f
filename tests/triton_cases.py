"""The Triton kernels against the reference (:mod:`normlab.kernels.analytic`).

Runs where the Triton kernels can run: in Triton's CPU interpreter (``TRITON_INTERPRET=1``,
which must be set before triton is first imported — ``tests/test_kernels_triton.py`` runs
this module in its own pytest session, as CI does), or on a CUDA device::

    TRITON_INTERPRET=1 python -m pytest tests/triton_cases.py     # CPU, interpreter
    python -m pytest tests/triton_cases.py                         # a GPU machine

The module name does not start with ``test_``, so the main session does not collect it.
Shapes are tiny (the interpreter runs a program per grid cell in Python).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from normlab import kernels as K
from normlab.kernels import RunningStats, update_running_stats
from normlab.kernels import reference_normalize_affine as ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (CPU) or a CUDA device", allow_module_level=True)
TK = pytest.importorskip("normlab.kernels.triton_kernels")
if not TK.available():
    pytest.skip("triton is not installed", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"


def on_triton(x, weight, bias, dims, **kw):
    """The ``normlab::normalize_triton`` op through the dispatcher (what the modules call);
    on CPU tensors the backend "triton" runs it in Triton's interpreter."""
    with K.use_backend("triton"):
        return K.normalize_affine_act(x, weight, bias, dims, **kw)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed))


def activation(y, act, tau, kappa):
    """The activations by their definition, NaN kept: z = τ where y < τ, else y."""
    if act == "relu":
        return torch.relu(y)
    if act == "tlu":
        return torch.where(y < tau, tau.to(y.dtype), y)
    if act == "affine_tlu":
        h = kappa.to(y.dtype) * y + tau.to(y.dtype)
        return torch.where(y < h, h, y)
    return y


def leaf(t, dtype=None):
    if t is None:
        return None
    t = t if dtype is None else t.to(dtype)
    return t.detach().to(DEVICE).requires_grad_()


def run_both(x, params, dims, act="none", reference_dtype=torch.float32, seed=1, **kw):
    """Forward + backward through the reference (in ``reference_dtype``, on CPU) and through
    the Triton op; returns ([y, mean, var, count, grads...] for each, in float64)."""
    outs = []
    for path in ("reference", "triton"):
        xx = leaf(x, reference_dtype if path == "reference" else None)
        w, b, tau, kappa, epsx = (leaf(p, reference_dtype if path == "reference" else None)
                                  for p in params)
        if path == "reference":
            y, st = ref(xx, w, b, dims, eps_extra=epsx, **kw)
            y = activation(y, act, tau, kappa)
        else:
            y, st = on_triton(xx, w, b, dims, activation=act, tau=tau, kappa=kappa,
                              eps_extra=epsx, **kw)
            assert y.dtype == x.dtype and y.stride() == x.stride()
        g = torch.randn(y.shape, generator=gen(seed)).to(y.device)
        (y.to(g.dtype) * g).sum().backward()
        grads = [xx.grad] + [p.grad for p in (w, b, tau, kappa, epsx) if p is not None]
        outs.append([t.detach().double().cpu() for t in
                     [y] + [s.reshape(-1) for s in st] + grads])
    return outs


def max_rel(pairs):
    return max([((a - b).abs().max() / (1 + b.abs().max())).item()
                for a, b in pairs if b.numel()] + [0.0])


# ---- equality with the reference (float32 reference, tolerance per dtype) ---------------

def _cases():
    x = rnd(6, 5, 12) * 1.5 + 0.5
    x[0, 0, 0] = 20.0
    w, b = rnd(1, 5, 1, seed=1), rnd(1, 5, 1, seed=2)
    x4 = rnd(3, 4, 2, 10, seed=3)
    w4, b4 = rnd(1, 4, 2, 1, seed=4), rnd(1, 4, 2, 1, seed=5)
    t4, k4 = rnd(1, 4, 2, 1, seed=6) * 0.3, rnd(1, 4, 2, 1, seed=7).abs() * 0.4
    xcl = rnd(4, 3, 5, 6, seed=8).to(memory_format=torch.channels_last)
    p3 = [rnd(1, 3, 1, seed=9 + i) for i in range(2)]
    x2 = rnd(7, 9, 1, seed=11) * 2 + 1
    x2[3, 4, 0] = 30.0
    x40 = rnd(3, 40, 3, 5, seed=12).to(memory_format=torch.channels_last).reshape(3, 40, 1, 15)
    p40 = [rnd(1, 40, 1, 1, seed=13 + i) for i in range(3)]
    xg = rnd(2, 12, 4, 5, seed=16).to(memory_format=torch.channels_last).reshape(2, 3, 4, 20)
    pg = [rnd(1, 3, 4, 1, seed=17 + i) for i in range(2)]
    none = (None, None, None)
    c = [
        ("bn filtered", x, (w, b, *none), (0, 2), "none", {"threshold": 2.0}),
        ("bn gaussian-consistent keep-none", x, (w, b, *none), (0, 2), "none",
         {"threshold": 0.01, "gaussian_consistent": True}),
        ("bn uncentered", x, (None, b, *none), (0, 2), "none", {"centered": False}),
        ("gn filtered", x4, (w4, b4, *none), (2, 3), "none", {"threshold": 1.5}),
        ("frn tlu learned eps", x4, (w4, b4, t4, None, torch.tensor(1e-3)), (2, 3), "tlu",
         {"centered": False, "eps": 1e-6}),
        ("frn affine-tlu filtered", x4, (w4, b4, t4, k4, None), (2, 3), "affine_tlu",
         {"centered": False, "threshold": 1.5}),
        ("gn relu", x4, (w4, b4, *none), (2, 3), "relu", {}),
        ("ln rows", x4.reshape(6, 40), (rnd(1, 40, seed=20), *none, None), (1,), "none",
         {"threshold": 2.0}),
        ("bn channels_last", xcl.reshape(4, 3, 30), (*p3, *none), (0, 2), "none",
         {"threshold": 2.0}),
        ("frn channels_last", xcl.reshape(4, 3, 1, 30),
         (rnd(1, 3, 1, 1, seed=21), rnd(1, 3, 1, 1, seed=22), rnd(1, 3, 1, 1, seed=23), None,
          None), (2, 3), "tlu", {"centered": False}),
        ("bn float16", (x * 0.5).half(), (w.half(), b.half(), *none), (0, 2), "none",
         {"threshold": 2.0}),
        ("gn bfloat16", x4.bfloat16(), (w4.bfloat16(), b4.bfloat16(), *none), (2, 3), "none",
         {"threshold": 2.0}),
        # autocast/AMP: half activations, float32 parameters
        ("bn float16 params float32", (x * 0.5).half(), (w, b, *none), (0, 2), "none",
         {"threshold": 2.0}),
        ("frn bfloat16 params float32", x4.bfloat16(), (w4, b4, t4, None, None), (2, 3),
         "tlu", {"centered": False}),
        ("bn (N, C)", x2, (rnd(1, 9, 1, seed=24), *none, None), (0, 2), "none",
         {"threshold": 1.5}),
        # one-channel rows on channels_last (FRN, IN): several rows per program; 40 channels
        # = two row blocks, the second partial
        ("gn filtered channels_last (tiles along the group's channels)", xg, (*pg, *none),
         (2, 3), "none", {"threshold": 1.5}),
        ("frn affine-tlu learned eps channels_last 40", x40,
         (p40[0], p40[1], p40[2] * 0.3, p40[2].abs() * 0.4, torch.tensor(1e-3)), (2, 3),
         "affine_tlu", {"centered": False, "eps": 1e-6}),
        ("in filtered channels_last 40", x40, (p40[0], p40[1], *none), (2, 3), "none",
         {"threshold": 1.5}),
        ("in bfloat16 channels_last 40", x40.bfloat16(), (p40[0], p40[1], *none), (2, 3),
         "none", {"threshold": 2.0}),
    ]
    return {name: rest for name, *rest in c}


CASES = _cases()
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    x, params, dims, act, kw = CASES[name]
    outs = run_both(x, params, dims, act, **kw)
    assert max_rel(zip(outs[1], outs[0])) < TOLERANCE[x.dtype]


@pytest.mark.parametrize("name,split", [
    ("bn filtered", "7"), ("bn gaussian-consistent keep-none", "3"), ("bn uncentered", "3"),
    ("bn channels_last", "3"), ("bn (N, C)", "3")])
def test_bn_split_over_programs(name, split, monkeypatch):
    """A channel's reduction split over several programs (uneven chunks) merges exactly."""
    monkeypatch.setenv("NORMLAB_TRITON_BN_SPLIT", split)
    x, params, dims, act, kw = CASES[name]
    if name == "bn uncentered":
        params = (None, params[1], None, None, torch.tensor(1e-2))
    outs = run_both(x, params, dims, act, **kw)
    assert max_rel(zip(outs[1], outs[0])) < 2e-5


@pytest.mark.parametrize("name,dtype,kw", [
    ("filtered split 3", torch.float32, {"threshold": 2.0}),
    ("channels_last", torch.float32, {}),
    ("float16", torch.float16, {"threshold": 2.0}),
])
def test_bn_running_stats_in_kernel(name, dtype, kw, monkeypatch):
    """The running averages the kernel updates equal the reference update."""
    monkeypatch.setenv("NORMLAB_TRITON_BN_SPLIT", "3")
    x = rnd(6, 5, 12) * 1.5 + 0.5
    if name == "channels_last":
        x = rnd(4, 3, 5, 6).to(memory_format=torch.channels_last).reshape(4, 3, 30)
    x = x.to(dtype).to(DEVICE)
    c = x.shape[1]
    fused = RunningStats(torch.linspace(-1, 1, c, device=DEVICE),
                         torch.linspace(0.5, 2, c, device=DEVICE), 0.3)
    expect = RunningStats(fused.mean.clone().cpu(), fused.var.clone().cpu(), 0.3)
    _, st = ref(x.float().cpu(), None, None, (0, 2), **kw)
    update_running_stats(expect, st)
    on_triton(x, None, None, (0, 2), running=fused, **kw)
    assert max_rel(zip([t.cpu().double() for t in fused[:2]],
                       [t.double() for t in expect[:2]])) < 1e-6


@pytest.mark.parametrize("name", ["bn filtered", "frn tlu"])
def test_double_backward(name):
    """create_graph=True: first and second derivatives through the Triton op."""
    if name == "bn filtered":
        inputs = (rnd(6, 5, 12) * 1.5 + 0.5, rnd(1, 5, 1, seed=1), rnd(1, 5, 1, seed=2))
        fns = (lambda x, w, b: ref(x, w, b, (0, 2), threshold=2.0)[0],
               lambda x, w, b: on_triton(x, w, b, (0, 2), threshold=2.0)[0])
    else:
        inputs = (rnd(3, 4, 2, 10), rnd(1, 4, 2, 1, seed=1), rnd(1, 4, 2, 1, seed=2) * 0.3)
        fns = (lambda x, w, t: activation(ref(x, w, None, (2, 3), centered=False)[0], "tlu",
                                          t, None),
               lambda x, w, t: on_triton(
                   x, w, None, (2, 3), activation="tlu", tau=t, centered=False)[0])
    outs = []
    for fn in fns:
        leaves = [leaf(t) for t in inputs]
        y = fn(*leaves)
        gy = torch.randn(y.shape, generator=gen(2)).to(DEVICE)
        first = torch.autograd.grad(y, leaves, gy, create_graph=True)
        total = sum((g * torch.randn(g.shape, generator=gen(3)).to(DEVICE)).sum()
                    for g in first)
        again = torch.autograd.grad(total, leaves, allow_unused=True)
        outs.append([g.detach().cpu() for g in first]
                    + [torch.zeros(()) if g is None else g.detach().cpu() for g in again])
    assert max_rel(zip(outs[1], outs[0])) < 2e-5


# ---- exact statistics: the float32/half kernels vs the reference in float64 -------------
# Inputs (Horváth & Al-afandi 2020's filtered BN, arXiv 2010.08251; issue 11's cases): a
# 1e6 outlier in a 4096-value BN channel, 1e4 in a 64-value IN row, 1e5 in a GN group,
# sets keeping one or two values, mean 1e6 (and 1e8) with a tiny spread, random planted
# outliers up to 1e6. The reference runs in float64 on the very same (rounded) values.

def _bn(x):  # (N, C, H, W) → the (N, C, L) view BN modules reduce over (0, 2)
    return x.reshape(x.shape[0], x.shape[1], -1), (0, 2), (1, x.shape[1], 1)


def _in(x):  # instance norm / FRN: rows of one channel, (N, C, 1, L)
    return x.reshape(x.shape[0], x.shape[1], 1, -1), (2, 3), (1, x.shape[1], 1, 1)


def _gn(x, groups):
    n, c = x.shape[:2]
    return x.reshape(n, groups, c // groups, -1), (2, 3), (1, groups, c // groups, 1)


def _ln(x):  # (P, D) over the last axis
    return x.reshape(x.shape[0], -1), (1,), (1, x[0].numel())


def _outlier(shape, value, where=(0, 0, 0, 0), seed=0):
    x = rnd(*shape, seed=seed)
    x[where] = value
    return x


def _channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)


def _planted(shape, seed):
    """N(0,1)·scale + shift per channel with ~1 % of values replaced by ±10^U(1, 6)."""
    g = gen(seed)
    x = torch.randn(*shape, generator=g) * torch.rand(1, shape[1], 1, 1, generator=g).add(0.1)
    x = x + torch.randn(1, shape[1], 1, 1, generator=g) * 3
    pick = torch.rand(*shape, generator=g) < 0.01
    mags = 10.0 ** (1 + 5 * torch.rand(*shape, generator=g))
    signs = torch.where(torch.rand(*shape, generator=g) < 0.5, -1.0, 1.0)
    return torch.where(pick, signs * mags, x)


def _exact_cases():
    big = torch.randn(16, 4, 8, 8, generator=gen(5)) * 0.01 + 1e6  # BN: 1024 per channel
    big_rows = big[:2]                                                # rows: 8 × 64 values
    huge = torch.randn(2, 4, 8, 8, generator=gen(6)) * 10 + 1e8
    c = {
        "fbn one 1e6 in a 4096-value channel": (_bn, _outlier((16, 4, 16, 16), 1e6), 2.0),
        "fbn one 1e6 in a 4096-value channel channels_last":
            (_bn, _channels_last(_outlier((16, 4, 16, 16), 1e6)), 2.0),
        "fin one 1e4 in a 64-value row": (_in, _outlier((2, 3, 8, 8), 1e4), 2.0),
        "fin one 1e4 in a 64-value row channels_last":
            (_in, _channels_last(_outlier((2, 3, 8, 8), 1e4)), 2.0),
        "fgn one 1e5": (lambda x: _gn(x, 4), _outlier((2, 8, 8, 8), 1e5), 2.0),
        "fbn tiny sets threshold 0.5 (3 values)": (_bn, rnd(3, 8, 1, 1, seed=1), 0.5),
        "fbn tiny sets threshold 0.5 (4 values)": (_bn, rnd(2, 8, 2, 1, seed=2), 0.5),
        "fin tiny rows threshold 0.5": (_in, rnd(2, 5, 1, 3, seed=3), 0.5),
        "bn mean 1e6 sd 0.01": (_bn, big, None),
        "fbn mean 1e6 sd 0.01": (_bn, big, 2.0),
        "fbn mean 1e6 sd 0.01 channels_last": (_bn, _channels_last(big), 2.0),
        "in mean 1e6 sd 0.01": (_in, big_rows, None),
        "fin mean 1e6 sd 0.01 channels_last": (_in, _channels_last(big_rows), 2.0),
        "fgn mean 1e6 sd 0.01": (lambda x: _gn(x, 2), big_rows, 2.0),
        "fln mean 1e6 sd 0.01": (_ln, big_rows, 2.0),
        "in mean 1e6 sd 1": (_in, torch.randn(2, 4, 8, 8, generator=gen(7)) + 1e6, None),
        "bn mean 1e8 sd 10": (_bn, huge, None),
        "fin mean 1e8 sd 10": (_in, huge, 2.0),
    }
    for seed in range(3):
        c[f"planted outliers fbn seed {seed}"] = (_bn, _planted((8, 4, 8, 8), seed), 2.0)
        c[f"planted outliers fbn channels_last seed {seed}"] = (
            _bn, _channels_last(_planted((8, 4, 8, 8), seed)), 2.0)
        c[f"planted outliers fgn seed {seed}"] = (lambda x: _gn(x, 2),
                                                  _planted((2, 8, 8, 8), seed), 2.0)
        c[f"planted outliers fin channels_last seed {seed}"] = (
            _in, _channels_last(_planted((2, 8, 8, 8), seed)), 2.0)
        c[f"planted outliers fln seed {seed}"] = (_ln, _planted((4, 4, 4, 4), seed), 2.0)
    return c


EXACT = _exact_cases()


def exact_errors(view, x, threshold, dtype=torch.float32):
    """Errors of the Triton path (``x`` in ``dtype``) against float64 on the same values:
    y and ∂ℓ/∂x on the non-outlier values (|x − median| < 100 per reduction set, relative to
    max(1, |value|)), the mean in units of the float64 standard deviation, the variance
    relative, the kept counts (must be equal) and, for batch norm, the running variance.
    The returned float32 mean may differ by its own rounding (half an ulp: 0.03 at 1e6);
    y and ∂ℓ/∂x must not — the kernels carry the mean as a pair."""
    xv, dims, pshape = view(x.to(dtype))
    xv64 = xv.double()
    w = (1 + 0.1 * rnd(*pshape, seed=30)).to(torch.float32)
    b = (0.1 * rnd(*pshape, seed=31)).to(torch.float32)
    bn = dims == (0, 2)
    kw = {"threshold": threshold}
    out = {}
    results = []
    for path in ("float64", "triton"):
        xx = (xv64 if path == "float64" else xv).detach().to(DEVICE).requires_grad_()
        ww, bb = (p.double() if path == "float64" else p for p in (w, b))
        ww, bb = ww.to(DEVICE), bb.to(DEVICE)
        run = None
        if bn:
            c = xv.shape[1]
            run = RunningStats(torch.zeros(c, dtype=ww.dtype, device=DEVICE),
                               torch.ones(c, dtype=ww.dtype, device=DEVICE), 0.5)
        if path == "float64":
            y, st = ref(xx, ww, bb, dims, **kw)
            if run is not None:
                update_running_stats(run, st)
        else:
            y, st = on_triton(xx, ww, bb, dims, running=run, **kw)
        g = torch.randn(y.shape, generator=gen(7)).to(device=DEVICE, dtype=y.dtype)
        (y * g).sum().backward()
        results.append((y.detach().double().cpu(), [s.double().cpu() for s in st],
                        xx.grad.double().cpu(), None if run is None else run.var.double().cpu()))
    (y64, st64, dx64, rv64), (yt, stt, dxt, rvt) = results
    dims_all = tuple(dims)
    center = xv64.cpu().median(dim=dims_all[-1], keepdim=True).values
    if len(dims_all) > 1:
        center = center.median(dim=dims_all[0], keepdim=True).values
    sel = (xv64.cpu() - center).abs() < 100

    def err(a, ref_):
        return ((a - ref_)[sel].abs().max() / ref_[sel].abs().max().clamp_min(1)).item()

    out["y"] = err(yt, y64)
    out["dx"] = err(dxt, dx64)
    sd = (st64[1] + 1e-5).sqrt()
    representable = st64[0].abs() * 2.0 ** -24  # a float32 mean is rounded by this much
    out["mean"] = (((stt[0] - st64[0]).abs() - representable).clamp_min(0) / sd).max().item()
    out["var"] = ((stt[1] - st64[1]).abs() / (st64[1] + 1e-5)).max().item()
    out["count"] = (stt[2] - st64[2]).abs().max().item()
    if rv64 is not None:
        out["running_var"] = ((rvt - rv64).abs() / rv64).max().item()
    return out


@pytest.mark.parametrize("name", list(EXACT))
def test_exact_statistics_float32(name):
    """Within 1e-5 of float64 on every adversarial case (issue 11)."""
    view, x, threshold = EXACT[name]
    e = exact_errors(view, x, threshold)
    assert e["count"] == 0, e
    assert max(e[k] for k in e if k not in ("count", "dx")) < 1e-5, e
    assert e["dx"] < 1e-4, e


HALF_ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["fbn one 1e6 in a 4096-value channel channels_last",
                                  "fin one 1e4 in a 64-value row channels_last",
                                  "planted outliers fgn seed 0"])
def test_exact_statistics_half(name, dtype):
    """Half inputs: float32 statistics within 1e-5 of float64 on the same half values; y
    within one rounding of the half output."""
    view, x, threshold = EXACT[name]
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    e = exact_errors(view, x, threshold, dtype)
    assert e["count"] == 0, e
    assert max(e["mean"], e["var"], e.get("running_var", 0)) < 1e-5, e
    assert e["y"] < HALF_ULP[dtype], e


# ---- NaN and Inf: torch's rule ----------------------------------------------------------

NAN_FAMILIES = {
    "bn": lambda: (_bn(rnd(4, 3, 2, 5)), "none"),
    "bn channels_last": lambda: (_bn(_channels_last(rnd(4, 3, 2, 5))), "none"),
    "gn relu": lambda: (_gn(rnd(3, 4, 2, 5), 2), "relu"),
    "gn tlu": lambda: (_gn(rnd(3, 4, 2, 5), 2), "tlu"),
    "in channels_last affine_tlu": lambda: (_in(_channels_last(rnd(3, 4, 2, 5))), "affine_tlu"),
    "frn channels_last tlu": lambda: (_in(_channels_last(rnd(3, 4, 2, 5))), "tlu"),
    "ln": lambda: (_ln(rnd(4, 3, 2, 5)), "none"),
}


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("threshold", [None, 2.0])
@pytest.mark.parametrize("family", list(NAN_FAMILIES))
def test_nan_and_inf_poison_their_set(family, threshold, bad):
    """A set holding NaN: NaN statistics, outputs and ∂ℓ/∂x on that set only (TLU, affine
    TLU and ReLU included), its count as the reference's; other sets unchanged; parameter
    gradients NaN exactly where the reference's are; running averages NaN for that channel
    only, as torch.nn.BatchNorm1d's. ±Inf: the reference's NaN/Inf pattern everywhere (its
    mean may be NaN or Inf: only non-finiteness is compared there)."""
    (xv, dims, pshape), act = NAN_FAMILIES[family]()
    xv = xv.clone()
    xv[(0,) * xv.dim()] = float("nan") if bad == "nan" else float("inf")
    uncentered = family.startswith("frn")
    w, b = 1 + 0.1 * rnd(*pshape, seed=1), 0.1 * rnd(*pshape, seed=2)
    tau = 0.1 * rnd(*pshape, seed=3) if act in ("tlu", "affine_tlu") else None
    kappa = 0.2 * rnd(*pshape, seed=4).abs() if act == "affine_tlu" else None
    kw = {"threshold": threshold, "centered": not uncentered}
    outs = run_both(xv, (w, b, tau, kappa, None), dims, act, **kw)
    for a, r in zip(outs[1], outs[0]):  # y, mean, var, count, every gradient
        if a is outs[1][1] and bad == "inf":  # the reference's mean of a set holding
            a, r = a.isfinite(), r.isfinite()  # ±Inf is NaN (Welford) or ±Inf (filtered)
        assert torch.equal(a.isnan(), r.isnan()) and torch.equal(a.isinf(), r.isinf())
    fine = [(a[r.isfinite()], r[r.isfinite()]) for a, r in zip(outs[1], outs[0])]
    assert max_rel(fine) < 2e-5
    if bad == "nan":  # the rule itself, not only the reference's word for it
        y, dx = outs[1][0], outs[1][4]
        bad_set = torch.zeros(xv.shape, dtype=torch.bool)
        bad_set[(slice(None), 0) if dims == (0, 2) else (0, 0) if len(dims) == 2 else 0] = True
        for t in (y, dx):
            assert t[bad_set].isnan().all() and t[~bad_set].isfinite().all()
    if dims == (0, 2):  # running averages, in the kernel
        c = xv.shape[1]
        run = RunningStats(torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE), 0.1)
        on_triton(xv.to(DEVICE), None, None, dims, running=run, **kw)
        bn = torch.nn.BatchNorm1d(c, momentum=0.1, device=DEVICE)
        bn(xv.to(DEVICE))
        assert torch.equal(run.mean.isfinite(), bn.running_mean.isfinite())
        assert torch.equal(run.var.isnan(), bn.running_var.isnan())


# ---- launches ---------------------------------------------------------------------------

def test_launches_go_through_wrap_triton_while_tracing(monkeypatch):
    """While torch traces the Triton op (make_fx here; dynamo and AOTAutograd the same way,
    through the op's dispatch-mode implementation) every kernel launch goes through
    torch.library.wrap_triton, so the launch is a graph node; in eager mode none does."""
    from torch.fx.experimental.proxy_tensor import make_fx

    wrapped = []

    class Recorded:  # wrap_triton's stand-in: records the kernel, launches nothing (fake x)
        def __init__(self, kernel):
            wrapped.append(kernel)

        def __getitem__(self, grid):
            return lambda **args: None

    launched = []
    real_launch = TK._launch

    def counting_launch(kernel, grid, num_warps, **args):
        launched.append(kernel)
        real_launch(kernel, grid, num_warps, **args)

    monkeypatch.setattr(TK, "_wrap_triton", Recorded)
    monkeypatch.setattr(TK, "_launch", counting_launch)
    for x, dims, act in ((rnd(2, 3, 4), (0, 2), "none"), (rnd(2, 3, 1, 4), (2, 3), "relu")):
        def forward(xx):  # used within this iteration only
            return on_triton(xx, None, None, dims, activation=act, threshold=2.0)[0]

        xx = leaf(x)
        forward(xx).sum().backward()  # eager: direct launches
        assert launched and wrapped == []
        launched.clear()
        make_fx(forward, tracing_mode="fake")(x.to(DEVICE))
        assert launched and wrapped == launched
        launched.clear()
        wrapped.clear()
