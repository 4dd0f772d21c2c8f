"""One training run: seeds, schedule, model selection, callbacks, parameter groups."""

import math

import pytest
import torch

from normlab.lab.callbacks import Callback
from normlab.lab.train import RunConfig, cosine_lr_factor, seed_value, train_run

TINY = dict(data="mnist", limit=200, batch_size=32, epochs=2, lr=0.05)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_seed_value_is_md5_of_run_index():
    # md5("1") = c4ca4238a0b923820dcc509a6f75849b → last 8 hex digits 6f75849b
    assert seed_value(1) == 0x6F75849B == 1869972635
    assert seed_value(2) == 0xCC14862C
    assert seed_value(15) == 0x1F8F2FF3
    with pytest.raises(TypeError, match="run index must be an int"):
        seed_value("1")


def test_cosine_schedule_with_warmup_ramp():
    assert cosine_lr_factor(0, 10) == pytest.approx(1.0)
    assert cosine_lr_factor(5, 10) == pytest.approx(0.5)
    assert cosine_lr_factor(10, 10) == pytest.approx(0.0)
    # cosine ramp-up over 4 steps ([SK20] §4.1): ½(1 − cos(π k / 4)), k = 1..4
    ramp = [cosine_lr_factor(s, 14, warmup=4) for s in range(4)]
    assert ramp == pytest.approx([0.5 * (1 - math.cos(math.pi * k / 4)) for k in (1, 2, 3, 4)])
    decay = [cosine_lr_factor(s, 14, warmup=4) for s in range(4, 15)]
    assert decay[0] == pytest.approx(1.0) and decay[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert decay[5] == pytest.approx(0.5)  # halfway through the 10 decay steps


def test_same_seed_repeats_exactly_and_other_seeds_differ():
    config = RunConfig(norm="bn", **TINY)
    first = train_run(config, 1)
    again = train_run(config, 1)
    other = train_run(config, 2)
    assert first.epochs == again.epochs
    assert [m["train_loss"] for m in other.epochs] != [m["train_loss"] for m in first.epochs]


def test_validation_picks_the_reported_epoch():
    result = train_run(RunConfig(norm="fbn", **dict(TINY, epochs=3)), 3)
    vals = [m["val_acc"] for m in result.epochs]
    assert len(result.epochs) == 3
    assert result.chosen_epoch == vals.index(max(vals)) + 1
    assert result.val_acc == max(vals)
    assert result.test_acc == result.epochs[result.chosen_epoch - 1]["test_acc"]
    for m in result.epochs:
        assert set(m) >= {"train_loss", "train_acc", "val_loss", "val_acc", "test_loss",
                          "test_acc", "lr", "epoch", "step"}
    assert result.extra["sizes"]["val"] > 0 and result.device == "cpu"


class Recorder(Callback):
    def __init__(self):
        self.calls = []
        self.snapshot = None
        self.unchanged_at_backward = None
        self.groups = None
        self.gammas = None

    def on_train_begin(self, state):
        self.calls.append("begin")
        self.snapshot = [p.detach().clone() for p in state.model.parameters()]
        self.groups = {g["name"]: (g["lr"], g["weight_decay"]) for g in state.optimizer.param_groups}
        from normlab.optim import is_norm_module

        self.gammas = [m.weight.detach().clone() for m in state.model.modules()
                       if is_norm_module(m)]

    def on_after_backward(self, state):
        self.calls.append("backward")
        if state.step == 0:
            params = list(state.model.parameters())
            assert all(p.grad is not None for p in params)
            self.unchanged_at_backward = all(torch.equal(p, s) for p, s in zip(params, self.snapshot))

    def on_batch_end(self, state):
        self.calls.append("batch")

    def on_epoch_end(self, state):
        self.calls.append(f"epoch{state.epoch}:{state.metrics['val_acc']:.1f}")

    def on_train_end(self, state):
        self.calls.append("end")

    def write_artifacts(self, out_dir):
        path = out_dir / "recorder.txt"
        path.write_text("\n".join(self.calls))
        return [path]


def test_callback_hooks_order_param_groups_and_gamma(tmp_path):
    rec = Recorder()
    config = RunConfig(norm="bn", gamma=0.1, gamma_lr_divisor=100.0,
                       **dict(TINY, steps=5, epochs=2))
    result = train_run(config, 1, callbacks=[rec], artifacts_dir=tmp_path)
    # 5 steps, evaluated twice (after steps 2 and 5 = round(5·k/2))
    assert result.extra["steps"] == 5 and [m["step"] for m in result.epochs] == [2, 5]
    kinds = [c.split(":")[0] for c in rec.calls]
    assert kinds == (["begin"] + ["backward", "batch"] * 2 + ["epoch1"]
                     + ["backward", "batch"] * 3 + ["epoch2", "end"])
    assert rec.unchanged_at_backward  # on_after_backward runs before the optimizer step
    # SGD groups from normlab.param_groups: γ gets lr / c, no decay on norm parameters/biases
    assert rec.groups["norm_scale"] == (pytest.approx(0.05 / 100), 0.0)
    assert rec.groups["decay"] == (pytest.approx(0.05), pytest.approx(1e-4))
    assert rec.groups["no_decay"][1] == 0.0
    assert rec.gammas and all(torch.allclose(g, torch.full_like(g, 0.1)) for g in rec.gammas)
    assert (tmp_path / "recorder.txt").read_text().startswith("begin")
    assert result.extra["artifacts"] == [str(tmp_path / "recorder.txt")]


def test_online_input_norm_prepends_a_bn_layer():
    class Grab(Callback):
        def on_train_begin(self, state):
            self.model = state.model

    grab = Grab()
    train_run(RunConfig(norm="bn", input_norm="online", **dict(TINY, steps=2, epochs=1)), 1,
              callbacks=[grab])
    from normlab.nn.input_norm import InputNorm

    assert isinstance(grab.model.input_norm, InputNorm)


def test_config_hash_and_validation():
    a = RunConfig(norm="bn")
    assert a.config_hash() == RunConfig(norm="bn").config_hash()
    assert a.config_hash() != RunConfig(norm="fbn").config_hash()
    assert RunConfig.from_dict(a.to_dict()) == a
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        RunConfig(batch_size=0)
    with pytest.raises(ValueError, match="batch_size 1 is too small for batch statistics"):
        RunConfig(norm="bn", batch_size=1)
    with pytest.raises(ValueError, match="input_norm must be one of"):
        RunConfig(input_norm="zscore")
    with pytest.raises(ValueError, match="lr must be a positive float, got -1"):
        RunConfig(lr=-1.0)
    with pytest.raises(ValueError, match="unknown run config key"):
        RunConfig.from_dict({"nrom": "bn"})
    with pytest.raises(ValueError, match="seed .* must be an int >= 1, got 0"):
        train_run(RunConfig(**TINY), 0)


def test_later_fields_are_left_out_exactly_at_their_defaults():
    """A field added after stores existed is omitted from the hashed dict at the value old
    configurations implicitly had — which must be the field's default, or an old store's
    configuration would read back as another run."""
    from dataclasses import fields

    from normlab.lab.train import _LATER_FIELDS

    defaults = {f.name: f.default for f in fields(RunConfig)}
    assert {k: defaults[k] for k in _LATER_FIELDS} == _LATER_FIELDS
    config = RunConfig(norm="bn")
    assert not set(_LATER_FIELDS) & set(config.to_dict())
    assert RunConfig.from_dict(config.to_dict()) == config
