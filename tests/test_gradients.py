"""Exact gradients: gradcheck in float64 for every module, and the analytic backward against
autograd through the functional core (which includes the outliers' contribution that the
[HA20]'s printed eq. 9-13 leave out)."""

import pytest
import torch
from torch.autograd import gradcheck

import normlab
from normlab import functional as F
from normlab.kernels import normalize_affine


def planted(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    flat = x.view(x.shape[0], x.shape[1], -1)
    flat[0, 0, 0] = 9.0
    flat[-1, -1, -1] = -7.0
    return x


def randomize_params(module):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
        if getattr(module, "running_var", None) is not None:
            module.running_mean.uniform_(-0.5, 0.5, generator=g)
            module.running_var.uniform_(0.5, 2.0, generator=g)
    return module


MODULES = {
    "fbn1d": (lambda: normlab.FilteredBatchNorm1d(3, threshold=1.5), (6, 3)),
    "fbn2d": (lambda: normlab.FilteredBatchNorm2d(3, threshold=1.5), (4, 3, 3, 3)),
    "fbn2d_consistent": (lambda: normlab.FilteredBatchNorm2d(
        3, threshold=1.5, gaussian_consistent=True), (4, 3, 3, 3)),
    "fbn3d": (lambda: normlab.FilteredBatchNorm3d(2, threshold=1.5), (3, 2, 2, 2, 2)),
    "bn_plain": (lambda: normlab.FilteredBatchNorm2d(3, threshold=None), (4, 3, 2, 2)),
    "brn": (lambda: normlab.BatchRenorm2d(3, renorm_start=0, r_max_full_at=0, d_max_full_at=0,
                                          threshold=2.0), (4, 3, 2, 2)),
    "fgn": (lambda: normlab.FilteredGroupNorm(2, 4, threshold=1.5), (2, 4, 3, 3)),
    "fln": (lambda: normlab.FilteredLayerNorm((3, 4), threshold=1.5), (2, 5, 3, 4)),
    "fin": (lambda: normlab.FilteredInstanceNorm2d(3, threshold=1.5, affine=True,
                                                   track_running_stats=True), (2, 3, 4, 4)),
    "frn": (lambda: normlab.FilterResponseNorm2d(3), (2, 3, 3, 3)),
    "frn_learned_eps_affine_tlu": (lambda: normlab.FilterResponseNorm2d(
        3, learnable_eps=True, activation="affine_tlu"), (2, 3, 3, 3)),
    "frn1d_fc": (lambda: normlab.FilterResponseNorm1d(4, learnable_eps=True), (5, 4)),
    "ffrn": (lambda: normlab.FilterResponseNorm2d(3, threshold=1.5), (2, 3, 3, 3)),
    "gfrn": (lambda: normlab.GroupFilterResponseNorm(2, 4, threshold=2.0), (2, 4, 2, 2)),
    "lfrn": (lambda: normlab.LayerFilterResponseNorm(4, activation="none"), (2, 4, 2, 2)),
    "tlu": (lambda: normlab.TLU(3), (2, 3, 4)),
    "affine_tlu": (lambda: normlab.AffineTLU(3), (2, 3, 4)),
}


def functional_module(name, mode="train"):
    """``(fn, inputs)``: module ``name`` (random parameters, planted outliers) as a pure
    function of (input, *parameters) — each call sees fresh copies of the running stats."""
    make, shape = MODULES[name]
    module = randomize_params(make().double())
    if name.startswith("tlu") or name.startswith("affine_tlu"):
        with torch.no_grad():  # keep inputs away from the kink at y = tau
            for p in module.parameters():
                p.uniform_(-0.3, 0.3)
    if name == "brn":
        # r and d are constants for the gradient (Ioffe 2017), so the true derivative matches
        # only where both are clipped: put the running stats far away
        with torch.no_grad():
            module.running_mean.fill_(1000.0), module.running_var.fill_(1e4)
    module.train(mode == "train")
    x = planted(shape).requires_grad_()
    names = [n for n, _ in module.named_parameters()]
    params = [p for _, p in module.named_parameters()]
    buffers = dict(module.named_buffers())

    def fn(inp, *ps):
        state = {**dict(zip(names, ps)), **{k: v.clone() for k, v in buffers.items()}}
        return torch.func.functional_call(module, state, (inp,))

    return fn, (x, *params)


@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradcheck_every_module(name, mode):
    fn, inputs = functional_module(name, mode)
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


CASES = [
    # (view shape, dims, param shape, centered, threshold, gaussian_consistent)
    ((6, 3, 5), (0, 2), (1, 3, 1), True, 2.0, False),
    ((6, 3, 5), (0, 2), (1, 3, 1), True, 1.0, True),
    ((2, 2, 3, 4), (2, 3), (1, 2, 3, 1), True, 1.5, False),
    ((2, 3, 1, 9), (2, 3), (1, 3, 1, 1), False, 2.0, False),
    ((2, 3, 1, 9), (2, 3), (1, 3, 1, 1), False, None, False),
    ((4, 7), (1,), (1, 7), True, 1.2, False),
]


@pytest.mark.parametrize("case", CASES)
def test_analytic_backward_equals_autograd_through_functional_core(case):
    shape, dims, pshape, centered, threshold, consistent = case
    x = planted(shape, seed=2).requires_grad_()
    w = (torch.rand(pshape, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(pshape, dtype=torch.float64).requires_grad_()
    eps_extra = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    y, stats = normalize_affine(x, w, b, dims, threshold=threshold, centered=centered, eps=1e-5,
                                eps_extra=eps_extra, gaussian_consistent=consistent)
    eps_total = 1e-5 + eps_extra
    xhat, ref_stats = F.normalized_moments_reference(
        x, dims, threshold=threshold, centered=centered, eps=eps_total,
        gaussian_consistent=consistent)
    expect = xhat * w + b
    torch.testing.assert_close(y, expect, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.var, ref_stats.var.detach())
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b, eps_extra), gy)
    ref = torch.autograd.grad(expect, (x, w, b, eps_extra), gy)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-11)


def test_outliers_contribute_to_parameter_gradients_unlike_printed_eq_12_13():
    """Eq. 8 normalizes all values, so dβ = Σ over all values of ∂ℓ/∂y (not only kept ones)."""
    m = normlab.FilteredBatchNorm1d(1, threshold=2.0).double()
    x = torch.cat([torch.randn(63, 1, dtype=torch.float64), torch.tensor([[50.0]], dtype=torch.float64)])
    y = m(x)
    gy = torch.ones_like(y)
    (gb,) = torch.autograd.grad(y, m.bias, gy)
    assert gb.item() == pytest.approx(64.0)  # eq. 12 as printed would give 63


def test_frn_input_gradient_is_eq_7_projection():
    """[SK20] eq. 7: ∂ℓ/∂x = r (I − x̂x̂ᵀ/N) ∂ℓ/∂x̂ per sample and channel (ε is constant)."""
    m = normlab.FilterResponseNorm2d(2, activation="none", eps=1e-6).double()
    x = planted((1, 2, 3, 3)).requires_grad_()
    gy = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    (gx,) = torch.autograd.grad(m(x), x, gy)
    for c in range(2):
        v = x[0, c].detach().reshape(-1)
        n = v.numel()
        r = 1.0 / torch.sqrt((v ** 2).mean() + 1e-6)
        xhat = v * r
        expect = r * (torch.eye(n, dtype=torch.float64) - torch.outer(xhat, xhat) / n) @ gy[0, c].reshape(-1)
        torch.testing.assert_close(gx[0, c].reshape(-1), expect, rtol=1e-10, atol=1e-12)


def test_tlu_threshold_collects_suppressed_gradient_eq_5():
    m = normlab.FilterResponseNorm2d(2).double()
    with torch.no_grad():
        m.tau.copy_(torch.tensor([0.3, -0.2]))
    x = planted((2, 2, 3, 3))
    z = m(x)
    gz = torch.randn_like(z)
    (gtau,) = torch.autograd.grad(z, m.tau, gz)
    with torch.no_grad():
        y = normlab.FilterResponseNorm2d(2, activation="none").double()(x)
    below = y < m.tau.view(1, -1, 1, 1)
    torch.testing.assert_close(gtau, (gz * below).sum((0, 2, 3)))


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_gradgradcheck_every_module(name, backend):
    """Gradients of gradients (create_graph=True: gradient penalties, meta-learning) are exact
    on every path: the Functions hand over to a differentiable composite of the functional
    core. (Before, the reference path's backward treated μ and σ as constants there.)"""
    from normlab.kernels import use_backend

    fn, inputs = functional_module(name)
    with use_backend(backend):
        assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4,
                                            fast_mode=True)


def test_gradient_penalty_matches_the_functional_core():
    """∂/∂θ ‖∂ℓ/∂x‖² through filtered BN equals the same through plain autograd of
    normlab.functional (an independent graph), for x and γ (β does not enter ∂ℓ/∂x)."""
    x = planted((6, 3, 4, 4)).requires_grad_()
    module = randomize_params(normlab.FilteredBatchNorm2d(3, threshold=1.5).double())
    gy = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def penalty(y, inputs):
        (gx,) = torch.autograd.grad((y * gy).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), inputs)

    got = penalty(module(x), (x, module.weight))
    xv = x.reshape(6, 3, -1)
    stats = F.filtered_moments(xv, (0, 2), 1.5, eps=module.eps)
    ref = (F.normalize(xv, stats, module.eps) * module.weight.view(1, 3, 1)
           + module.bias.view(1, 3, 1)).reshape(x.shape)
    expect = penalty(ref, (x, module.weight))
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
