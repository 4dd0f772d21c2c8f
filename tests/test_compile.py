"""torch.compile and torch.export are first-class paths for every registry spec.

The kernels are torch.library custom ops (normlab.kernels.ops), so a conv → norm → act
model compiles into ONE graph with fullgraph=True (issue: 5 graph breaks for conv → fbn →
relu, 16 of 22 spec × mode combinations broke), runs the fused ops inside it, and gives the
outputs, gradients and running statistics of eager mode; torch.export works in train and eval.
"""

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.backends.debugging import aot_eager

import normlab
from normlab.kernels import cpu

SPECS = sorted(s for s in normlab.list_norms() if s != "none") + [
    "bn:act=tlu", "fbn:act=relu", "fgn:act=affine_tlu", "frn:act=relu", "ffrn:act=affine_tlu"]
MODES = ["train", "eval"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch (the compiled code objects are shared by the models,
    and dynamo's per-code cache would otherwise carry over between tests)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_model(spec):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), normlab.create_norm_act(spec, 4),
                          nn.Conv2d(4, 2, 1))
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        for name, p in model.named_parameters():
            if not name.startswith(("0.", "2.")):
                p.add_(torch.rand(p.shape) * 0.4 - 0.2)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.uniform_(-0.3, 0.3)
            elif name.endswith("running_var"):
                b.uniform_(0.6, 1.6)
    return model


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 8, 8, generator=g)
    x[0, 0, 2, 2] = 40.0  # an outlier the filtered norms drop
    return x


class GraphCounter:
    """A torch.compile backend that records every graph and runs it through aot_eager
    (fake tensors, functionalization, the ops' registered autograd)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return aot_eager(gm, example_inputs)

    def targets(self):
        return {str(n.target) for gm in self.graphs for n in gm.graph.nodes
                if n.op == "call_function"}


def step(model, x, run=None):
    """Output, input gradient and parameter gradients of one forward/backward of ``model``
    (called through ``run``, e.g. its compiled wrapper)."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = (run or model)(x)
    proj = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (y * proj).sum().backward()
    return y.detach(), x.grad, {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spec", SPECS)
def test_every_spec_compiles_to_one_graph_equal_to_eager(spec, mode):
    eager = make_model(spec).train(mode == "train")
    compiled_model = copy.deepcopy(eager)
    counter = GraphCounter()
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)
    for seed in (1, 2):  # two steps: running statistics accumulate, no recompilation
        got = step(compiled_model, batch(seed), compiled)
        want = step(eager, batch(seed))
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
        for k in want[2]:
            torch.testing.assert_close(got[2][k], want[2][k], rtol=1e-4, atol=1e-4, msg=k)
        for (k, a), b in zip(compiled_model.state_dict().items(), eager.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=k)
    assert len(counter.graphs) == 1, f"{spec} ({mode}): {len(counter.graphs)} graphs"


@pytest.mark.skipif(not cpu.available(), reason="no fused CPU kernels")
@pytest.mark.parametrize("spec", ["fbn", "fgn", "frn", "ffrn:act=affine_tlu", "fin", "fln"])
def test_compiled_graph_calls_the_fused_op(spec):
    counter = GraphCounter()
    torch.compile(make_model(spec).train(), backend=counter, fullgraph=True)(batch())
    assert "normlab.normalize.default" in counter.targets()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spec", SPECS)
def test_every_spec_exports(spec, mode):
    """torch.export.export in eval and train: outputs equal eager and the exported
    module's running statistics advance as the eager module's."""
    model = make_model(spec).train(mode == "train")
    reference = copy.deepcopy(model)
    exported = torch.export.export(model, (batch(),)).module()
    for seed in (1, 2):
        torch.testing.assert_close(exported(batch(seed)), reference(batch(seed)),
                                   rtol=1e-5, atol=1e-5)
    state = dict(exported.state_dict())
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=1e-6, atol=1e-6, msg=k)


@pytest.mark.slow
def test_inductor_compiles_the_fused_ops():
    """The default backend (inductor) around the opaque CPU ops: values and gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), normlab.FilteredBatchNorm2d(4, threshold=2.0),
                          nn.ReLU(), nn.Conv2d(4, 4, 3), normlab.FilterResponseNorm2d(4))
    reference = copy.deepcopy(model)
    graphs = []

    def inductor(gm, example_inputs):  # inductor, recording the graph it compiles
        from torch._inductor.compile_fx import compile_fx

        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(model, backend=inductor, fullgraph=True)
    for seed in (1, 2):
        got, want = step(model, batch(seed), compiled), step(reference, batch(seed))
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
        for k in want[2]:
            torch.testing.assert_close(got[2][k], want[2][k], rtol=1e-4, atol=1e-4, msg=k)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    if cpu.available():  # the fused ops, not the reference path
        assert targets.count("normlab.normalize.default") == 2, targets
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-6, atol=1e-6)


def test_momentum_none_compiles_with_torchs_graph_break():
    """A cumulative running average (momentum=None: factor 1/num_batches_tracked, read on
    the host as torch.nn.BatchNorm2d does, which breaks its graph too) still equals eager."""
    eager = nn.Sequential(normlab.FilteredBatchNorm2d(3, momentum=None)).train()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager")
    for seed in (1, 2, 3):
        torch.testing.assert_close(compiled(batch(seed)), eager(batch(seed)))
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)
