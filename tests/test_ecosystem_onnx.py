"""ONNX export of normlab's layers, run in onnxruntime: docs/ecosystem.md's ONNX row.

One module holds every registry spec and every layer class outside the registry as
branches of one input, so each exporter runs once per test session (the dynamo exporter
costs seconds per call). Eval models export exactly: each branch's onnxruntime output
(float32) is compared with the eager module in float64, the formula's value; the tolerance
is float32 rounding, ``2e-5 · max(1, max|y|)`` per branch (measured ≤ 3.3e-6 relative,
both exporters, torch 2.13 and 2.14).

Training mode: a layer that updates running statistics refuses, naming ``model.eval()``;
the per-sample norms export as they compute. Skipped without onnx/onnxruntime/onnxscript
(the ``[export]`` extra; ``[dev]`` installs them).
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import normlab
from normlab.distributed import SyncBatchRenorm, SyncFilteredBatchNorm

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = [
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export"),
    pytest.mark.filterwarnings("ignore:Exporting a model while it is in training mode"),
]

C = 6  # channels of every branch's input
_RENORM = {"renorm_start": 0, "r_max_full_at": 0, "d_max_full_at": 0}
ACT_SPECS = ("fbn:act=tlu", "bn:act=affine_tlu", "rbn:act=relu", "fgn:act=tlu",
             "frn:act=relu", "gfrn:act=affine_tlu", "lfrn:act=none",
             "fbn:gaussian_consistent=true", "fgn:gaussian_consistent=true,threshold=1",
             "frn:learnable_eps=true")


class On(nn.Module):
    """``layer`` applied to the ``(N, C, 5, 5)`` input seen as ``(N, C)``, ``(N, C, L)`` or
    ``(N, C, 1, H, W)``: the 1d and 3d classes on the same data."""

    def __init__(self, view: str, layer: nn.Module) -> None:
        super().__init__()
        self.view, self.layer = view, layer

    def forward(self, x):
        if self.view == "vector":
            return self.layer(x.mean((2, 3)))
        if self.view == "flat":
            return self.layer(x.flatten(2))
        return self.layer(x.unsqueeze(2))


CLASSES = {  # every layer class the registry does not build, with options it does not set
    "SyncFilteredBatchNorm": lambda: SyncFilteredBatchNorm(C, threshold=1.5),
    "SyncBatchRenorm": lambda: SyncBatchRenorm(C, threshold=2.0, **_RENORM),
    "FilteredBatchNorm1d(vector)": lambda: On("vector", normlab.FilteredBatchNorm1d(C)),
    "FilteredBatchNorm3d": lambda: On("volume", normlab.FilteredBatchNorm3d(C, bias=False)),
    "FilteredBatchNorm2d(batch stats in eval)": lambda: normlab.FilteredBatchNorm2d(
        C, threshold=1.5, track_running_stats=False),
    "BatchRenorm1d": lambda: On("flat", normlab.BatchRenorm1d(C, **_RENORM)),
    "AltScaleBatchNorm3d(a2)": lambda: On("volume", normlab.AltScaleBatchNorm3d(C, form="a2")),
    "ScaleCalibratedBatchNorm1d(iebn)": lambda: On(
        "flat", normlab.ScaleCalibratedBatchNorm1d(C, stats="input", threshold=1.5)),
    "InputNorm(threshold)": lambda: normlab.InputNorm(C, threshold=1.5, gamma=0.5),
    "FixedInputNorm": lambda: normlab.FixedInputNorm(value_range=(-1.0, 3.0)),
    "OfflineInputNorm": lambda: normlab.OfflineInputNorm(torch.linspace(-1, 1, C),
                                                         torch.linspace(0.5, 2, C)),
    "FilteredInstanceNorm2d": lambda: normlab.FilteredInstanceNorm2d(C, affine=True),
    "FilteredInstanceNorm2d(running stats)": lambda: normlab.FilteredInstanceNorm2d(
        C, affine=True, track_running_stats=True),
    "FilteredInstanceNorm1d": lambda: On("flat", normlab.FilteredInstanceNorm1d(C, threshold=1.5)),
    "FilteredInstanceNorm3d(running stats)": lambda: On("volume", normlab.FilteredInstanceNorm3d(
        C, track_running_stats=True)),
    "FilteredLayerNorm": lambda: normlab.FilteredLayerNorm([C, 5, 5], threshold=1.5),
    "FilteredLayerNorm(last dim)": lambda: normlab.FilteredLayerNorm(5, bias=False),
    "FilterResponseNorm1d": lambda: On("flat", normlab.FilterResponseNorm1d(C, threshold=2.0)),
    "FilterResponseNorm1d(vector, learnable_eps)": lambda: On(
        "vector", normlab.FilterResponseNorm1d(C, learnable_eps=True)),
    "FilterResponseNorm3d(affine_tlu)": lambda: On("volume", normlab.FilterResponseNorm3d(
        C, activation="affine_tlu")),
    "GroupFilterResponseNorm": lambda: normlab.GroupFilterResponseNorm(3, C, threshold=2.0),
    "TLU": lambda: normlab.TLU(C),
    "AffineTLU": lambda: normlab.AffineTLU(C),
    "ConstantChannelPad": lambda: normlab.ConstantChannelPad(((1, 1), (2, 0)),
                                                             torch.linspace(-1, 1, C)),
}
BUILDERS = {**{f"spec {s}": (lambda s=s: normlab.create_norm(s, C))
               for s in sorted(normlab.list_norms()) + list(ACT_SPECS)},
            **CLASSES}
NAMES = list(BUILDERS)


class Branches(nn.Module):
    """The layers of :data:`BUILDERS` named (default: all) on the same input; one output
    each."""

    def __init__(self, names=NAMES) -> None:
        super().__init__()
        self.layers = nn.ModuleList(BUILDERS[name]() for name in names)

    def forward(self, x):
        return tuple(layer(x) for layer in self.layers)


def _inputs(n: int, seed: int) -> torch.Tensor:
    """Mean 1, spread 2; a 1e6 outlier, a constant sample and a sample at offset 1e2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, 5, 5, generator=g) * 2 + 1
    x[0, 1, 2, 2] = 1e6
    if n > 1:
        x[1] = 3.0
    if n > 2:
        x[2] += 100.0
    return x


def _trained(model: nn.Module) -> nn.Module:
    """Non-default parameters and running statistics from three training batches."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.rand(p.shape, generator=g) * 0.5 - 0.1)
        model.train()
        for k in range(3):
            x = torch.randn(8, C, 5, 5, generator=g) * 2 + 1
            x[0, :, 0, 0] = 40.0
            model(x)
    return model.eval()


def export(model: nn.Module, x: torch.Tensor, *, dynamo: bool, dynamic: bool = False,
           **options) -> ort.InferenceSession:
    """``torch.onnx.export`` (either exporter), loaded into an onnxruntime CPU session."""
    if dynamo:
        shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
        program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=shapes,
                                    verbose=False, **options)
        data = program.model_proto.SerializeToString()
    else:
        buffer = io.BytesIO()
        axes = {"x": {0: "batch"}} if dynamic else None
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"],
                          dynamic_axes=axes, **options)
        data = buffer.getvalue()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def run(session: ort.InferenceSession, x: torch.Tensor) -> list[torch.Tensor]:
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return [torch.from_numpy(o) for o in outputs]


def _relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    assert got.shape == exact.shape
    return float((got.double() - exact).abs().max() / max(1.0, float(exact.abs().max())))


@pytest.fixture(scope="module")
def branches() -> nn.Module:
    return _trained(Branches())


_EXACT: dict[int, list[torch.Tensor]] = {}


def _exact(branches: nn.Module, n: int) -> list[torch.Tensor]:
    """The float64 eager outputs on the test batch of ``n`` samples."""
    if n not in _EXACT:
        _EXACT[n] = list(copy.deepcopy(branches).double()(_inputs(n, seed=n).double()))
    return _EXACT[n]


_SESSIONS: dict[str, ort.InferenceSession] = {}


def _session(branches: nn.Module, exporter: str) -> ort.InferenceSession:
    """Each exporter once: dynamo (torch's default) with a dynamic batch dimension from an
    example batch of 3, the TorchScript one at the test batch size, 4 (it keeps FRN's traced
    batch size: test_torchscript_exporter_keeps_the_traced_batch_size_of_uncentered_norms)."""
    if exporter not in _SESSIONS:
        dynamo = exporter == "dynamo"
        _SESSIONS[exporter] = export(branches, _inputs(3 if dynamo else 4, seed=0),
                                     dynamo=dynamo, dynamic=dynamo)
    return _SESSIONS[exporter]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("name", NAMES)
def test_eval_export_runs_in_onnxruntime_as_eager(name, exporter, branches):
    outputs = run(_session(branches, exporter), _inputs(4, seed=4))
    i = NAMES.index(name)
    assert _relative_error(outputs[i], _exact(branches, 4)[i]) <= 2e-5


@pytest.mark.parametrize("n", [1, 9])
def test_dynamo_export_takes_any_batch_size(n, branches):
    outputs = run(_session(branches, "dynamo"), _inputs(n, seed=n))
    errors = {name: _relative_error(y, e) for name, y, e in zip(NAMES, outputs,
                                                                 _exact(branches, n))}
    assert max(errors.values()) <= 2e-5, errors


def test_eval_export_leaves_the_model_untouched(branches):
    state = copy.deepcopy(branches.state_dict())
    export(nn.Sequential(branches.layers[NAMES.index("spec fbn")]), _inputs(3, 0), dynamo=False)
    assert all(torch.equal(v, branches.state_dict()[k]) for k, v in state.items())
    assert not branches.training


@pytest.mark.parametrize("name", ["spec frn", "spec lfrn", "spec gfrn", "spec ffrn"])
def test_torchscript_exporter_keeps_the_traced_batch_size_of_uncentered_norms(name):
    """The legacy exporter (deprecated by torch) folds FRN's zero mean into a constant of the
    traced shape: with ``dynamic_axes`` another batch size is refused by onnxruntime (never
    a wrong number); at the traced size the output is exact. Use dynamo=True (the default)."""
    model = _trained(nn.Sequential(BUILDERS[name]()))
    session = export(model, _inputs(3, 0), dynamo=False, dynamic=True)
    assert _relative_error(run(session, _inputs(3, 1))[0],
                           copy.deepcopy(model).double()(_inputs(3, 1).double())) <= 2e-5
    with pytest.raises(Exception, match="broadcast"):
        run(session, _inputs(5, 1))


# -- training mode --------------------------------------------------------------------------

TRAINING_REFUSED = {  # layers that update running statistics in training
    "FilteredBatchNorm2d": lambda: normlab.FilteredBatchNorm2d(C),
    "FilteredBatchNorm2d(threshold=None)": lambda: normlab.FilteredBatchNorm2d(C, threshold=None),
    "BatchRenorm2d": lambda: normlab.BatchRenorm2d(C, **_RENORM),
    "SyncFilteredBatchNorm": lambda: SyncFilteredBatchNorm(C),
    "AltScaleBatchNorm2d": lambda: normlab.AltScaleBatchNorm2d(C),
    "ScaleCalibratedBatchNorm2d": lambda: normlab.ScaleCalibratedBatchNorm2d(C),
    "InputNorm": lambda: normlab.InputNorm(C),
    "FilteredInstanceNorm2d(running stats)": lambda: normlab.FilteredInstanceNorm2d(
        C, track_running_stats=True),
}


@pytest.mark.parametrize(("name", "exporter"), [(name, "torchscript") for name in TRAINING_REFUSED]
                         + [(name, "dynamo") for name in ("FilteredBatchNorm2d(threshold=None)",
                                                          "AltScaleBatchNorm2d",
                                                          "FilteredInstanceNorm2d(running stats)")])
def test_training_mode_export_is_refused_with_the_fix(name, exporter):
    """ONNX holds an inference graph: it cannot update running statistics. torch's own
    BatchNorm2d then exports its eval arithmetic (dynamo, with a warning); normlab's layers
    say so. The TorchScript exporter is asked to keep the training mode (its default,
    training=EVAL, switches to eval for the export: next test). Nothing is updated.

    One check serves every batch layer (``_BatchStatsNorm._check``), one the instance norm;
    the dynamo exporter (seconds per call) runs on both, and on layers whose training
    forward its strict fallback capture would otherwise export (F.batch_norm)."""
    model = nn.Sequential(TRAINING_REFUSED[name]()).train()
    state = copy.deepcopy(model.state_dict())
    options = {} if exporter == "dynamo" else {"training": torch.onnx.TrainingMode.TRAINING}
    with pytest.raises(Exception, match=f"{type(model[0]).__name__} is in training mode while "
                                        f"torch.onnx.export records it.*call model.eval()"):
        export(model, _inputs(3, 0), dynamo=exporter == "dynamo", **options)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_torchscript_exporter_default_exports_eval_mode():
    """The legacy exporter's default (training=EVAL) puts the model in eval for the export
    (torch's rule): exact eval graph, the model back in training mode afterwards."""
    model = _trained(nn.Sequential(normlab.FilteredBatchNorm2d(C), normlab.BatchRenorm2d(C)))
    model.train()
    session = export(model, _inputs(3, 0), dynamo=False)
    assert model.training
    expected = copy.deepcopy(model).eval().double()(_inputs(3, 1).double())
    assert _relative_error(run(session, _inputs(3, 1))[0], expected) <= 2e-5


TRAINING_PER_SAMPLE = ("spec fgn", "spec ffrn", "spec fln", "FilteredInstanceNorm2d",
                       "FilteredLayerNorm", "TLU")


def test_training_mode_export_of_per_sample_norms_computes_what_training_computes():
    """No running statistics: the training forward is the eval forward, and exports."""
    model = _trained(Branches(TRAINING_PER_SAMPLE)).train()
    session = export(model, _inputs(3, 0), dynamo=True, dynamic=True)
    x = _inputs(5, 1)
    expected = copy.deepcopy(model).double()(x.double())
    for name, y, e in zip(TRAINING_PER_SAMPLE, run(session, x), expected):
        assert _relative_error(y, e) <= 2e-5, name


def test_only_onnx_export_takes_the_composite_torch_export_keeps_the_custom_op():
    """The composite is for ONNX and TorchScript graphs only: torch.export (and so
    torch.compile) still records normlab's custom op (when the C kernels are built)."""
    from normlab.kernels import cpu, exporting_to_onnx
    if not cpu.available():
        pytest.skip("no C compiler: the reference path has no custom op")
    model = nn.Sequential(normlab.FilteredGroupNorm(2, C)).eval()
    assert not exporting_to_onnx()
    graph = torch.export.export(model, (_inputs(3, 0),)).graph
    assert any("normlab.normalize" in str(node.target) for node in graph.nodes)
    traced = torch.jit.trace(model, (_inputs(3, 0),), check_trace=False).inlined_graph
    kinds = {node.kind() for node in traced.nodes()}
    assert all(kind.startswith(("aten::", "prim::")) for kind in kinds), kinds
