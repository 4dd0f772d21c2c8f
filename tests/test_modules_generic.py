"""PyTorch's generic module checks (its ``test_modules.py`` / ModuleInfo idea), for normlab.

Every normlab module class appears in ``CASES`` with constructor inputs and a forward input
shape — for the layers that extend a torch layer, the constructor inputs of torch's own
module input lists (``torch.testing._internal.common_modules``), once with
``threshold=None`` (torch's module is then the oracle, bit for bit) and once filtered.
Each test below is one generic check, run on every case:

forward vs oracle (outputs, gradients, buffers, train and eval), repr, pickling and
deepcopy, factory kwargs (``device=``/``dtype=``), the ``torch.device`` context at
construction, ``.to()``/``.to_empty()``, memory format, non-contiguous inputs, train/eval
differences, state-dict round trips (with torch both ways where an oracle exists, and into
a module built on the meta device with ``assign=True``), zero-size batches, gradcheck and
``jacobian(vectorize=True)`` in float64 on the reference and the fused paths, and
``torch.fx.symbolic_trace``.
"""

from __future__ import annotations

import copy
import io
import pickle
from dataclasses import dataclass
from functools import partial
from typing import Callable

import pytest
import torch
from torch import fx, nn
from torch.autograd import gradcheck
from torch.autograd.functional import jacobian

import normlab
from normlab import kernels
from normlab.distributed import SyncBatchRenorm, SyncFilteredBatchNorm


@dataclass(frozen=True)
class Case:
    """One module and its inputs. ``build(**factory)`` makes the module."""

    name: str
    build: Callable[..., nn.Module]
    shape: tuple[int, ...]
    oracle: Callable[..., nn.Module] | None = None  # torch's module, identical outputs
    differ: bool = False     # outputs differ between train and eval (running statistics)
    factory: bool = True     # takes device= / dtype=

    def __str__(self) -> str:
        return self.name


def _torch_cases(cls, torch_cls, entries, *, filtered_threshold=1.5, differ_rule=None):
    """Cases for a normlab class from torch's module-input entries ``(args, kwargs, shape)``."""
    out = []
    for args, kwargs, shape in entries:
        label = ",".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()])
        label = f"{cls.__name__}({label})x{list(shape)}"
        differ = differ_rule(args, kwargs) if differ_rule else False
        out.append(Case(f"{label}-plain", partial(cls, *args, **kwargs, threshold=None), shape,
                        oracle=partial(torch_cls, *args, **kwargs), differ=differ))
        out.append(Case(f"{label}-filtered",
                        partial(cls, *args, **kwargs, threshold=filtered_threshold), shape,
                        differ=differ))
    return out


def _bn_differ(args, kwargs):
    return len(args) < 5 or args[4]  # track_running_stats


BN_ENTRIES = {  # torch's module_inputs_torch_nn_BatchNorm{1,2,3}d (constructor, shape)
    1: [((10,), {}, (4, 10)), ((5,), {}, (4, 5, 3)), ((10, 1e-3, None), {}, (4, 10)),
        ((10, 1e-3, 0.3, False), {}, (4, 10)), ((10, 1e-3, 0.3, True, False), {}, (4, 10)),
        ((5, 1e-3, 0.3, False), {}, (4, 5, 3)), ((10,), {"bias": False}, (4, 10))],
    2: [((3,), {}, (2, 3, 6, 6)), ((3, 1e-3, None), {}, (2, 3, 6, 6)),
        ((3, 1e-3, 0.8), {}, (2, 3, 6, 6)), ((3, 1e-3, 0.8, False), {}, (2, 3, 6, 6)),
        ((3, 1e-3, 0.8, True, False), {}, (2, 3, 6, 6)), ((3,), {"bias": False}, (2, 3, 6, 6))],
    3: [((3,), {}, (2, 3, 4, 4, 4)), ((3, 1e-3, None), {}, (2, 3, 4, 4, 4)),
        ((3, 1e-3, 0.7, True, False), {}, (2, 3, 4, 4, 4)),
        ((3,), {"bias": False}, (2, 3, 4, 4, 4))],
}
GN_ENTRIES = [((3, 6, 1e-3), {}, (4, 6, 5)), ((3, 6, 1e-3), {"bias": False}, (4, 6, 5)),
              ((3, 12, 1e-3), {}, (4, 12)), ((1, 6, 1e-3), {}, (32, 6)),
              ((5, 5, 1e-3, False), {}, (4, 5, 5)), ((1, 10, 1e-3, False), {}, (4, 10)),
              ((3, 6, 1e-3), {}, (4, 6, 2, 3)), ((3, 9, 1e-3), {"bias": False}, (4, 9, 2, 3))]
LN_ENTRIES = [(([5], 1e-3), {}, (4, 5, 5)), (([5], 1e-3, False), {}, (4, 5, 5)),
              (([2, 2, 5], 1e-3), {}, (4, 2, 2, 5)),
              (([2, 2, 5], 1e-3), {"elementwise_affine": True, "bias": False}, (4, 2, 2, 5))]
IN_SHAPES = {1: (3, 15), 2: (3, 6, 6), 3: (3, 4, 4, 4)}


def _in_entries(n):
    no_batch = IN_SHAPES[n]
    batch = (4,) + no_batch
    return [((3, 1e-3, 0.3), {}, batch), ((3, 1e-3, 0.3, False, True), {}, batch),
            ((3, 1e-3, 0.3), {}, no_batch), ((3, 1e-3, 0.3, False, True), {}, no_batch),
            ((3, 1e-3, 0.3), {"affine": True}, batch),
            ((3, 1e-3, 0.3), {"affine": True, "bias": False}, batch)]


def _in_differ(args, kwargs):
    return len(args) >= 5 and args[4]


CASES: list[Case] = []
for _n, _cls, _tcls in ((1, normlab.FilteredBatchNorm1d, nn.BatchNorm1d),
                        (2, normlab.FilteredBatchNorm2d, nn.BatchNorm2d),
                        (3, normlab.FilteredBatchNorm3d, nn.BatchNorm3d)):
    CASES += _torch_cases(_cls, _tcls, BN_ENTRIES[_n], differ_rule=_bn_differ)
for _n, _cls, _tcls in ((1, normlab.FilteredInstanceNorm1d, nn.InstanceNorm1d),
                        (2, normlab.FilteredInstanceNorm2d, nn.InstanceNorm2d),
                        (3, normlab.FilteredInstanceNorm3d, nn.InstanceNorm3d)):
    CASES += _torch_cases(_cls, _tcls, _in_entries(_n), differ_rule=_in_differ)
CASES += _torch_cases(normlab.FilteredGroupNorm, nn.GroupNorm, GN_ENTRIES)
CASES += _torch_cases(normlab.FilteredLayerNorm, nn.LayerNorm, LN_ENTRIES)

_RENORM = {"renorm_start": 0, "r_max_full_at": 0, "d_max_full_at": 0, "r_max": 1.5,
           "d_max": 0.5}
CASES += [
    Case("BatchRenorm1d(5)", partial(normlab.BatchRenorm1d, 5, **_RENORM), (6, 5), differ=True),
    Case("BatchRenorm2d(3,threshold=1.5)", partial(normlab.BatchRenorm2d, 3, threshold=1.5,
                                                   **_RENORM), (2, 3, 5, 5), differ=True),
    Case("BatchRenorm3d(3,bias=False)", partial(normlab.BatchRenorm3d, 3, bias=False,
                                                **_RENORM), (2, 3, 3, 3, 3), differ=True),
    Case("SyncFilteredBatchNorm(3)", partial(SyncFilteredBatchNorm, 3), (4, 3, 5),
         differ=True),
    Case("SyncBatchRenorm(3)", partial(SyncBatchRenorm, 3, **_RENORM), (2, 3, 4, 4),
         differ=True),
    Case("FilterResponseNorm1d(3)", partial(normlab.FilterResponseNorm1d, 3), (4, 3, 7)),
    Case("FilterResponseNorm1d(3,learnable_eps)", partial(
        normlab.FilterResponseNorm1d, 3, learnable_eps=True), (4, 3)),
    Case("FilterResponseNorm2d(3,threshold=1.5)", partial(
        normlab.FilterResponseNorm2d, 3, threshold=1.5), (2, 3, 5, 5)),
    Case("FilterResponseNorm2d(3,affine_tlu,bias=False)", partial(
        normlab.FilterResponseNorm2d, 3, activation="affine_tlu", bias=False), (2, 3, 5, 5)),
    Case("FilterResponseNorm3d(3,none)", partial(
        normlab.FilterResponseNorm3d, 3, activation="none"), (2, 3, 3, 3, 3)),
    Case("GroupFilterResponseNorm(2,4,relu)", partial(
        normlab.GroupFilterResponseNorm, 2, 4, activation="relu"), (2, 4, 6)),
    Case("LayerFilterResponseNorm(4)", partial(normlab.LayerFilterResponseNorm, 4),
         (2, 4, 3, 3)),
    Case("TLU(3)", partial(normlab.TLU, 3), (2, 3, 4, 4)),
    Case("AffineTLU(3)", partial(normlab.AffineTLU, 3), (2, 3, 5)),
    Case("AltScaleBatchNorm1d(5,a1)", partial(normlab.AltScaleBatchNorm1d, 5), (6, 5),
         differ=True),
    Case("AltScaleBatchNorm2d(3,a2,threshold=1.5)", partial(
        normlab.AltScaleBatchNorm2d, 3, form="a2", threshold=1.5), (2, 3, 5, 5), differ=True),
    Case("AltScaleBatchNorm3d(3,a1)", partial(normlab.AltScaleBatchNorm3d, 3),
         (2, 3, 3, 3, 3), differ=True),
    Case("ScaleCalibratedBatchNorm1d(5,rbn)", partial(normlab.ScaleCalibratedBatchNorm1d, 5),
         (6, 5, 3), differ=True),
    Case("ScaleCalibratedBatchNorm2d(3,iebn,threshold=1.5)", partial(
        normlab.ScaleCalibratedBatchNorm2d, 3, stats="input", wb_init=-1.0, threshold=1.5),
        (2, 3, 5, 5), differ=True),
    Case("ScaleCalibratedBatchNorm3d(3,rbn-)", partial(
        normlab.ScaleCalibratedBatchNorm3d, 3, stats=None), (2, 3, 3, 3, 3), differ=True),
    Case("InputNorm(3)", partial(normlab.InputNorm, 3, gamma=0.5), (4, 3, 5, 5), differ=True),
    Case("InputNorm(3,threshold=1.5)", partial(normlab.InputNorm, 3, threshold=1.5), (8, 3),
         differ=True),
    Case("FixedInputNorm(0..1)", partial(normlab.FixedInputNorm, value_range=(0.0, 1.0)),
         (2, 3, 4, 4)),
    Case("OfflineInputNorm(3)", lambda **f: normlab.OfflineInputNorm(
        torch.tensor([0.1, -0.2, 0.3]), torch.tensor([1.0, 2.0, 0.5]), **f), (2, 3, 4, 4)),
    Case("ConstantChannelPad(3)", lambda: normlab.ConstantChannelPad(
        ((1, 1), (2, 0)), torch.tensor([0.5, -1.0, 2.0])), (2, 3, 4, 4), factory=False),
    Case("NormActivation(fbn,tlu)", lambda **f: normlab.NormActivation(
        normlab.FilteredBatchNorm2d(3, **f), normlab.TLU(3, **f)), (4, 3, 3, 3), differ=True),
]

IDS = [c.name for c in CASES]


# inputs here are tiny: torch's intra-op threads only add wake-up overhead
pytestmark = pytest.mark.usefixtures("one_thread_module")
ORACLE_CASES = [c for c in CASES if c.oracle is not None]
ORACLE_IDS = [c.name for c in ORACLE_CASES]


# -- helpers --------------------------------------------------------------------------------

def _input(case: Case, dtype=torch.float32, *, seed=0, shape=None, requires_grad=False):
    """Inputs with mean 1, spread 2 and a few outliers (so the filter has work to do)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape or case.shape, generator=g, dtype=torch.float64) * 2 + 1
    if x.numel() > 8:
        x.view(-1)[:: max(x.numel() // 3, 1)] *= 6
    return x.to(dtype).requires_grad_(requires_grad)


def _randomize(module: nn.Module, seed: int = 1) -> nn.Module:
    """Non-default parameters and running statistics, identical for equal seeds."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) * 0.5
                    + (0.75 if name.endswith("weight") else -0.25))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64) * 0.3)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g, dtype=torch.float64) + 0.5)
    return module


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return list(module.parameters()) + list(module.buffers())


def _assert_state_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def _run(module: nn.Module, x: torch.Tensor):
    """Output and input gradient of ``sum(y * w)`` for a fixed weight ``w``."""
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)
    (y * w).sum().backward()
    return y.detach(), x.grad


# -- the generic checks ---------------------------------------------------------------------

@pytest.mark.parametrize("case", ORACLE_CASES, ids=ORACLE_IDS)
def test_forward_backward_and_buffers_equal_torch(case):
    """threshold=None is torch's module: outputs, all gradients and buffers bit for bit."""
    ours, theirs = _randomize(case.build()), _randomize(case.oracle())
    for step in range(2):
        for mode in (True, False):
            ours.train(mode), theirs.train(mode)
            x = _input(case, seed=step)
            (y1, g1), (y2, g2) = _run(ours, x), _run(theirs, x)
            assert torch.equal(y1, y2) and torch.equal(g1, g2)
            for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
                assert torch.equal(p.grad, q.grad), name
                p.grad = q.grad = None
            _assert_state_equal(ours, theirs)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_repr(case):
    module = case.build()
    text = repr(module)
    assert text.startswith(type(module).__name__ + "(") and str(module) == text
    if case.oracle is not None:  # torch's description first, normlab's extras after
        theirs = case.oracle().extra_repr()
        assert module.extra_repr().startswith(theirs), (module.extra_repr(), theirs)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_pickle_save_load_and_deepcopy(case):
    module = _randomize(case.build()).eval()
    x = _input(case)
    expected = module(x)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    for copied in (pickle.loads(pickle.dumps(module)), copy.deepcopy(module),
                   torch.load(buffer, weights_only=False)):
        assert type(copied) is type(module)
        assert torch.equal(copied(x), expected)
        _assert_state_equal(copied, module)


# modules that create parameters or buffers take device= and dtype= (ConstantChannelPad is
# built from a given tensor and keeps its device and dtype)
FACTORY_CASES = [c for c in CASES if c.factory and _tensors(c.build())]


@pytest.mark.parametrize("case", FACTORY_CASES, ids=[c.name for c in FACTORY_CASES])
def test_factory_kwargs(case):
    module = case.build(device="meta", dtype=torch.float64)
    tensors = _tensors(module)
    assert len(tensors) == len(_tensors(case.build()))
    for t in tensors:
        assert t.device.type == "meta"
        assert t.dtype == (torch.float64 if t.is_floating_point() else torch.long)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_device_context_at_construction(case):
    with torch.device("meta"):
        module = case.build()
    assert all(t.device.type == "meta" for t in _tensors(module))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_to_and_to_empty(case):
    module = _randomize(case.build()).to(torch.float64)
    assert all(t.dtype in (torch.float64, torch.long) for t in _tensors(module))
    assert module.eval()(_input(case, torch.float64)).dtype == torch.float64
    empty = case.build().to_empty(device="cpu")
    assert all(t.device.type == "cpu" for t in _tensors(empty))


def _unbatched(module: nn.Module, shape) -> bool:
    return isinstance(module, normlab.nn.group._FilteredInstanceNorm) \
        and len(shape) == module._allowed_dims[0]


FORMAT_CASES = [c for c in CASES if len(c.shape) in (4, 5) and not _unbatched(c.build(), c.shape)]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", FORMAT_CASES, ids=[c.name for c in FORMAT_CASES])
def test_memory_format_is_kept(case, training):
    """channels_last in, channels_last out — or whatever torch's module gives (LayerNorm)."""
    fmt = torch.channels_last if len(case.shape) == 4 else torch.channels_last_3d
    module = _randomize(case.build()).train(training)
    x = _input(case).contiguous(memory_format=fmt)
    y = module(x)
    expected = fmt
    if case.oracle is not None:
        theirs = _randomize(case.oracle()).train(training)(x)
        expected = fmt if theirs.is_contiguous(memory_format=fmt) else torch.contiguous_format
    elif isinstance(module, normlab.FilteredLayerNorm):
        expected = torch.contiguous_format  # trailing dims flattened
    assert y.is_contiguous(memory_format=expected)
    fresh = _randomize(case.build()).train(training)  # the state before the call above
    torch.testing.assert_close(y, fresh(x.contiguous()), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_non_contiguous_inputs(case):
    """A strided view of the input gives the output and gradients of its contiguous copy."""
    base = _input(case, torch.float64, shape=case.shape + (2,))
    strided = base[..., 0]
    assert not strided.is_contiguous()
    a, b = _randomize(case.build()).double(), _randomize(case.build()).double()
    (y1, g1), (y2, g2) = _run(a, strided), _run(b, strided.contiguous())
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-9)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9)
    _assert_close_state(a, b)


def _assert_close_state(a, b):
    for (k, t), u in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(t, u, rtol=1e-10, atol=1e-10, msg=k)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_train_and_eval_modes_differ_exactly_when_declared(case):
    module = _randomize(case.build())
    x = _input(case)
    train_out = copy.deepcopy(module).train()(x)
    eval_out = copy.deepcopy(module).eval()(x)
    assert (not torch.allclose(train_out, eval_out)) == case.differ


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_round_trip(case):
    source = _randomize(case.build(), seed=3)
    source.train()(_input(case))
    target = case.build()
    target.load_state_dict(source.state_dict())  # strict
    _assert_state_equal(target, source)
    x = _input(case, seed=5)
    assert torch.equal(target.eval()(x), source.eval()(x))
    if case.oracle is not None:  # with torch's module, both ways, strict
        theirs = case.oracle()
        theirs.load_state_dict(source.state_dict())
        back = case.build()
        back.load_state_dict(theirs.state_dict())
        _assert_state_equal(back, source)
        assert source.state_dict()._metadata[""] == theirs.state_dict()._metadata[""]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_meta_device_then_load_with_assign(case):
    source = _randomize(case.build(), seed=3)
    with torch.device("meta"):
        module = case.build()
    module.load_state_dict(source.state_dict(), assign=True)
    assert not any(t.is_meta for t in _tensors(module))
    x = _input(case)
    assert torch.equal(module.eval()(x), source.eval()(x))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_zero_size_batch(case, training):
    module = _randomize(case.build()).train(training)
    shape = (0,) + case.shape[1:]
    if _unbatched(module, case.shape):
        shape = (3, 0) + case.shape[2:]  # unbatched input: an empty spatial dim instead
    x = torch.randn(shape, requires_grad=True)
    before = copy.deepcopy(module)
    y = module(x)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in module.parameters():
        assert p.grad is None or not p.grad.any()
    for (name, b), a in zip(module.named_buffers(), before.buffers()):
        if name.endswith("num_batches_tracked"):
            continue
        assert torch.equal(b, a), name  # running statistics unchanged (as torch)


# -- gradients in float64: reference and fused paths --------------------------------------

GRAD_CASES = [c for c in CASES if "-plain" not in c.name]  # plain = torch's own ops
GRAD_IDS = [c.name for c in GRAD_CASES]


def _grad_shape(case):
    """Small inputs (gradcheck and the looped jacobian grow with the input size): at most 3
    samples and 3 positions per spatial dim (LayerNorm keeps its normalized dims)."""
    shape = list(case.shape)
    if len(shape) > 2:
        shape[0] = min(shape[0], 3)
    if "LayerNorm" not in case.name:
        shape[2:] = [min(s, 3) for s in shape[2:]]
    return tuple(shape)


def _grad_module(case):
    module = _randomize(case.build()).double()
    for m in module.modules():
        if getattr(m, "momentum", None) is not None:
            m.momentum = 0.0  # gradcheck calls forward many times: keep the running stats
        if isinstance(m, normlab.nn.batch._BatchRenorm):
            # r and d clipped (σ_B/σ > r_max, |μ_B − μ|/σ > d_max): Ioffe's gradient, which
            # treats them as constants, is then the true gradient that gradcheck measures
            m.running_var.fill_(1e-2)
            m.running_mean.fill_(-10.0)
    return module


def _uses_fused_kernels(case) -> bool:
    """Whether the fused CPU kernels serve this module in float64 (the vmap gap of issue 16)."""
    calls = []
    real = kernels._path

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(result)
        return result
    kernels._path = spy
    try:
        _grad_module(case)(_input(case, torch.float64, shape=_grad_shape(case)))
    finally:
        kernels._path = real
    return "cpu" in calls


# every case on the reference path; the fused path (the custom ops' vmap rules) where it
# serves the module
GRAD_PARAMS = [pytest.param(c, "reference", id=f"{c.name}-reference") for c in GRAD_CASES] + [
    pytest.param(c, "auto", id=f"{c.name}-fused")
    for c in GRAD_CASES if _uses_fused_kernels(c)]


@pytest.mark.parametrize(("case", "backend"), GRAD_PARAMS)
def test_gradcheck_with_batched_grad(case, backend):
    module = _grad_module(case)
    x = _input(case, torch.float64, shape=_grad_shape(case), requires_grad=True)
    with kernels.use_backend(backend):
        assert gradcheck(module, (x,), check_batched_grad=True, fast_mode=True)


@pytest.mark.parametrize(("case", "backend"), GRAD_PARAMS)
def test_jacobian_vectorize(case, backend):
    """``jacobian(vectorize=True)`` (vmap over the backward) agrees with plain backward passes."""
    module = _grad_module(case)
    x = _input(case, torch.float64, shape=_grad_shape(case), requires_grad=True)
    with kernels.use_backend(backend):
        jac = jacobian(module, x, vectorize=True)
        y = module(x)
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            v = torch.randn(y.shape, generator=g, dtype=y.dtype)
            (vjp,) = torch.autograd.grad(y, x, v, retain_graph=True)
            expected = (v.reshape(1, -1) @ jac.reshape(y.numel(), x.numel())).view(x.shape)
            torch.testing.assert_close(vjp, expected, rtol=1e-10, atol=1e-10)


# -- torch.fx ---------------------------------------------------------------------------

FX_CASES = [c for c in CASES if not _unbatched(c.build(), c.shape)]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", FX_CASES, ids=[c.name for c in FX_CASES])
def test_fx_symbolic_trace(case, training):
    """The traced graph computes what the module computes, buffer updates included."""
    module = _randomize(case.build()).train(training)
    reference = copy.deepcopy(module)
    traced = fx.symbolic_trace(module)
    for step in range(2):
        x = _input(case, seed=step)
        torch.testing.assert_close(traced(x), reference(x), rtol=0, atol=0)
        _assert_state_equal(module, reference)


def test_fx_traced_instance_norm_refuses_unbatched_input():
    """A proxy has no rank while tracing, so traced instance norms take batches — and say so."""
    traced = fx.symbolic_trace(normlab.FilteredInstanceNorm2d(3))
    traced(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"expects 4D input, got 3D input"):
        traced(torch.randn(3, 4, 4))
