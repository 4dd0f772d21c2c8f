"""The eager CPU call (normlab.kernels.eager): the C kernels without the op dispatcher.

In plain eager mode the dispatcher skips ``normlab::normalize`` (its dispatch costs more
than the kernels on small layers) and the batch-norm kernel updates the running averages
itself. It must give what the op gives — outputs and gradients bit for bit, running
statistics to float rounding — and step aside whenever something watches the call: a
dispatch or function mode, the profiler, torch.compile, torch.func, legacy vmap.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import normlab
from normlab.kernels import cpu, eager
from normlab.nn.activation import NormActivation, TLU

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no fused CPU kernels")


class _Watch(TorchFunctionMode):
    """A do-nothing function mode: its presence sends the dispatcher through the op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def eager_calls(monkeypatch):
    """One entry per eager call, in order: whether its kernel updated the running averages
    (``None``: the call did not return)."""
    updated = []
    real = eager.normalize

    def spy(*args):
        updated.append(None)  # entered; a checkpoint's recomputation may stop inside the call
        i = len(updated) - 1
        out = real(*args)
        updated[i] = out[2]
        return out

    monkeypatch.setattr(eager, "normalize", spy)
    return updated


MODULES = {
    "fbn2d": lambda: normlab.FilteredBatchNorm2d(5, threshold=1.5),
    "fbn1d": lambda: normlab.FilteredBatchNorm1d(5, threshold=1.5),
    "fbn+relu": lambda: NormActivation(normlab.FilteredBatchNorm2d(5, threshold=1.5),
                                       nn.ReLU()),
    "fbn+tlu": lambda: NormActivation(normlab.FilteredBatchNorm2d(5, threshold=2.0), TLU(5)),
    "brn": lambda: normlab.BatchRenorm2d(5, threshold=2.0),
    "fbn-momentum-none": lambda: normlab.FilteredBatchNorm2d(5, momentum=None),
    "fgn": lambda: normlab.FilteredGroupNorm(5, 5, threshold=1.5),
    "frn": lambda: normlab.FilterResponseNorm2d(5, learnable_eps=True),
}


def _input(name: str, dtype, channels_last: bool = False, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (16, 5) if name == "fbn1d" else (4, 5, 6, 6)
    x = torch.randn(shape, generator=g, dtype=dtype) * 2 + 1
    x.view(-1)[7] = 1e4  # an outlier the filter drops
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def _module(name: str, dtype) -> nn.Module:
    torch.manual_seed(0)
    m = MODULES[name]().to(dtype).train()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


def _steps(module, name, dtype, channels_last, watch):
    """Three training steps; outputs, input and parameter gradients per step."""
    out = []
    for seed in range(3):
        x = _input(name, dtype, channels_last, seed)
        g = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(9 + seed))
        if watch:
            with _Watch():
                y = module(x)
        else:
            y = module(x)
        y.backward(g)
        out.append((y.detach(), x.grad, {k: p.grad.clone() for k, p in
                                         module.named_parameters()}))
        module.zero_grad()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("name,channels_last", [
    *((name, False) for name in sorted(MODULES)),
    *((name, True) for name in sorted(MODULES) if name != "fbn1d"),  # 2-D input: one layout
])
def test_eager_call_equals_the_op(name, dtype, channels_last, eager_calls):
    direct, through_op = _module(name, dtype), _module(name, dtype)
    got = _steps(direct, name, dtype, channels_last, watch=False)
    # the kernel updates float32/float64 running buffers; bfloat16 ones, and layers without
    # running averages (filtered GN, FRN), are left to the dispatcher
    kernel_updates = name not in ("fgn", "frn") and dtype != torch.bfloat16
    assert eager_calls == [kernel_updates] * 3, "the eager call did not run as expected"
    want = _steps(through_op, name, dtype, channels_last, watch=True)
    assert len(eager_calls) == 3, "a function mode must send the call through the op"
    for (y, gx, gp), (y2, gx2, gp2) in zip(got, want):
        assert torch.equal(y, y2)
        assert torch.equal(gx, gx2)
        for k in gp:
            assert torch.equal(gp[k], gp2[k]), k
    # running averages: the kernel updates them in double, the op path by a float lerp
    for (k, a), b in zip(direct.state_dict().items(), through_op.state_dict().values()):
        # (bfloat16 buffers: updated from the statistics on both paths, so equal)
        tol = {torch.int64: 0, torch.float32: 2e-7, torch.float64: 1e-15, torch.bfloat16: 0}[
            a.dtype]
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=k)


def test_kernel_updates_the_running_averages_and_bumps_their_version(eager_calls):
    m = normlab.FilteredBatchNorm2d(5, threshold=1.5, momentum=0.25)
    x = _input("fbn2d", torch.float32).detach()
    versions = m.running_mean._version, m.running_var._version
    with torch.no_grad():
        _, stats = normlab.kernels.normalize(
            x, m.weight, m.bias, normlab.kernels.NormSpec(normlab.kernels.Reduction.CHANNEL,
                                                           1.5))
    mean, var, count = stats
    m(x)
    expect_mean = 0.75 * torch.zeros(5) + 0.25 * mean
    expect_var = 0.75 * torch.ones(5) + 0.25 * var * count / (count - 1)
    torch.testing.assert_close(m.running_mean, expect_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m.running_var, expect_var, rtol=1e-6, atol=1e-7)
    assert m.running_mean._version > versions[0] and m.running_var._version > versions[1]
    assert eager_calls == [False, True]  # the statistics alone; then the layer, by the kernel


def test_buffers_the_kernel_cannot_take_are_updated_from_the_statistics(eager_calls):
    """bfloat16 buffers next to float32 statistics: updated as on the op path."""
    m = normlab.FilteredBatchNorm2d(5, threshold=1.5)
    m.running_mean = m.running_mean.bfloat16()
    m.running_var = m.running_var.bfloat16()
    ref = copy.deepcopy(m)
    x = _input("fbn2d", torch.float32).detach()
    m(x)
    with _Watch():
        ref(x)
    assert torch.equal(m.running_mean, ref.running_mean)
    assert torch.equal(m.running_var, ref.running_var)
    assert m.running_mean.abs().sum() > 0
    assert eager_calls == [False]  # the eager call ran and left the buffers to the dispatcher


@pytest.mark.parametrize("name", ["fbn+relu", "frn"])
def test_double_backward_through_the_eager_call(name):
    m = _module(name, torch.float64)
    x = _input(name, torch.float64)
    x.data.view(-1)[7] = 3.0  # keep the sets stable under gradcheck's perturbation
    params = tuple(m.parameters())

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(dict(m.named_parameters()), ps)), (x,))

    assert type(f(x, *params).grad_fn).__name__ == "_EagerNormalizeBackward"
    torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)
    torch.autograd.gradgradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_watchers_see_the_op():
    """A dispatch mode and the profiler see ``normlab::normalize`` and its backward."""
    m = NormActivation(normlab.FilteredBatchNorm2d(5), nn.ReLU())
    x = _input("fbn2d", torch.float32)
    log = _OpLog()
    with log:
        m(x).sum().backward()
    assert "normlab.normalize.default" in log.ops
    assert "normlab.normalize_backward.default" in log.ops
    with torch.profiler.profile() as prof:
        m(x).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert "normlab::normalize" in names and "normlab::normalize_backward" in names


def test_inference_mode_and_no_grad_update_the_running_averages_like_the_op():
    a, b = normlab.FilteredBatchNorm2d(5), normlab.FilteredBatchNorm2d(5)
    x = _input("fbn2d", torch.float32).detach()
    with torch.inference_mode():
        ya = a(x)
    with torch.no_grad(), _Watch():
        yb = b(x)
    assert torch.equal(ya, yb)
    assert a.num_batches_tracked == b.num_batches_tracked == 1
    assert a.running_mean.abs().sum() > 0  # moved from its initial zeros
    torch.testing.assert_close(a.running_mean, b.running_mean, rtol=2e-7, atol=1e-9)
    torch.testing.assert_close(a.running_var, b.running_var, rtol=2e-7, atol=0)


def test_activation_checkpointing_through_the_eager_call(eager_calls):
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 5, 3), NormActivation(normlab.FilteredBatchNorm2d(5),
                                                             nn.ReLU()))
    ref = copy.deepcopy(block)
    x = torch.randn(4, 3, 8, 8)
    y = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    y.square().sum().backward()
    ref(x).square().sum().backward()
    for p, q in zip(block.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    # the checkpointed forward; its recomputation, which checkpoint stops once the tensors
    # backward needs are saved (inside the call); the reference
    assert eager_calls == [True, None, True]


@pytest.mark.parametrize("name", ["fbn+relu", "brn", "frn"])
def test_bfloat16_input_through_a_float32_module(name, eager_calls):
    """Mixed precision: bfloat16 activations, float32 parameters and running buffers (which
    the kernel updates, in its float32 arithmetic) — equal to the op path."""
    direct, through_op = _module(name, torch.float32), _module(name, torch.float32)
    for seed in range(2):
        x = _input(name, torch.bfloat16, seed=seed)
        y = direct(x)
        with _Watch():
            y2 = through_op(x)
        assert y.dtype == torch.bfloat16 and torch.equal(y, y2)
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).bfloat16()
        gx = torch.autograd.grad(y, [x, *direct.parameters()], g)
        gx2 = torch.autograd.grad(y2, [x, *through_op.parameters()], g)
        for a, b in zip(gx, gx2):
            assert torch.equal(a, b)
    for (k, a), b in zip(direct.state_dict().items(), through_op.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=2e-7, atol=0, msg=k)
    assert eager_calls == [name != "frn"] * 2  # float32 buffers: updated by the kernel
