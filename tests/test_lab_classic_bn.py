"""The lab's classic-BN options (Ioffe & Szegedy 2015, arXiv 1502.03167): schedules,
augmentation, --precise-bn evaluation, divergence, probes (Fig. 1(b, c) percentiles and the
shape of Wu + b and u, checked against scipy), config-hash stability."""

import copy
import math

import pytest
import scipy.stats
import torch

import normlab
from normlab.lab.models import build_model
from normlab.lab.probes import InputPercentiles, ShapeTrace, make_probe
from normlab.distributed import DistContext
from normlab.lab.train import (RunConfig, _precise_bn_batches, augment_batch, load_data, lr_factor,
                               seed_value, train_run)

MLP = dict(data="mnist", model="mlp", limit=300, batch_size=30, steps=24, epochs=3, lr=0.5,
           momentum=0.0, weight_decay=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_new_fields_leave_every_earlier_hash_unchanged():
    # the default configuration's hash before schedule/augment/precise_bn/probe existed
    assert RunConfig().config_hash() == "153b286495cc64b8"
    keys = set(RunConfig().to_dict())
    assert not keys & {"schedule", "augment", "precise_bn", "probe"}
    changed = RunConfig(schedule="constant")
    assert changed.to_dict()["schedule"] == "constant"
    assert changed.config_hash() != RunConfig().config_hash()
    assert RunConfig.from_dict(changed.to_dict()) == changed
    for bad, message in ((dict(schedule="step"), "schedule must be one of cosine, constant"),
                         (dict(augment="mixup"), "augment must be one of none, flip"),
                         (dict(probe="all"), "probe must be one of percentiles, shape"),
                         (dict(precise_bn=0), "precise_bn must be a positive int")):
        with pytest.raises(ValueError, match=message):
            RunConfig(**bad)


def test_constant_schedule_keeps_the_rate_after_the_ramp():
    assert [lr_factor("constant", s, 10) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    ramp = [lr_factor("constant", s, 10, warmup=4) for s in range(6)]
    assert ramp[:4] == pytest.approx([0.5 * (1 - math.cos(math.pi * k / 4)) for k in (1, 2, 3, 4)])
    assert ramp[4:] == [1.0, 1.0]
    assert lr_factor("cosine", 5, 10) == pytest.approx(0.5)


def test_augmentation_flips_and_crops_windows_of_the_padded_image():
    """Each image is the window of the zero-padded image at the drawn offset, flipped where
    the drawn coin says so — the draws replayed from the same generator, the windows cut
    by slicing; and the draws do move and flip images."""
    x = torch.arange(16 * 2 * 5 * 5, dtype=torch.float32).reshape(16, 2, 5, 5)
    assert augment_batch(x, "none", torch.Generator()) is x
    for mode, pad in (("flip", 0), ("crop-flip", 2)):
        got = augment_batch(x, mode, torch.Generator().manual_seed(1), pad=pad)
        replay = torch.Generator().manual_seed(1)
        if mode == "crop-flip":
            dy = torch.randint(0, 2 * pad + 1, (16,), generator=replay)
            dx = torch.randint(0, 2 * pad + 1, (16,), generator=replay)
        else:
            dy = dx = torch.zeros(16, dtype=torch.long)
        flip = torch.rand(16, generator=replay) < 0.5
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        for k in range(16):
            window = padded[k, :, dy[k]:dy[k] + 5, dx[k]:dx[k] + 5]
            assert torch.equal(got[k], window.flip(-1) if flip[k] else window), (mode, k)
        assert 0 < int(flip.sum()) < 16  # some images flipped, some not
        if mode == "crop-flip":
            assert bool(((dy != pad) | (dx != pad)).any())  # some crops off centre
        assert torch.equal(got, augment_batch(x, mode, torch.Generator().manual_seed(1),
                                              pad=pad))


def test_precise_bn_evaluation_trains_identically_and_keeps_algorithm_2_statistics(tmp_path):
    base = RunConfig(norm="bn", **dict(MLP, model_options={"dropout": 0.2}))
    ema = train_run(base, 1, checkpoint_path=tmp_path / "ema.pt")
    precise = RunConfig.from_dict(dict(base.to_dict(), precise_bn=5))
    got = train_run(precise, 1, checkpoint_path=tmp_path / "precise.pt")
    # the same weights (dropout in the precise passes uses a forked RNG) ...
    assert [m["train_loss"] for m in got.epochs] == [m["train_loss"] for m in ema.epochs]
    a = torch.load(tmp_path / "ema.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "precise.pt", weights_only=True)["model"]
    weights = [k for k in a if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(a[k], b[k]) for k in weights)
    # ... evaluated with other statistics: the final model keeps Algorithm 2's
    assert [m["val_loss"] for m in got.epochs] != [m["val_loss"] for m in ema.epochs]
    data = load_data(base)
    model = build_model("mlp", norm="bn", dropout=0.2)
    model.load_state_dict(a)
    x_train = data.train.tensors[0]
    batches = _precise_bn_batches(len(x_train), precise, 1, None)  # one process
    assert len(batches) == 5 and all(len(i) == 30 for i in batches)
    normlab.precise_bn_(model, [x_train[i] for i in batches], progress=False)
    state = model.state_dict()
    for k in a:
        if "running" in k:
            assert not torch.equal(a[k], b[k])
            if k.startswith("hidden.0."):  # before the first dropout: no RNG involved
                torch.testing.assert_close(b[k], state[k], rtol=0, atol=1e-6)


def test_divergence_is_recorded_not_raised():
    config = RunConfig(norm="none", **dict(MLP, lr=500.0, model_options={"activation": "relu"}))
    result = train_run(config, 1)
    assert result.extra["diverged"] is True
    last = result.epochs[-1]
    assert math.isnan(last["val_acc"]) and 0 <= result.test_acc <= 100
    assert result.extra["steps"] < config.steps


def _twin_input(model, inputs, path, where="in"):
    """Independent capture: a copy with BN layers training, the rest eval."""
    twin = copy.deepcopy(model).eval()
    for m in twin.modules():
        if isinstance(m, normlab.FilteredBatchNorm1d):
            m.train()
    got = {}
    module = dict(twin.hidden.named_modules())[path]
    if where == "in":
        handle = module.register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0]))
    else:
        handle = module.register_forward_hook(lambda m, a, o: got.setdefault("x", o))
    with torch.no_grad():
        twin(inputs)
    handle.remove()
    return got["x"].double()


def test_percentile_probe_is_fig_1bc_on_the_last_sigmoid_and_touches_nothing():
    torch.manual_seed(0)
    model = build_model("mlp", norm="bn", dropout=0.3)
    x = torch.randn(200, 1, 28, 28)
    probe = InputPercentiles(x, total_steps=10, points=5, units=3)
    assert probe.at == {2, 4, 6, 8, 10}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    probe.measure(model, 0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    inputs = _twin_input(model, x, "2.act")[:, :3].numpy()
    for q in (15, 50, 85):
        expected = [float(v) for v in __import__("numpy").percentile(inputs, q, axis=0)]
        assert probe.record[f"p{q}"][0] == pytest.approx(expected, abs=1e-6)
    assert probe.record["steps"] == [0] and probe.record["layer"] == 2


def test_shape_probe_matches_scipy_per_unit_medians():
    torch.manual_seed(1)
    model = build_model("mlp", norm="bn", placement="post", activation="relu", depth=2,
                        hidden=20)
    x = torch.randn(300, 1, 28, 28)
    probe = ShapeTrace(x)
    probe.measure(model, 0)
    for layer in (0, 1):
        for part, path, where in (("wub", f"{layer}.linear", "out"), ("u", f"{layer}.act", "out")):
            values = _twin_input(model, x, path, where).numpy()
            entry = probe.record["layers"][str(layer)][part][0]
            skews = scipy.stats.skew(values, axis=0, bias=True)
            kurts = scipy.stats.kurtosis(values, axis=0, fisher=True, bias=True)
            finite = ~__import__("numpy").isnan(kurts)
            assert entry["skewness"] == pytest.approx(float(__import__("numpy").median(
                skews[finite])), abs=1e-9)
            assert entry["excess_kurtosis"] == pytest.approx(float(__import__("numpy").median(
                kurts[finite])), abs=1e-9)
            assert entry["zero_fraction"] == pytest.approx(float((values == 0).mean()))
    assert probe.record["layers"]["0"]["u"][0]["zero_fraction"] > 0.2      # ReLU: sparse
    assert probe.record["layers"]["0"]["wub"][0]["zero_fraction"] == 0.0


def test_probes_in_a_run_and_their_errors():
    result = train_run(RunConfig(norm="bn", probe="percentiles",
                                 **dict(MLP, model_options={"activation": "sigmoid"})), 1)
    record = result.extra["probe"]["percentiles"]
    assert record["steps"][0] == 0 and record["steps"][-1] == 24
    assert len(record["p50"]) == len(record["steps"]) and len(record["p50"][0]) == 4
    result = train_run(RunConfig(norm="bn", probe="shape", **MLP), 1)
    record = result.extra["probe"]["shape"]
    assert record["epochs"] == [0, 1, 2, 3] and set(record["layers"]) == {"0", "1", "2"}
    with pytest.raises(ValueError, match="the probes measure the fully connected net"):
        make_probe("shape", build_model("lenet5"), torch.zeros(2, 1, 28, 28), total_steps=1)
    with pytest.raises(ValueError, match="unknown probe"):
        make_probe("hist", build_model("mlp"), torch.zeros(2, 1, 28, 28), total_steps=1)


def test_seeds_of_the_precise_batches_are_their_own():
    config = RunConfig(precise_bn=3, batch_size=10)
    a = _precise_bn_batches(25, config, 1, None)
    assert len(a) == 3 and all(len(i) == 10 for i in a)   # a second shuffled pass fills in
    generator = torch.Generator().manual_seed(seed_value(1) + 1)
    assert torch.equal(a[0], torch.randperm(25, generator=generator)[:10])
    shards = _precise_bn_batches(25, config, 1, DistContext(rank=1, world_size=2, is_main=False))
    assert torch.equal(shards[0], a[0][1::2])
