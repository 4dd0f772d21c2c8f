"""Batch norm + activation as one kernel call (NormActivation → forward_with_activation).

The fused call must give what the two modules give one after the other — outputs, every
gradient, running statistics — on the C kernels (contiguous and channels_last) and on the
reference; hooks switch the fusion off; FX, torch.compile and torch.export keep working.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normlab
from normlab import kernels
from normlab.nn.activation import AffineTLU, NormActivation, TLU, kernel_activation

NORMS = {
    "fbn": lambda c: normlab.FilteredBatchNorm2d(c, threshold=1.5),
    "fbn-consistent": lambda c: normlab.FilteredBatchNorm2d(c, threshold=2.0,
                                                            gaussian_consistent=True),
    "brn": lambda c: normlab.BatchRenorm2d(c, threshold=2.0),
}
ACTS = {
    "relu": lambda c: nn.ReLU(),
    "relu-inplace": lambda c: nn.ReLU(inplace=True),
    "tlu": lambda c: TLU(c),
    "affine_tlu": lambda c: AffineTLU(c),
}


def _block(norm: str, act: str, dtype=torch.float64) -> NormActivation:
    torch.manual_seed(0)
    block = NormActivation(NORMS[norm](5), ACTS[act](5)).to(dtype)
    with torch.no_grad():  # parameters away from their defaults, so every gradient matters
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return block


def _input(dtype, channels_last, seed=1):
    x = torch.randn(6, 5, 4, 3, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    x[0, 1, 0, 0] = 40.0  # an outlier the filter drops
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _unfused(block: NormActivation, x):
    """The two modules one after the other (what the fused call must equal)."""
    return block.act(block.norm(x))


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("norm", list(NORMS))
def test_fused_equals_norm_then_activation(norm, act, channels_last, backend):
    fused, plain = _block(norm, act), _block(norm, act)
    with kernels.use_backend(backend):
        for seed in (1, 2):  # two steps: running statistics (and batch renorm's r, d) move
            x1 = _input(torch.float64, channels_last, seed).requires_grad_()
            x2 = x1.detach().clone().requires_grad_()
            y1, y2 = fused(x1), _unfused(plain, x2)
            g = torch.randn_like(y1)
            (y1 * g).sum().backward()
            (y2 * g).sum().backward()
            torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)
    for (name, p1), p2 in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-10, atol=1e-12, msg=name)
    for (name, b1), b2 in zip(fused.named_buffers(), plain.buffers()):
        torch.testing.assert_close(b1, b2, rtol=1e-12, atol=1e-12, msg=name)
    assert y1.stride() == x1.stride()


def test_fused_call_reaches_the_kernel_with_the_activation(monkeypatch):
    """The fused path is one normalize call carrying the activation (not a ReLU after it)."""
    seen = []
    real = normlab.nn.batch.normalize

    def spy(x, weight, bias, spec, **kw):
        seen.append(spec.activation)
        return real(x, weight, bias, spec, **kw)
    monkeypatch.setattr(normlab.nn.batch, "normalize", spy)
    monkeypatch.setattr(nn.ReLU, "forward", lambda self, x: pytest.fail("ReLU ran"))
    _block("fbn", "relu")(_input(torch.float64, False))
    assert seen == [kernels.Activation.RELU]


def _kernel_calls(monkeypatch) -> list:
    """The C kernel calls made from now on (kernel name, ...), for proof the fused path ran."""
    from normlab.kernels import cpu

    if not cpu.available():
        pytest.skip("no fused CPU kernels")
    calls = []
    monkeypatch.setattr(cpu, "_trace", calls)
    return calls


def test_float32_fused_kernel_equals_float64_on_outliers(monkeypatch):
    """The C kernels with the activation fused keep the exactness rule (outliers up to 1e6)."""
    x = torch.randn(16, 5, 8, 8, generator=torch.Generator().manual_seed(3))
    x[0, 0, 0, 0] = 1e6
    for channels_last in (False, True):
        xx = x.to(memory_format=torch.channels_last) if channels_last else x
        calls = _kernel_calls(monkeypatch)
        y32 = _block("fbn", "relu", torch.float32)(xx)
        assert [c[0] for c in calls] == [("bnc" if channels_last else "bn") + "_fwd_f32"]
        y64 = _block("fbn", "relu", torch.float64)(xx.double())
        keep = torch.ones_like(y64, dtype=torch.bool)
        keep[0, 0, 0, 0] = False
        err = (y32.double() - y64)[keep].abs().max().item()
        assert err < 1e-5, (channels_last, err)


def test_nan_stays_visible_through_the_fused_relu(monkeypatch):
    x = _input(torch.float32, False)
    x[2, 3, 1, 1] = float("nan")
    calls = _kernel_calls(monkeypatch)
    y = _block("fbn", "relu", torch.float32)(x)
    assert [c[0] for c in calls] == ["bn_fwd_f32"]  # the fused C kernel made this output
    assert y[:, 3].isnan().all() and not y[:, [0, 1, 2, 4]].isnan().any()


def test_hooks_turn_the_fusion_off():
    """A hook on the norm sees the norm's output and one on the activation sees its input,
    as without fusion (the diagnostics rely on it)."""
    block = _block("fbn", "relu")
    seen = {}
    block.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("norm", o))
    block.act.register_forward_hook(lambda m, i, o: seen.__setitem__("act", i[0]))
    x = _input(torch.float64, False)
    y = block(x)
    assert seen["norm"] is seen["act"] and (seen["norm"] < 0).any() and (y >= 0).all()
    assert kernel_activation(block.act) is None


def test_eval_and_unfiltered_layers_apply_the_activation_after():
    block = _block("fbn", "tlu").eval()
    x = _input(torch.float64, False)
    torch.testing.assert_close(block(x), _unfused(block, x), rtol=0, atol=0)
    unfiltered = NormActivation(normlab.FilteredBatchNorm2d(5, threshold=None), nn.ReLU())
    torch.testing.assert_close(unfiltered(x.float()),
                               torch.relu(nn.BatchNorm2d(5)(x.float())), rtol=0, atol=0)


def test_other_activations_are_applied_after():
    block = NormActivation(normlab.FilteredBatchNorm2d(5), nn.GELU()).double()
    x = _input(torch.float64, False)
    reference = copy.deepcopy(block)
    torch.testing.assert_close(block(x), reference.act(reference.norm(x)))


def test_fx_compile_and_export_see_one_call():
    block = _block("fbn", "relu", torch.float32)
    x = _input(torch.float32, False)
    reference = copy.deepcopy(block)
    traced = torch.fx.symbolic_trace(copy.deepcopy(block))
    assert not any(n.op == "call_module" and n.target == "act" for n in traced.graph.nodes)
    torch.testing.assert_close(traced(x), reference(x))
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    compiled = torch.compile(copy.deepcopy(block), backend=record, fullgraph=True)
    torch.testing.assert_close(compiled(x), copy.deepcopy(block)(x))
    assert len(graphs) == 1
    compiled_targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert compiled_targets.count("normlab.normalize.default") == 1
    assert not any("relu" in t for t in compiled_targets), compiled_targets
    exported = torch.export.export(copy.deepcopy(block), (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert any("normlab.normalize" in t for t in targets)
    assert not any("relu" in t for t in targets), targets


@pytest.mark.parametrize("sync", [normlab.SyncFilteredBatchNorm, normlab.SyncBatchRenorm])
def test_a_subclass_with_its_own_forward_keeps_it(sync, monkeypatch):
    """SyncFilteredBatchNorm/SyncBatchRenorm reduce across processes in their own forward:
    NormActivation must run that forward (then the activation), never the local fused call."""
    calls = []
    real = sync.forward

    def spy(self, x):
        calls.append(type(self))
        return real(self, x)
    monkeypatch.setattr(sync, "forward", spy)
    block = NormActivation(sync(5), nn.ReLU()).double()
    x = _input(torch.float64, False)
    y = block(x)
    assert calls == [sync] and (y >= 0).all()


def test_zero_size_batch_as_torch():
    """An empty batch through the fused block: an empty output and gradient, running
    statistics untouched, the batch counted — as torch's BatchNorm2d followed by ReLU."""
    block, torch_block = _block("fbn", "relu"), nn.Sequential(nn.BatchNorm2d(5), nn.ReLU())
    block, torch_block = block.double(), torch_block.double()
    x = torch.randn(0, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    before = block.norm.running_mean.clone(), block.norm.running_var.clone()
    y = block(x)
    y.sum().backward()
    assert y.shape == torch_block(x).shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(block.norm.running_mean, before[0])
    assert torch.equal(block.norm.running_var, before[1])
    assert block.norm.num_batches_tracked == torch_block[0].num_batches_tracked == 1
