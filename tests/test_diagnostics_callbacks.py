"""Tests for normlab.diagnostics callbacks, shapes, plots, reports and ``normlab inspect``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import normlab
from normlab.cli import main as cli_main
from normlab.diagnostics import ActivationRecorder
from normlab.diagnostics.callbacks import (
    BandTracker,
    GradientFactorTracker,
    LossLandscape,
    MomentConsistency,
    default_callbacks,
    measure_landscape,
)
from normlab.diagnostics.report import write_recorder_report
from normlab.diagnostics.shape import distribution_shapes, find_activation_after
from normlab.lab.callbacks import TrainState


def _model(dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3), normlab.FilteredBatchNorm2d(4, threshold=2.0), nn.ReLU(),
        nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * 4 * 4, 3),
    )


def _train(model: nn.Module, callbacks, steps: int = 3, seed: int = 0):
    """A minimal loop following the lab's callback contract."""
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 3, (24,), generator=g))
            for _ in range(steps)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = TrainState(model=model, optimizer=opt, loss_fn=nn.functional.cross_entropy,
                       device=torch.device("cpu"))
    for cb in callbacks:
        cb.on_train_begin(state)
    model.train()
    for step, (x, y) in enumerate(data):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        state.step, state.inputs, state.targets, state.loss = step, x, y, float(loss.detach())
        for cb in callbacks:
            cb.on_after_backward(state)
        opt.step()
        for cb in callbacks:
            cb.on_batch_end(state)
    for cb in callbacks:
        cb.on_train_end(state)
    return state


def test_callbacks_leave_training_bit_identical(tmp_path):
    torch.manual_seed(0)
    base = _model(dropout=0.3)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(1)
    _train(a, [])
    cbs = default_callbacks({"diagnose": {"landscape_every": 1, "sub_batch": 8}, "seed": 3})
    torch.manual_seed(1)
    _train(b, cbs)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for m in b.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    paths = [p for cb in cbs for p in cb.write_artifacts(tmp_path)]
    names = {p.name for p in paths}
    for stem in ("diag_band_history", "diag_consistency", "diag_landscape", "diag_gradient_factor"):
        assert {f"{stem}.png", f"{stem}.json", f"{stem}.csv"} <= names
    assert all(p.stat().st_size > 0 for p in paths)
    bands = json.loads((tmp_path / "diag_band_history.json").read_text())
    assert {r["layer"] for r in bands} == {"1", "4"} and len(bands) == 6
    assert all(r["min"] <= r["q25"] <= r["q50"] <= r["q75"] <= r["max"] for r in bands)


def test_measure_landscape_restores_state_and_matches_manual_step():
    torch.manual_seed(2)
    model = _model().train()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    model(x)  # move the running stats away from their init
    nn.functional.cross_entropy(model(x), y).backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    row = measure_landscape(model, nn.functional.cross_entropy, x, y, (0.02, 0.001))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    # independent computation on a copy
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    loss0 = nn.functional.cross_entropy(ref(x), y)
    g0 = torch.autograd.grad(loss0, params)
    assert row["loss"] == pytest.approx(float(loss0.detach()), rel=1e-6)
    for eta in (0.02, 0.001):
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for p, g in zip(moved.parameters(), g0):
                p.sub_(eta * g)
        loss = nn.functional.cross_entropy(moved(x), y)
        g1 = torch.autograd.grad(loss, list(moved.parameters()))
        change = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(g1, g0)))
        assert row[f"loss_{eta:g}"] == pytest.approx(float(loss.detach()), rel=1e-5)
        assert row[f"grad_change_{eta:g}"] == pytest.approx(float(change), rel=1e-4, abs=1e-7)
    assert row["loss_range"] == pytest.approx(row["loss_max"] - row["loss_min"])


def test_moment_consistency_without_filter_equals_bn():
    torch.manual_seed(3)
    cb = MomentConsistency(sub_batch=8, threshold=1e9)  # no value is filtered
    _train(_model(), [cb], steps=2)
    assert len(cb.history) == 4  # 2 batch-stat layers × 2 steps
    for row in cb.history:
        assert row["bn_dmean"] > 0
        assert row["fbn_dmean"] == pytest.approx(row["bn_dmean"], rel=1e-6)
        assert row["fbn_dvar"] == pytest.approx(row["bn_dvar"], rel=1e-5)
        assert row["fbn_self_dvar"] == pytest.approx(row["bn_dvar"], rel=1e-5)
    with pytest.raises(ValueError, match="sub_batch must be an int >= 2"):
        MomentConsistency(sub_batch=1)


def test_gradient_factor_matches_batch_statistics():
    torch.manual_seed(4)
    model = _model().train()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    inputs = {}
    model[1].register_forward_hook(lambda m, a, o: inputs.setdefault("x", a[0].detach()))
    gamma0 = model[1].weight.detach().clone()
    cb = GradientFactorTracker(layers=["1"])
    _train(model, [cb], steps=1)
    var = inputs["x"].var(dim=(0, 2, 3), correction=0)
    expected = (gamma0 / torch.sqrt(var + 1e-5)).abs()
    row = cb.history[0]
    assert row["factor_mean"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert row["factor_max"] == pytest.approx(float(expected.max()), rel=1e-5)
    assert row["gamma_drift_mean"] == 0.0  # recorded before the optimizer step


def test_band_tracker_every_and_default_callbacks_options():
    cb = BandTracker(every=2)
    _train(_model(), [cb], steps=3)
    assert sorted({r["iteration"] for r in cb.history}) == [0, 2]
    cbs = default_callbacks({"diagnose": {"callbacks": ["landscape"], "landscape_steps": [0.1]}})
    assert len(cbs) == 1 and isinstance(cbs[0], LossLandscape) and cbs[0].steps == (0.1,)
    assert len(default_callbacks({})) == 4
    with pytest.raises(ValueError, match=r"unknown diagnostics callbacks \['hist'\]"):
        default_callbacks({"diagnose": {"callbacks": ["hist"]}})


def test_distribution_shapes_pre_normalized_post():
    torch.manual_seed(5)
    lin = nn.Linear(20, 8)
    model = nn.Sequential(lin, nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8),
                          normlab.create_norm_act("bn", 8, dim=1)).train()
    assert find_activation_after(model, "1") == ("2", model[2])
    assert find_activation_after(model, "4.norm")[0] == "4.act"
    x = torch.randn(256, 20)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = distribution_shapes(model, x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    pre = lin(x).detach()
    assert shapes["1"]["pre"]["mean"] == pytest.approx(float(pre.mean()), rel=1e-5, abs=1e-6)
    assert shapes["1"]["normalized"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert shapes["1"]["normalized"]["std"] == pytest.approx(1.0, abs=1e-3)
    assert 0.3 < shapes["1"]["post"]["zero_fraction"] < 0.7  # ReLU of a centered value
    assert shapes["1"]["post"]["skewness"] > 0.5
    assert set(shapes) == {"1", "4.norm"}


def test_report_and_plots_written(tmp_path):
    torch.manual_seed(6)
    model = _model().eval()
    x = torch.randn(40, 1, 8, 8)
    x[3] *= 30  # one extreme input
    with ActivationRecorder(model) as rec, torch.no_grad():
        model(x[:20])
        model(x[20:])
    shapes = distribution_shapes(model, x[:20])
    paths = write_recorder_report(rec, tmp_path, labels=list(range(100, 140)), shapes=shapes)
    names = {p.name for p in paths}
    assert {"summary.json", "bands.csv", "layer_bands.png", "summary.md",
            "distribution_shapes.png"} <= names
    assert sum(n.startswith("channel_") and n.endswith(".png") for n in names) == 3
    assert all(p.stat().st_size > 0 for p in paths)
    md = (tmp_path / "summary.md").read_text()
    assert "| 1 | BatchNorm2d |" in md and "#3 (label 103)" in md


def test_inspect_cli_with_factory_and_lab_model(tmp_path, capsys):
    torch.manual_seed(7)
    x, y = torch.randn(48, 1, 8, 8), torch.randint(0, 10, (48,))
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    from normlab.lab.models import build_model

    model = build_model("lenet5", norm="bn", image_size=8)
    torch.save({"model": model.state_dict(), "config": {"model": "lenet5", "norm": "bn"}},
               tmp_path / "ckpt.pt")
    out = tmp_path / "out"
    rc = cli_main(["inspect", "--checkpoint", str(tmp_path / "ckpt.pt"), "--data",
                   str(tmp_path / "data.pt"), "--out", str(out), "--batch-size", "16",
                   "--channels", "1"])
    assert rc == 0
    assert (out / "layer_bands.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["layers"]) == 4 and summary["totals"]["n"] > 0
    assert "checkpoint" in (out / "summary.md").read_text()
    out2 = tmp_path / "out2"
    rc = cli_main(["inspect", "--factory", "normlab.lab.models:build_model", "--factory-kwargs",
                   '{"name": "lenet5", "norm": "gn", "image_size": 8}', "--data",
                   str(tmp_path / "data.pt"), "--out", str(out2), "--mode", "train",
                   "--channels", "0"])
    assert rc == 0 and (out2 / "summary.md").exists()
    assert cli_main(["inspect", "--factory", "nocolon", "--data", str(tmp_path / "data.pt")]) == 2
    assert "--factory must look like 'package.module:function'" in capsys.readouterr().err


def test_inspect_cli_rebuilds_lab_run_from_checkpoint_config(tmp_path):
    from normlab.lab.train import RunConfig, build, load_data

    cfg = RunConfig(data="mnist", model="lenet5", norm="fbn", limit=60, input_norm="online",
                    gamma=0.5)
    torch.manual_seed(8)
    model = build(cfg, load_data(cfg))
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, tmp_path / "run.pt")
    out = tmp_path / "out"
    assert cli_main(["inspect", "--checkpoint", str(tmp_path / "run.pt"), "--split", "all",
                     "--out", str(out), "--channels", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"]["n"] > 0
    # the online input norm (a BN on the input) is part of the rebuilt model
    assert len(summary["layers"]) == 5
    assert "lenet5 with norm 'fbn'" in (out / "summary.md").read_text()
