"""Tests for normlab.diagnostics: statistics, recorder, shapes, reports and the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats as ss
import torch
from torch import nn

import normlab
from normlab.diagnostics import (
    ActivationRecorder,
    count_beyond,
    excess_kurtosis,
    find_norm_layers,
    gaussian_expected_count,
    gaussian_tail_probability,
    norm_kind,
    norm_parts,
    normalized_input,
    quantile_bands,
    record_activations,
    skewness,
    summarize,
    top_inputs,
)
from normlab.diagnostics.stats import ChannelReservoir, Reservoir, RunningMoments, _keep_last


# ---------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------
def test_gaussian_tail_matches_seed_arithmetic_and_scipy():
    p7 = gaussian_tail_probability(7)
    assert 1 / p7 == pytest.approx(390_682_215_445, rel=1e-9)  # [HA20] §II.B
    # "a layer with 512 kernels and 16x16 positions": one value per 2,980,668 images
    assert int(1 / p7 / (512 * 16 * 16)) == 2_980_668  # the seed truncates 2,980,668.57
    for k in (0.5, 1, 4, 7, 10, 14):
        assert gaussian_tail_probability(k) == pytest.approx(2 * ss.norm.sf(k), rel=1e-12)
    assert gaussian_expected_count(10**6, 4) == pytest.approx(1e6 * 2 * ss.norm.sf(4), rel=1e-12)
    with pytest.raises(ValueError, match="k must be a number >= 0"):
        gaussian_tail_probability(-1)


def _planted(seed: int = 0) -> tuple[torch.Tensor, dict[float, int]]:
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(10_000, generator=g) * 6 - 3  # |v| <= 3: nothing beyond 4σ
    plant = {5.0: 5, -5.5: 4, 8.0: 3, -12.0: 2, 20.0: 1}
    pos = torch.randperm(v.numel(), generator=g)
    i = 0
    for value, count in plant.items():
        v[pos[i:i + count]] = value
        i += count
    expected = {4.0: 15, 7.0: 6, 10.0: 3, 14.0: 1}
    return v, expected


def test_count_beyond_exact_and_summarize_expectations():
    v, expected = _planted()
    assert count_beyond(v) == expected
    s = summarize(v)
    assert s["n"] == v.numel()
    for k, c in expected.items():
        assert s["beyond"][k]["count"] == c
        assert s["beyond"][k]["expected_gaussian"] == pytest.approx(v.numel() * 2 * ss.norm.sf(k), rel=1e-12)
    assert s["bands"]["min"] == -12.0 and s["bands"]["max"] == 20.0
    assert s["bands"]["q50"] == pytest.approx(float(np.quantile(v.double().numpy(), 0.5)))
    # standardize: z-scores with the values' own moments
    raw = v * 3 + 10
    z = summarize(raw, standardize=True)
    assert z["beyond"][4.0]["count"] == count_beyond((raw - raw.double().mean()) / raw.double().std(correction=0))[4.0]


def test_skewness_kurtosis_match_scipy():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(5000, generator=g, dtype=torch.float64).exp()
    assert skewness(v) == pytest.approx(ss.skew(v.numpy()), rel=1e-9)
    assert excess_kurtosis(v) == pytest.approx(ss.kurtosis(v.numpy()), rel=1e-9)


def test_running_moments_merge_equals_concatenation():
    g = torch.Generator().manual_seed(2)
    chunks = [torch.randn(n, generator=g, dtype=torch.float64) * 2 + 3 for n in (1, 7, 300, 2, 1000)]
    chunks[2][5] = 90.0
    rm = RunningMoments()
    for c in chunks:
        rm.update(c)
    allv = torch.cat(chunks).numpy()
    assert rm.n == allv.size
    assert rm.mean == pytest.approx(allv.mean(), rel=1e-12)
    assert rm.std == pytest.approx(allv.std(), rel=1e-10)
    assert rm.skewness == pytest.approx(ss.skew(allv), rel=1e-9)
    assert rm.excess_kurtosis == pytest.approx(ss.kurtosis(allv), rel=1e-9)
    assert (rm.min, rm.max) == (allv.min(), allv.max())


def test_reservoir_keeps_all_then_samples_uniformly():
    r = Reservoir(50)
    r.update(torch.arange(20.0))
    r.update(torch.arange(20.0, 50.0))
    assert torch.equal(r.values, torch.arange(50.0))
    # _keep_last: repeated slots keep the later value (sequential Algorithm R)
    slots, vals = _keep_last(torch.tensor([3, 1, 3, 2, 1]), torch.tensor([10.0, 11.0, 12.0, 13.0, 14.0]))
    assert dict(zip(slots.tolist(), vals.tolist())) == {1: 14.0, 2: 13.0, 3: 12.0}
    # inclusion probability capacity/n for every position (early and late halves alike)
    hits = torch.zeros(1000)
    trials = 300
    for t in range(trials):
        res = Reservoir(100, generator=torch.Generator().manual_seed(t))
        for chunk in torch.arange(1000.0).split(137):
            res.update(chunk)
        assert res.values.unique().numel() == 100
        hits[res.values.long()] += 1
    rate = hits / trials
    assert rate[:500].mean() == pytest.approx(0.1, abs=0.01)
    assert rate[500:].mean() == pytest.approx(0.1, abs=0.01)
    assert rate[:100].mean() == pytest.approx(0.1, abs=0.015)  # the first, pre-filled values


def test_channel_reservoir_matches_per_channel_values():
    cr = ChannelReservoir(3, 40)
    data = torch.arange(90.0).view(3, 30)
    cr.update(data[:, :10])
    cr.update(data[:, 10:])
    for c in range(3):
        assert torch.equal(cr.values(c), data[c])
    cr.update(torch.full((3, 500), -1.0))
    assert all(cr.values(c).numel() == 40 for c in range(3))


def test_top_inputs_finds_planted_samples():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 4, 6, 6, generator=g).clamp(-3, 3)
    x[17, 2, 3, 4] = 15.0
    x[41, 2, 0, 0] = -9.0
    x[5, 0, 1, 1] = 8.0
    out = top_inputs(x, k=2, offset=100)
    assert out["indices"][2].tolist() == [117, 141]
    assert out["values"][2].tolist() == [15.0, -9.0]
    assert out["indices"][0, 0].item() == 105


# ---------------------------------------------------------------------------------------
# recomputing x̂
# ---------------------------------------------------------------------------------------
def _layers():
    return [
        (nn.BatchNorm2d(4), (8, 4, 5, 5)), (nn.BatchNorm1d(4), (8, 4)),
        (nn.BatchNorm2d(4, track_running_stats=False), (8, 4, 5, 5)),
        (normlab.FilteredBatchNorm2d(4, threshold=2.0), (8, 4, 5, 5)),
        (normlab.FilteredBatchNorm1d(4, threshold=1.5, gaussian_consistent=True), (16, 4)),
        (normlab.BatchRenorm2d(4, renorm_start=0, r_max_full_at=2, d_max_full_at=2, threshold=2.0),
         (8, 4, 5, 5)),
        (nn.GroupNorm(2, 4), (3, 4, 5, 5)), (normlab.FilteredGroupNorm(2, 4), (3, 4, 5, 5)),
        (nn.LayerNorm(6), (3, 5, 6)), (normlab.FilteredLayerNorm(6), (3, 5, 6)),
        (nn.RMSNorm(6), (3, 5, 6)),
        (nn.InstanceNorm2d(4, affine=True, track_running_stats=True), (3, 4, 5, 5)),
        (normlab.FilteredInstanceNorm2d(4, affine=True, track_running_stats=True), (3, 4, 5, 5)),
        (normlab.FilteredInstanceNorm1d(4, affine=True), (4, 7)),
        (normlab.FilterResponseNorm2d(4, activation="none", learnable_eps=True), (3, 4, 5, 5)),
        (normlab.GroupFilterResponseNorm(2, 4, activation="none", threshold=2.0), (3, 4, 5, 5)),
    ]


@pytest.mark.parametrize("index", range(len(_layers())))
def test_norm_parts_reproduce_layer_output(index):
    torch.manual_seed(index)
    m, shape = _layers()[index]
    m = m.double()  # float64: equality up to rounding (float32 filtered moments of a 60σ
    with torch.no_grad():  # outlier differ by ~1e-4 between summation orders)
        for p in m.parameters():
            if p.dim() > 0:
                p.uniform_(0.5, 1.5)
    for train in (True, False, True, False):
        m.train(train)
        x = torch.randn(shape, dtype=torch.float64) * 3 + 1
        x.view(-1)[0] = 60.0  # an outlier the filtered layers ignore
        running = ((m.running_mean.clone(), m.running_var.clone())
                   if norm_kind(m) == "renorm" and train else None)
        y = m(x)
        parts = norm_parts(m, x, running=running)
        shp = list(m.weight.shape) if norm_kind(m) in ("layer", "rms") else [1] * x.dim()
        if norm_kind(m) not in ("layer", "rms"):
            shp[parts.channel_dim] = -1
        expect = parts.xhat * m.weight.view(shp)
        if getattr(m, "bias", None) is not None:
            expect = expect + m.bias.view(shp)
        torch.testing.assert_close(expect, y, rtol=1e-10, atol=1e-10)
        assert not parts.xhat.requires_grad


def test_torch_bn_recorded_values_equal_true_normalized_values():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(bn)
    xs = [torch.randn(4, 3, 5, 5) * 2 + 1 for _ in range(2)]
    for train in (True, False):
        model.train(train)
        expected = []
        with ActivationRecorder(model, sample_size=10_000, channel_sample_size=1000) as rec:
            for x in xs:
                if train:  # the true batch-normalized values: (x − μ_B)/sqrt(σ²_B + ε)
                    var, mean = torch.var_mean(x, dim=(0, 2, 3), keepdim=True, correction=0)
                else:
                    mean = bn.running_mean.view(1, 3, 1, 1)
                    var = bn.running_var.view(1, 3, 1, 1)
                expected.append((x - mean) / torch.sqrt(var + bn.eps))
                model(x)
        r = rec["0"]
        flat = torch.cat([e.reshape(4, 3, -1).reshape(-1) for e in expected])
        torch.testing.assert_close(r.reservoir.values, flat)
        per_channel = torch.cat([e.transpose(0, 1).reshape(3, -1) for e in expected], dim=1)
        for c in range(3):
            torch.testing.assert_close(r.channel_values(c), per_channel[c])
        assert r.moments.n == flat.numel()
        assert r.moments.max == pytest.approx(float(flat.max()))


def test_recorder_on_renorm_training_uses_pre_forward_running_stats():
    torch.manual_seed(1)
    m = normlab.BatchRenorm1d(3, renorm_start=0, r_max_full_at=1, d_max_full_at=1, momentum=0.5)
    with torch.no_grad():
        m.weight.fill_(2.0)
        m.bias.fill_(0.5)
    model = nn.Sequential(m).train()
    outs = []
    with ActivationRecorder(model, sample_size=1000) as rec:
        for _ in range(3):
            outs.append(model(torch.randn(16, 3) * 3 + 2))
    expected = torch.cat([((y - 0.5) / 2.0).reshape(-1) for y in outs])
    torch.testing.assert_close(rec["0"].reservoir.values, expected, rtol=1e-5, atol=1e-5)


def _identity_bn(channels: int) -> nn.BatchNorm1d:
    """Eval-mode BN with running mean 0, var 1, eps 0: x̂ == x exactly."""
    bn = nn.BatchNorm1d(channels, eps=0.0)
    return bn.eval()


def test_recorder_exact_counts_and_global_top_inputs():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Identity(), _identity_bn(3))
    batches = [torch.randn(32, 3, 10).clamp(-3.5, 3.5) for _ in range(3)]
    batches[0][5, 1, 2] = 8.0       # global sample 5
    batches[1][7, 1, 0] = -15.0     # global sample 39
    batches[1][7, 1, 1] = 11.0      # same sample, second value
    batches[2][30, 0, 9] = 4.5      # global sample 94
    rec = record_activations(model, batches, top_k=3, sample_size=500)
    r = rec["1"]
    assert r.beyond.tolist() == [4, 3, 2, 1]                 # k = 4, 7, 10, 14
    assert r.channel_beyond[1].tolist() == [3, 3, 2, 1]
    assert r.channel_beyond[0].tolist() == [1, 0, 0, 0]
    assert r.channel_samples_beyond[1].tolist() == [2, 2, 1, 1]  # samples 5 and 39
    assert r.topk.indices[1, :2].tolist() == [39, 5]
    assert r.topk.values[1, :2].tolist() == [-15.0, 8.0]
    assert r.topk.indices[0, 0].item() == 94
    s = rec.summary()["1"]
    assert s["beyond"][7.0]["count"] == 3
    assert s["beyond"][7.0]["expected_gaussian"] == pytest.approx(2880 * gaussian_tail_probability(7), rel=1e-12)
    assert s["outlier_channels"][0]["channel"] == 1
    assert s["outlier_channels"][0]["top_inputs"][:2] == [39, 5]
    assert s["bands"]["min"] == -15.0 and s["bands"]["max"] == 11.0
    assert rec.totals()["beyond"][14.0]["count"] == 1


def test_hooks_removed_and_outputs_unchanged():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                          normlab.FilteredGroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 36, 3),
                          nn.LayerNorm(3))
    x = torch.randn(6, 2, 8, 8)
    ref = model(x)
    ref.sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert list(find_norm_layers(model)) == ["1", "4", "7"]
    with ActivationRecorder(model, layers=["1", "7"]) as rec:
        assert rec.attached
        out = model(x)
        out.sum().backward()
        with torch.no_grad():
            model(x)
    assert not rec.attached
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert rec.layer_names == ["1", "7"] and rec["1"].calls == 2 and rec["1"].samples_seen == 12
    model(x)  # detached: nothing more is recorded
    assert rec["1"].calls == 2
    with pytest.raises(ValueError, match=r"no normalization layer named \['2'\]"):
        ActivationRecorder(model, layers=["2"])
    with pytest.raises(TypeError, match="is not a normalization layer"):
        normalized_input(nn.ReLU(), x)


def test_quantile_bands_keys():
    b = quantile_bands(torch.arange(101.0))
    assert b == {"min": 0.0, "q01": 1.0, "q25": 25.0, "q50": 50.0, "q75": 75.0, "q99": 99.0, "max": 100.0}
