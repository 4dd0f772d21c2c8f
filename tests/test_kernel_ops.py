"""The kernel core: NormSpec, the custom ops (schema, fake, autograd, vmap), the first-use
check and ``normlab selftest``."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.autograd import gradcheck

import normlab
from normlab import kernels as K
from normlab.cli import main
from normlab.kernels import analytic, check, cpu, ops
from normlab.kernels.layout import canonical_view
from normlab.kernels.spec import Activation, NormSpec, Reduction

from test_gradients import MODULES, functional_module

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"no fused CPU kernels: {cpu.build_error()}")


# -------------------------------------------------------------------------- NormSpec
def test_spec_has_one_no_filter_and_checks_its_values():
    assert NormSpec(Reduction.CHANNEL, threshold=None) == NormSpec(Reduction.CHANNEL)
    assert NormSpec(Reduction.CHANNEL).threshold == math.inf
    assert not NormSpec(Reduction.ROWS).filtered and NormSpec(Reduction.ROWS, 2).filtered
    assert NormSpec(Reduction.ROWS, 2).optional_threshold == 2.0
    assert NormSpec(Reduction.ROWS).optional_threshold is None
    assert NormSpec(Reduction.ROWS, activation="tlu").activation is Activation.TLU
    assert NormSpec(Reduction.ROWS, 2.0, gaussian_consistent=True).variance_factor == \
        pytest.approx(normlab.functional.truncated_normal_variance_factor(2.0))
    with pytest.raises(ValueError, match="threshold must be > 0"):
        NormSpec(Reduction.CHANNEL, threshold=0)
    with pytest.raises(ValueError, match="threshold must be > 0"):
        NormSpec(Reduction.CHANNEL, threshold=math.nan)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        NormSpec(Reduction.CHANNEL, eps=-1)
    with pytest.raises(ValueError, match="activation must be one of"):
        NormSpec(Reduction.ROWS, activation="gelu")
    with pytest.raises(TypeError, match="reduction must be a Reduction"):
        NormSpec("channel")
    with pytest.raises(AttributeError):
        NormSpec(Reduction.ROWS).eps = 1.0  # frozen
    spec = NormSpec(Reduction.ROWS, 1.5, False, 1e-6, True, Activation.AFFINE_TLU)
    assert ops.spec_of(*ops.spec_args(spec)) == spec


# -------------------------------------------------------------------------- the ops
def _op_inputs(reduction, dtype=torch.float64, channels_last=False, seed=0):
    """``x`` as ``(N, C, H, W)`` (rows: 2 groups of 3 channels) and (C,) parameters."""
    g = torch.Generator().manual_seed(seed)
    shape = (5, 3, 3, 4) if reduction is Reduction.CHANNEL else (3, 6, 2, 4)
    x = torch.randn(shape, generator=g, dtype=dtype) * 1.3 + 0.4
    x.view(-1)[::13] += 6.0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    p = x.shape[1]
    w, b, tau, kappa = (torch.randn(p, generator=g, dtype=dtype) * 0.3 + c
                        for c in (1.0, 0.0, 0.0, 0.1))
    return x, w, b, tau, kappa


OP_CASES = [
    (NormSpec(Reduction.CHANNEL, threshold=1.5), False),
    (NormSpec(Reduction.CHANNEL, gaussian_consistent=True, threshold=1.0), True),
    (NormSpec(Reduction.ROWS, threshold=1.5, groups=2), False),
    (NormSpec(Reduction.ROWS, centered=False, eps=1e-6, activation=Activation.TLU, groups=6),
     True),
    (NormSpec(Reduction.ROWS, 2.0, False, 1e-6, False, Activation.AFFINE_TLU, 2), True),
    (NormSpec(Reduction.ROWS, activation=Activation.RELU, groups=3), False),
    # batch norm with the activation fused into the C kernels (NormActivation hands it over)
    (NormSpec(Reduction.CHANNEL, threshold=1.5, activation=Activation.RELU), False),
    (NormSpec(Reduction.CHANNEL, threshold=1.5, activation=Activation.RELU), True),
    (NormSpec(Reduction.CHANNEL, activation=Activation.TLU), False),
    (NormSpec(Reduction.CHANNEL, 2.0, False, 1e-6, False, Activation.AFFINE_TLU), True),
]


def _op_args(spec, x, w, b, tau, kappa, eps_extra=None):
    tau = tau if spec.activation in (Activation.TLU, Activation.AFFINE_TLU) else None
    kappa = kappa if spec.activation is Activation.AFFINE_TLU else None
    return (x, w, b, eps_extra, tau, kappa, *ops.spec_args(spec))


@pytest.mark.parametrize("spec,channels_last", OP_CASES)
def test_opcheck_schema_fake_autograd_and_aot(spec, channels_last):
    """torch.library.opcheck: schema, fake (meta) implementation, registered autograd and
    AOT dispatch with dynamic shapes agree with the real kernels."""
    x, w, b, tau, kappa = _op_inputs(spec.reduction, torch.float32, channels_last)
    eps_extra = torch.tensor(1e-3) if not spec.centered else None
    args = _op_args(spec, x.requires_grad_(), w.requires_grad_(), b, tau, kappa, eps_extra)
    torch.library.opcheck(torch.ops.normlab.normalize.default, args)
    z, stats = torch.ops.normlab.normalize.default(*args)
    # the backward op is never differentiated (create_graph=True takes the composite)
    params = [None if t is None else t.detach() for t in args[1:6]]
    bargs = (x.detach(), torch.randn_like(z), *params, stats, *args[6:], True)
    torch.library.opcheck(torch.ops.normlab.normalize_backward.default, bargs)


@pytest.mark.parametrize("spec,channels_last", OP_CASES)
def test_fused_ops_equal_their_torch_implementation(spec, channels_last):
    """The C kernels compute exactly the ops' contract (analytic.canonical_forward/backward)."""
    x, w, b, tau, kappa = _op_inputs(spec.reduction, torch.float64, channels_last)
    args = _op_args(spec, x, w, b, tau, kappa, torch.tensor(2e-3, dtype=torch.float64))
    z, stats = torch.ops.normlab.normalize.default(*args)
    assert z.stride() == x.stride()
    xv = canonical_view(x, ops.plan_of(x, spec))  # (N, C, L) or (N, G, C/G, L)
    ez, estats = analytic.canonical_forward(xv, *args[1:6], spec)
    torch.testing.assert_close(z, ez.reshape(x.shape), rtol=1e-12, atol=1e-12)
    assert stats.shape == (cpu.STATS_ROWS, estats.shape[1])  # rows 6-7: the C kernels' own
    torch.testing.assert_close(stats[:6], estats, rtol=1e-12, atol=1e-12)
    gz = torch.randn_like(x)
    got = torch.ops.normlab.normalize_backward.default(x, gz, *args[1:6], stats, *args[6:], True)
    want = analytic.canonical_backward(xv, gz.reshape(xv.shape), *args[1:6], estats, spec, True)
    want = (want[0].reshape(x.shape), *want[1:])
    rows = {Activation.TLU: 3, Activation.AFFINE_TLU: 4}.get(spec.activation, 2)
    for a, e in zip(got, [want[0], want[1][:rows], want[2]]):  # sums of τ, κ: when given
        torch.testing.assert_close(a[:rows] if a.dim() == 2 else a, e, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("spec,channels_last", OP_CASES)
def test_vmap_of_the_ops_equals_a_loop(spec, channels_last):
    """torch.func.vmap over the forward op (batched x and parameters) and over the backward
    op (batched ∂ℓ/∂z, as jacobian(vectorize=True) does) equals one call per element."""
    xs, ws = zip(*[_op_inputs(spec.reduction, torch.float64, channels_last, seed)[:2]
                   for seed in range(3)])
    x, w = torch.stack(xs), torch.stack(ws)
    _, _, b, tau, kappa = _op_inputs(spec.reduction)
    fwd = torch.ops.normlab.normalize.default

    def call(xi, wi):
        return fwd(*_op_args(spec, xi, wi, b, tau, kappa))

    z, stats = torch.func.vmap(call)(x, w)
    for i in range(3):
        zi, si = call(x[i], w[i])
        torch.testing.assert_close(z[i], zi, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats[i], si, rtol=1e-12, atol=1e-12)
    _, si = call(x[0], w[0])
    gz = torch.randn(3, *x.shape[1:], dtype=x.dtype)
    bwd = torch.ops.normlab.normalize_backward.default
    args = _op_args(spec, x[0], w[0], b, tau, kappa)

    def grad_of(g):
        return bwd(x[0], g, *args[1:6], si, *args[6:], True)

    batched = torch.func.vmap(grad_of)(gz)
    for i in range(3):
        for a, e in zip(batched, grad_of(gz[i])):
            torch.testing.assert_close(a[i], e, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_batched_gradients_and_vectorized_jacobian_every_module(name, mode):
    """Issue 16: gradcheck(check_batched_grad=True) and jacobian(vectorize=True) failed on the
    fused CPU path ("Cannot access data pointer of Tensor that doesn't have storage")."""
    fn, inputs = functional_module(name, mode)
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, check_batched_grad=True)
    vectorized = torch.autograd.functional.jacobian(fn, inputs, vectorize=True)
    looped = torch.autograd.functional.jacobian(fn, inputs)
    for a, b in zip(vectorized, looped):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", [
    lambda: normlab.FilteredBatchNorm2d(3, threshold=1.5, track_running_stats=False),
    lambda: normlab.FilteredGroupNorm(2, 4, threshold=1.5),
    lambda: normlab.FilterResponseNorm2d(4, learnable_eps=True),
])
def test_torch_func_vmap_and_per_sample_grads_over_modules(make):
    """vmap(module) over a stack of batches equals a loop; torch.func.grad composes."""
    module = make().double()
    c = 3 if isinstance(module, normlab.FilteredBatchNorm2d) else 4
    x = torch.randn(3, 5, c, 4, 4, dtype=torch.float64)
    got = torch.func.vmap(module)(x)
    torch.testing.assert_close(got, torch.stack([module(xi) for xi in x]))
    params = dict(module.named_parameters())

    def loss(p, xi):
        return torch.func.functional_call(module, p, (xi,)).square().sum()

    per_batch = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(3):
        expect = torch.autograd.grad(loss(params, x[i]), list(params.values()))
        for k, e in zip(params, expect):
            torch.testing.assert_close(per_batch[k][i], e)


def test_higher_derivatives_through_the_ops_are_the_composites():
    """create_graph=True hands over to the differentiable composite: gradgradcheck on the op
    itself (float64, fused CPU kernels for the first derivative)."""
    for spec, _ in OP_CASES[:5]:
        x, w, b, tau, kappa = _op_inputs(spec.reduction)
        leaves = [t.requires_grad_() for t in (x, w, b)]

        def fn(x, w, b, spec=spec, tau=tau, kappa=kappa):
            return torch.ops.normlab.normalize.default(*_op_args(spec, x, w, b, tau, kappa))[0]

        assert torch.autograd.gradgradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-4)


# -------------------------------------------------------------------- first-use check
@pytest.fixture
def verify_cpu(monkeypatch):
    """Treat the CPU like a device the kernels never ran on (as CUDA is)."""
    monkeypatch.setattr(check, "VERIFIED_DEVICES", {"cpu"})
    monkeypatch.setattr(check, "_verdicts", {})
    yield


def test_first_use_check_passes_correct_kernels_silently(verify_cpu):
    m = normlab.FilteredBatchNorm2d(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        m(torch.randn(6, 4, 5, 5))
    assert check._verdicts == {("cpu", "channel", torch.float32, "contiguous", "cpu"): True}
    assert K.selected_path(torch.randn(6, 4, 25), None, None, (0, 2)) == "cpu"


def test_first_use_check_falls_back_to_the_reference_and_warns_once(verify_cpu, monkeypatch):
    real = cpu.forward

    def broken(*args, **kw):  # a kernel that is wrong on this machine
        y, stats = real(*args, **kw)
        return y + 0.5, stats

    monkeypatch.setattr(cpu, "forward", broken)
    x = torch.randn(6, 4, 5, 5)
    m = normlab.FilteredGroupNorm(2, 4)
    with pytest.warns(RuntimeWarning, match="disagree with the reference.*normlab selftest"):
        y = m(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # once per key
        y2 = m(x)
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    with K.use_backend("reference"):
        expect = m(x)
    for got in (y, y2, compiled):
        torch.testing.assert_close(got, expect)
    assert K.selected_path(x.reshape(6, 2, 2, 25), None, None, (2, 3)) == "reference"


def test_first_use_check_runs_while_compiling(verify_cpu):
    """The check is a constant for dynamo: it runs on real tensors during tracing."""
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), normlab.FilterResponseNorm2d(4))
    torch.compile(m, backend="aot_eager", fullgraph=True)(torch.randn(2, 3, 4, 4))
    assert check._verdicts == {("cpu", "rows", torch.float32, "contiguous", "cpu"): True}


# ----------------------------------------------------------------------- selftest
def test_selftest_quick_passes_and_prints_the_table(capsys):
    assert main(["selftest", "--device", "cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "| cpu | fbn | float32 | contiguous |" in out
    assert "| cpu | ffrn+affine_tlu | bfloat16 | channels_last |" in out
    assert "40 of 40 checks passed" in out


def test_selftest_reports_a_wrong_kernel(capsys, monkeypatch):
    real = cpu.backward

    def wrong_gradient(*args, **kw):
        dx, sums, gxhat = real(*args, **kw)
        return (None if dx is None else dx * 1.01), sums, gxhat

    monkeypatch.setattr(cpu, "backward", wrong_gradient)
    assert main(["selftest", "--device", "cpu", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "0 of 40 checks passed" in out
