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
from normlab.kernels import cpu

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


def test_gradcheck_fused_paths():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 3, 1, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 3, 1, generator=gen, dtype=torch.float64, requires_grad=True)
    assert K.selected_path(x, w, b, (0, 2)) == "cpu"
    torch.autograd.gradcheck(
        lambda x, w, b: K.normalize_affine(x, w, b, (0, 2), threshold=1.5)[0], (x, w, b))
    tau = torch.randn(1, 3, 1, generator=gen, dtype=torch.float64, requires_grad=True)
    epsx = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda x, w, b, t, e: K.normalize_affine_act(
            x, w, b, (2,), activation="tlu", tau=t, centered=False, eps_extra=e)[0],
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
        assert sum(s for s in sizes if s < x.numel()) <= 6 * 8 * 16 + 4 * 16, sizes


def test_dispatch_rules():
    x = torch.randn(4, 3, 5)
    w = torch.randn(1, 3, 1)
    assert K.selected_path(x, w, None, (0, 2)) == "cpu"
    assert K.selected_path(x.double(), w, None, (0, 2)) == "reference"  # dtype mismatch
    assert K.selected_path(x.half(), None, None, (0, 2)) == "reference"
    assert K.selected_path(x.transpose(0, 2), None, None, (0, 2)) == "reference"
    assert K.selected_path(x, None, None, (0, 1)) == "reference"  # not a fused layout
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
