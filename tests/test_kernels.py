"""Fused CPU kernels (normlab.kernels.cpu) against the analytic reference and autograd.

Each case runs the same inputs through the reference Function (which is itself tested
against autograd through normlab.functional) and through the dispatcher, then compares
outputs, statistics and every gradient; float64 cases also pass gradcheck.
"""

from __future__ import annotations

import pytest
import torch

import normlab
from normlab import functional as F
from normlab import kernels as K
from normlab.kernels import cpu, layout
from normlab.nn.batch import flat_view

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"no fused CPU kernels: {cpu.build_error()}")


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def _run_both(x, params, dims, activation="none", **kw):
    """Reference vs fused: returns (outputs, stats, grads) for both paths."""
    results = []
    for path in ("reference", "fused"):
        xx = _leaf(x)
        w, b, tau, kappa, epsx = (_leaf(p) for p in params)
        if path == "reference":
            with K.use_backend("reference"):
                y, st = K.normalize_affine_act(xx, w, b, dims, activation=activation, tau=tau,
                                               kappa=kappa, eps_extra=epsx, **kw)
        else:
            assert K.selected_path(xx, w, b, dims) == "cpu"
            y, st = K.normalize_affine_act(xx, w, b, dims, activation=activation, tau=tau,
                                           kappa=kappa, eps_extra=epsx, **kw)
        gen = torch.Generator().manual_seed(7)
        y.backward(torch.randn(y.shape, generator=gen, dtype=y.dtype))
        grads = [xx.grad] + [p.grad if p is not None else None for p in (w, b, tau, kappa, epsx)]
        results.append((y.detach(), [s.reshape(-1) for s in st], grads))
    return results


def _assert_same(results, atol):
    (y1, s1, g1), (y2, s2, g2) = results
    torch.testing.assert_close(y2, y1, atol=atol, rtol=atol)
    for a, b in zip(s1, s2):
        torch.testing.assert_close(b, a, atol=atol, rtol=atol)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, atol=atol * 10, rtol=atol * 10)


def _data(shape, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=dtype) * 1.5 + 0.7
    x.view(-1)[:: max(1, x.numel() // 5)] += 9.0  # outliers the filter must drop
    return x


@pytest.mark.parametrize("threshold", [None, 2.0, 0.05])
@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("gaussian_consistent", [False, True])
def test_batch_layout_matches_reference(threshold, centered, gaussian_consistent):
    x = _data((6, 4, 15))
    w, b = torch.randn(1, 4, 1, dtype=x.dtype), torch.randn(1, 4, 1, dtype=x.dtype)
    res = _run_both(x, (w, b, None, None, None), (0, 2), threshold=threshold, centered=centered,
                    gaussian_consistent=gaussian_consistent)
    _assert_same(res, 1e-10)


def test_keep_nothing_falls_back_to_plain_moments():
    # T = 0.05 with spread-out values keeps nothing in some sets: kept count = all values
    x = torch.linspace(-3, 3, 60, dtype=torch.float64).reshape(2, 2, 15)
    y, st = K.normalize_affine(x, None, None, (0, 2), threshold=1e-3)
    plain = F.moments(x, (0, 2))
    torch.testing.assert_close(st.count.reshape(-1), torch.full((2,), 30.0, dtype=x.dtype))
    torch.testing.assert_close(st.var, plain.var)


@pytest.mark.parametrize("activation", ["none", "tlu", "affine_tlu", "relu"])
@pytest.mark.parametrize("threshold", [None, 1.5])
def test_rows_layout_with_activation_matches_reference(activation, threshold):
    x = _data((3, 2, 3, 10))  # (N, G, C/G, L): GFRN / GN view
    shape = (1, 2, 3, 1)
    gen = torch.Generator().manual_seed(3)
    w, b = torch.randn(shape, generator=gen, dtype=x.dtype), torch.randn(shape, generator=gen, dtype=x.dtype)
    tau = torch.randn(shape, generator=gen, dtype=x.dtype) * 0.3
    kappa = torch.rand(shape, generator=gen, dtype=x.dtype) * 0.5
    epsx = torch.tensor(1e-3, dtype=x.dtype)
    for centered in (True, False):
        res = _run_both(x, (w, b, tau, kappa, epsx), (2, 3), activation=activation,
                        threshold=threshold, centered=centered, eps=1e-6)
        _assert_same(res, 1e-10)


def test_layer_norm_layout_elementwise_affine():
    x = _data((5, 12))
    w, b = torch.randn(1, 12, dtype=x.dtype), torch.randn(1, 12, dtype=x.dtype)
    _assert_same(_run_both(x, (w, b, None, None, None), (1,), threshold=2.0), 1e-10)


def test_float32_close_to_reference():
    x = _data((8, 6, 40), dtype=torch.float32)
    w, b = torch.randn(1, 6, 1), torch.randn(1, 6, 1)
    _assert_same(_run_both(x, (w, b, None, None, None), (0, 2), threshold=2.0), 2e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_fused_paths(channels_last):
    """float64 gradcheck of the fused CPU kernels: filtered BN, and FRN + TLU with learned ε
    (with and without the filter), on contiguous and channels_last (NHWC-strided) views."""
    gen = torch.Generator().manual_seed(5)
    if channels_last:  # (N, C, L) = (3, 5, 4), strides (20, 1, 5)
        x = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64).permute(0, 2, 1)
    else:
        x = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
    x = x.detach().requires_grad_()
    w, b, tau = (torch.randn(1, 5, 1, generator=gen, dtype=torch.float64, requires_grad=True)
                 for _ in range(3))
    epsx = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    assert K.selected_path(x, w, b, (0, 2)) == "cpu"
    torch.autograd.gradcheck(
        lambda x, w, b: K.normalize_affine(x, w, b, (0, 2), threshold=1.5)[0], (x, w, b))
    for threshold in (None, 1.5):
        torch.autograd.gradcheck(
            lambda x, w, b, t, e: K.normalize_affine_act(
                x, w, b, (2,), activation="tlu", tau=t, centered=False, eps_extra=e,
                threshold=threshold)[0],
            (x, w, b, tau, epsx))


def test_modules_take_fused_path_and_match_reference():
    torch.manual_seed(0)
    x = _data((4, 8, 5, 5), dtype=torch.float32)
    for make in (lambda: normlab.FilteredBatchNorm2d(8), lambda: normlab.FilteredGroupNorm(2, 8),
                 lambda: normlab.FilterResponseNorm2d(8, learnable_eps=True)):
        outs = []
        for backend in ("reference", "auto"):
            torch.manual_seed(1)
            m = make()
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn_like(p) * 0.2)
            xx = x.clone().requires_grad_()
            with K.use_backend(backend):
                y = m(xx)
                y.square().sum().backward()
            outs.append((y.detach(), xx.grad, [p.grad for p in m.parameters()],
                         [bf.clone() for bf in m.buffers()]))
        (y1, g1, p1, b1), (y2, g2, p2, b2) = outs
        torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g2, g1, atol=1e-4, rtol=1e-4)
        for a, c in zip(p1 + b1, p2 + b2):
            torch.testing.assert_close(c, a, atol=1e-4, rtol=1e-4)


def test_backward_saves_one_input_sized_tensor():
    """Memory rule of issue 6: x plus per-channel statistics only (no mask, no x̂, no z)."""
    x = torch.randn(8, 16, 6, 6, requires_grad=True)
    for m in (normlab.FilteredBatchNorm2d(16), normlab.FilteredGroupNorm(4, 16),
              normlab.FilterResponseNorm2d(16)):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x)
        big = [s for s in sizes if s >= x.numel()]
        assert len(big) == 1, (type(m).__name__, sizes)
        # per set at most 8 statistics (the CPU kernels' (NSTATS, sets) block), plus γ, β, τ, ε
        assert sum(s for s in sizes if s < x.numel()) <= 8 * 8 * 16 + 4 * 16, sizes


def test_dispatch_rules():
    x = torch.randn(4, 3, 5)
    w = torch.randn(1, 3, 1)
    assert K.selected_path(x, w, None, (0, 2)) == "cpu"
    # parameters of another floating dtype are converted to the kernel dtype
    assert K.selected_path(x.double(), w, None, (0, 2)) == "cpu"
    assert K.selected_path(x.half(), None, None, (0, 2)) == "cpu"  # half storage, float32 math
    assert K.selected_path(x.bfloat16(), w, None, (0, 2)) == "cpu"  # float32 γ with half x
    assert K.selected_path(x, w.long(), None, (0, 2)) == "reference"  # integer γ
    # strided views are copied to contiguous for the CPU kernels
    assert K.selected_path(x.transpose(0, 2), None, None, (0, 2)) == "cpu"
    assert K.selected_path(x, None, None, (0, 1)) == "reference"  # not a fused layout
    assert K.selected_path(x.to(torch.int32), None, None, (0, 2)) == "reference"
    with K.use_backend("reference"):
        assert K.selected_path(x, w, None, (0, 2)) == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        K.set_backend("fast")
    with pytest.raises(ValueError, match="activation must be one of"):
        K.normalize_affine_act(x, None, None, (0, 2), activation="gelu")
    with pytest.raises(ValueError, match="needs tau"):
        K.normalize_affine_act(x, None, None, (2,), activation="tlu")


def test_eval_filtered_bn_is_native_batch_norm():
    m = normlab.FilteredBatchNorm2d(4).eval()
    ref = torch.nn.BatchNorm2d(4).eval()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(m(x), ref(x))


# ---- channels_last (NHWC) and half precision on the fused CPU path -----------------------

def _nhwc(shape_ncl, dtype=torch.float64, seed=0):
    """(N, C, L) data stored channels_last: strides (L·C, 1, C), with planted outliers."""
    n, c, l = shape_ncl
    x = _data((n, l, c), dtype=dtype, seed=seed).permute(0, 2, 1)
    assert x.stride() == (l * c, 1, c)
    return x


def _params(shape, dtype=torch.float64, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=dtype),
            torch.randn(shape, generator=gen, dtype=dtype))


@pytest.mark.parametrize("shape", [(3, 5, 7), (6, 4, 15), (2, 16, 9)])
@pytest.mark.parametrize("threshold", [None, 2.0])
@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("gaussian_consistent", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_channels_last_batch_layout_matches_reference(shape, threshold, centered,
                                                      gaussian_consistent, affine):
    x = _nhwc(shape)
    w, b = _params((1, shape[1], 1)) if affine else (None, None)
    res = _run_both(x, (w, b, None, None, None), (0, 2), threshold=threshold, centered=centered,
                    gaussian_consistent=gaussian_consistent)
    _assert_same(res, 1e-10)
    y, _, grads = res[1]
    assert y.stride() == x.stride() and grads[0].stride() == x.stride()


def test_channels_last_batch_layout_keep_nothing():
    # evenly spaced values: T = 1e-3 keeps nothing in any channel, so all values are kept
    x = torch.linspace(-3, 3, 2 * 15 * 4, dtype=torch.float64).reshape(2, 15, 4).permute(0, 2, 1)
    w, b = _params((1, 4, 1))
    res = _run_both(x, (w, b, None, None, None), (0, 2), threshold=1e-3)
    _assert_same(res, 1e-10)
    torch.testing.assert_close(res[1][1][2], torch.full((4,), 30.0, dtype=x.dtype))
    # channel 1 is ±1 (every |z| = 1 > T: keeps nothing), the others keep some values
    x = _nhwc((4, 3, 10))
    x[:, 1] = torch.tensor([1.0, -1.0], dtype=x.dtype).repeat(20).reshape(4, 10)
    res = _run_both(x, (w[:, :3], b[:, :3], None, None, None), (0, 2), threshold=0.5)
    _assert_same(res, 1e-10)
    count = res[1][1][2]
    assert count[1] == 40 and 0 < count[0] < 40 and 0 < count[2] < 40


@pytest.mark.parametrize("activation", ["none", "tlu", "affine_tlu", "relu"])
@pytest.mark.parametrize("threshold", [None, 1.5])
def test_channels_last_rows_layout_matches_reference(activation, threshold):
    n, g, cg, hw = 3, 2, 3, 10  # GN / GFRN view (N, G, C/G, HW) of an NHWC tensor
    x = _data((n, hw, g * cg)).permute(0, 2, 1).reshape(n, g, cg, hw)
    assert x.stride() == (hw * g * cg, cg, 1, g * cg)
    shape = (1, g, cg, 1)
    w, b = _params(shape)
    gen = torch.Generator().manual_seed(4)
    tau = torch.randn(shape, generator=gen, dtype=x.dtype) * 0.3
    kappa = torch.rand(shape, generator=gen, dtype=x.dtype) * 0.5
    epsx = torch.tensor(1e-3, dtype=x.dtype)
    for centered in (True, False):
        res = _run_both(x, (w, b, tau, kappa, epsx), (2, 3), activation=activation,
                        threshold=threshold, centered=centered, eps=1e-6)
        _assert_same(res, 1e-10)
        assert res[1][0].stride() == x.stride() and res[1][2][0].stride() == x.stride()


@pytest.mark.parametrize("threshold", [None, 2.0, 1e-3])
def test_channels_last_instance_and_group_without_affine(threshold):
    # no parameters: the plan is widened to (N, C, 1, L) / (N, G, Cg, L) to read NHWC
    x = _nhwc((3, 5, 7))
    _assert_same(_run_both(x, (None, None, None, None, None), (2,), threshold=threshold), 1e-10)
    xg = _data((2, 9, 6)).permute(0, 2, 1).reshape(2, 3, 2, 9)
    _assert_same(_run_both(xg, (None, None, None, None, None), (2, 3), threshold=threshold),
                 1e-10)


def test_strided_views_are_copied_for_the_fused_path():
    """Views with gaps or channel slices are neither contiguous nor channels_last: the
    dispatcher copies them to contiguous for the C kernels, which refuse them directly."""
    x = _nhwc((3, 4, 10))
    assert K.selected_path(x, None, None, (0, 2)) == "cpu"
    for view in (x[:, :, ::2], x[:, :3]):
        assert layout.plan(view, (), (0, 2)).layout == "strided"
        assert K.selected_path(view, None, None, (0, 2)) == "cpu"
        _assert_same(_run_both(view, (None, None, None, None, None), (0, 2), threshold=2.0),
                     1e-10)
    with pytest.raises(ValueError, match="contiguous or channels_last"):
        pl = layout.plan(x[:, :, ::2], (), (0, 2))
        cpu.forward(x[:, :, ::2], None, None, None, None, None, pl, 2.0, True, 1e-5, False, 0)


def test_float32_channels_last_close_to_reference():
    x = _nhwc((8, 6, 40), dtype=torch.float32)
    w, b = _params((1, 6, 1), dtype=torch.float32)
    _assert_same(_run_both(x, (w, b, None, None, None), (0, 2), threshold=2.0), 2e-5)
    xr = x.reshape(8, 2, 3, 40)
    w, b = _params((1, 2, 3, 1), dtype=torch.float32)
    _assert_same(_run_both(xr, (w, b, None, None, None), (2, 3), threshold=2.0), 2e-5)


# fp16: 2^-11 relative rounding, bf16: 2^-8; both paths compute in float32 and round once
HALF_TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("param_dtype", ["float32", "half"])
def test_half_precision_matches_reference(dtype, channels_last, param_dtype):
    pdt = torch.float32 if param_dtype == "float32" else dtype
    x = _nhwc((4, 6, 9), dtype=torch.float32) if channels_last else _data((4, 6, 9), torch.float32)
    x = x.to(dtype)
    assert x.is_contiguous() != channels_last
    w, b = _params((1, 6, 1), dtype=pdt)
    for threshold in (None, 2.0):
        res = _run_both(x, (w, b, None, None, None), (0, 2), threshold=threshold)
        _assert_same(res, HALF_TOL[dtype])
        y, stats, grads = res[1]
        assert y.dtype == dtype and grads[0].dtype == dtype and y.stride() == x.stride()
        assert grads[1].dtype == pdt and stats[0].dtype == torch.float32
    # rows family: FRN + TLU with learned ε on the same data viewed (N, C, 1, L)
    xr = x.unsqueeze(2)
    w, b = _params((1, 6, 1, 1), dtype=pdt)
    tau = torch.full((1, 6, 1, 1), -0.2, dtype=pdt)
    epsx = torch.tensor(1e-3)
    res = _run_both(xr, (w, b, tau, None, epsx), (2, 3), activation="tlu", centered=False)
    _assert_same(res, HALF_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_precision_group_rows_match_reference(dtype, channels_last):
    """GN-shaped rows (Cg > 1) in half precision, filtered, with the affine TLU."""
    n, g, cg, hw = 3, 2, 4, 10
    if channels_last:
        x = _data((n, hw, g * cg), torch.float32).to(dtype).permute(0, 2, 1).reshape(n, g, cg, hw)
    else:
        x = _data((n, g, cg, hw), torch.float32).to(dtype)
    shape = (1, g, cg, 1)
    w, b = _params(shape, dtype=torch.float32)
    tau = torch.full(shape, -0.3, dtype=dtype)  # (float32 τ, κ would promote the reference's y)
    kappa = torch.full(shape, 0.25, dtype=dtype)
    res = _run_both(x, (w, b, tau, kappa, None), (2, 3), activation="affine_tlu", threshold=2.0)
    _assert_same(res, HALF_TOL[dtype])
    y, _, grads = res[1]
    assert y.dtype == dtype and y.stride() == x.stride() and grads[0].stride() == x.stride()


def test_bf16_conversions_match_torch():
    """The kernels' bfloat16 loads and stores equal torch's conversions bit for bit: every
    16-bit pattern loaded, and float32 values stored with round-to-nearest-even (random bit
    patterns, exact ties, overflow to inf, inf, NaN — NaN only as some NaN)."""
    h = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31, (h.numel(),), generator=gen, dtype=torch.int64)
    f = bits.to(torch.int32).view(torch.float32).clone()
    finite = h[h.float().isfinite()].float().unique()
    ties = (finite[:20000] + finite[1:20001]) / 2  # halfway between neighbours: round to even
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.4e38,
                            3.3961e38, 1e-45, -1e-40, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8])
    nan_payloads = torch.tensor([0x7FFFFFFF, 0x7F80FFFF, 0x7FFF8000, -1], dtype=torch.int64)
    extra = torch.cat([ties, special, nan_payloads.to(torch.int32).view(torch.float32)])
    f[: extra.numel()] = extra
    hf, fh = cpu.bf16_convert(h, f)
    want_hf, want_fh = h.float(), f.to(torch.bfloat16)
    assert torch.equal(hf.isnan(), want_hf.isnan()) and torch.equal(fh.isnan(), want_fh.isnan())
    ok = ~want_hf.isnan()
    assert torch.equal(hf[ok].view(torch.int32), want_hf[ok].view(torch.int32))
    ok = ~want_fh.isnan()
    assert torch.equal(fh[ok].view(torch.int16), want_fh[ok].view(torch.int16))


def _traced_step(monkeypatch, m, x, grad):
    """Forward + backward of m under the kernel-call trace and torch's memory profiler:
    returns the trace [(kernel, x address, ∂ℓ/∂y address)] and the largest per-op allocation."""
    from torch.profiler import ProfilerActivity, profile

    trace = []
    monkeypatch.setattr(cpu, "_trace", trace)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        m(x).backward(grad)
    monkeypatch.setattr(cpu, "_trace", None)
    return trace, max(e.cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_path_reads_and_writes_half_without_float_copy(monkeypatch, channels_last):
    """bf16 x goes to the bf16 kernels as is (the kernel's x pointer is x's own storage, and
    ∂ℓ/∂y's when it is in x's layout), and no float32 tensor of x's size is allocated in
    forward or backward (torch's profiler, per-op CPU allocations)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, 16, 8, 8).to(torch.bfloat16).contiguous(memory_format=fmt)
    x.requires_grad_()
    grad = torch.randn(x.shape).to(torch.bfloat16).contiguous(memory_format=fmt)
    for m in (normlab.FilteredBatchNorm2d(16).to(torch.bfloat16),
              normlab.FilteredGroupNorm(4, 16), normlab.FilterResponseNorm2d(16)):
        trace, biggest = _traced_step(monkeypatch, m, x, grad)
        names = [name for name, _, _ in trace]
        assert len(names) == 2 and all(n.endswith("_bf16") for n in names), names
        assert names[0].startswith(("bnc_", "rowc_") if channels_last else ("bn_", "row_"))
        assert all(xp == x.data_ptr() for _, xp, _ in trace)
        assert trace[1][2] == grad.data_ptr()
        assert 0 < biggest < 4 * x.numel(), (type(m).__name__, biggest)
        x.grad = None
    # ∂ℓ/∂y in the other layout: one copy into x's layout, in bfloat16
    other = grad.contiguous(memory_format=torch.contiguous_format if channels_last
                            else torch.channels_last)
    trace, biggest = _traced_step(monkeypatch, normlab.FilteredBatchNorm2d(16), x, other)
    assert trace[1][2] != other.data_ptr() and biggest < 4 * x.numel()
    ref = x.detach().float().requires_grad_()
    with K.use_backend("reference"):
        normlab.FilteredBatchNorm2d(16)(ref).backward(other.float())
    torch.testing.assert_close(x.grad.float(), ref.grad, atol=0.2, rtol=0.2)
    assert x.grad.dtype == torch.bfloat16 and x.grad.stride() == x.stride()


@pytest.mark.parametrize("channels_last", [False, True])
def test_float16_takes_the_upcast_path(monkeypatch, channels_last):
    """float16 has no in-kernel conversion: x and ∂ℓ/∂y are copied to float32 for the float32
    kernels and y / ∂ℓ/∂x cast back, in x's layout (accuracy: test_half_precision_*)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, 16, 8, 8).half().contiguous(memory_format=fmt).requires_grad_()
    grad = torch.randn(x.shape).half().contiguous(memory_format=fmt)
    trace, biggest = _traced_step(monkeypatch, normlab.FilteredBatchNorm2d(16).half(), x, grad)
    assert [n[-4:] for n, _, _ in trace] == ["_f32", "_f32"]
    assert all(xp != x.data_ptr() for _, xp, _ in trace) and biggest >= 4 * x.numel()
    assert x.grad.dtype == torch.float16 and x.grad.stride() == x.stride()


def test_module_filtered_bn_channels_last():
    torch.manual_seed(0)
    c = 5
    x = (torch.randn(3, c, 4, 7) * 2 + 1).to(memory_format=torch.channels_last)
    x[0, :, 0, 0] += 12.0  # outliers
    grad = torch.randn(x.shape).to(memory_format=torch.channels_last)
    m = normlab.FilteredBatchNorm2d(c)
    assert K.selected_path(flat_view(x), m.weight.view(1, c, 1), None, (0, 2)) == "cpu"
    xx = x.clone().requires_grad_()
    y = m(xx)
    y.backward(grad)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert xx.grad.is_contiguous(memory_format=torch.channels_last)
    ref = normlab.FilteredBatchNorm2d(c)
    xr = x.contiguous().requires_grad_()
    with K.use_backend("reference"):
        yr = ref(xr)
    yr.backward(grad.contiguous())
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xx.grad, xr.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.running_var, ref.running_var, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("threshold", [None, 1e6])
def test_module_bn_channels_last_equals_torch_batch_norm(threshold):
    # threshold=None is torch's own call; 1e6 keeps every value, through the fused kernels
    torch.manual_seed(1)
    c = 6
    m = normlab.FilteredBatchNorm2d(c, threshold=threshold)
    ref = torch.nn.BatchNorm2d(c)
    ref.load_state_dict(m.state_dict())
    for step in range(3):
        x = (torch.randn(4, c, 5, 3) * 3 + step).to(memory_format=torch.channels_last)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = m(xa), ref(xb)
        assert ya.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-4, rtol=1e-4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(m, name), getattr(ref, name), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(m.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-4)
    m.eval(), ref.eval()
    x = torch.randn(2, c, 5, 3).to(memory_format=torch.channels_last)
    torch.testing.assert_close(m(x), ref(x))


def test_modules_channels_last_take_fused_path_and_keep_format():
    torch.manual_seed(0)
    x = _data((4, 8, 5, 5), dtype=torch.float32).to(memory_format=torch.channels_last)
    for make in (lambda: normlab.FilteredGroupNorm(2, 8),
                 lambda: normlab.FilterResponseNorm2d(8, learnable_eps=True)):
        outs = []
        for backend, fmt in (("reference", torch.contiguous_format), ("auto", torch.channels_last)):
            torch.manual_seed(1)
            m = make()
            xx = x.clone(memory_format=fmt).requires_grad_()
            with K.use_backend(backend):
                y = m(xx)
                y.square().sum().backward()
            outs.append((y.detach(), xx.grad, [p.grad for p in m.parameters()]))
        (y1, g1, p1), (y2, g2, p2) = outs
        assert y2.is_contiguous(memory_format=torch.channels_last)
        assert g2.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g2, g1, atol=1e-4, rtol=1e-4)
        for a, c in zip(p1, p2):
            torch.testing.assert_close(c, a, atol=1e-4, rtol=1e-4)


def test_half_backward_saves_only_the_half_input():
    x = torch.randn(8, 16, 6, 6).to(torch.bfloat16).requires_grad_()
    m = normlab.FilteredBatchNorm2d(16)
    saved = []

    def pack(t):
        saved.append((t.numel(), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x)
    assert [d for n, d in saved if n >= x.numel()] == [torch.bfloat16]


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_threaded_kernels_match_reference(monkeypatch, threads, dtype):
    """Small inputs run on one thread; force the threaded passes (uneven splits, N < threads)."""
    monkeypatch.setattr(cpu, "PARALLEL_MIN_NUMEL", 0)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    tol = HALF_TOL.get(dtype, 1e-10)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = _nhwc((3, 5, 7)).to(dtype)
        w, b = _params((1, 5, 1), dtype=pdt)
        for xx in (x, x.contiguous()):
            _assert_same(_run_both(xx, (w, b, None, None, None), (0, 2), threshold=2.0), tol)
        xr = _data((2, 10, 6)).permute(0, 2, 1).reshape(2, 3, 2, 10).to(dtype)  # N = 2 samples
        w, b = _params((1, 3, 2, 1), dtype=pdt)
        tau = torch.full((1, 3, 2, 1), -0.1, dtype=xr.dtype)
        for xx in (xr, xr.contiguous()):
            _assert_same(_run_both(xx, (w, b, tau, None, None), (2, 3), activation="tlu",
                                   threshold=2.0), tol)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype,channels_last,momentum", [
    (torch.float32, False, 0.1), (torch.float32, True, 0.1), (torch.float64, False, None),
    (torch.bfloat16, False, 0.1), (torch.float32, True, None)])
def test_running_stats_from_the_fused_path_equal_the_reference(dtype, channels_last,
                                                                 momentum):
    """Batch-norm running averages updated from the fused op's statistics equal the
    reference path's update — mean, variance unbiased over the kept count, cumulative and
    momentum averages — over several steps, for filtered BN and batch renorm."""
    for make in (lambda: normlab.FilteredBatchNorm2d(5, momentum=momentum, threshold=1.5),
                 lambda: normlab.BatchRenorm2d(5, momentum=momentum or 0.1, threshold=2.0)):
        modules = [make().to(torch.float64 if dtype == torch.float64 else torch.float32)
                   for _ in range(2)]
        for step in range(3):
            x = _data((6, 5, 4, 3), dtype=torch.float64, seed=step).to(dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            assert K.selected_path(x.reshape(6, 5, -1), None, None, (0, 2)) == "cpu"
            with K.use_backend("reference"):
                modules[0](x)
            modules[1](x)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            a, b = getattr(modules[0], name), getattr(modules[1], name)
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
