"""Revisiting-BN update rule and initialization: param_groups, init_norm_, fan_in_init_."""

import math

import pytest
import torch
from torch import nn

import normlab
from normlab.optim import fan_in_init_, init_norm_, param_groups, param_roles


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.inorm = normlab.InputNorm(3)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fbn = normlab.FilteredBatchNorm2d(8)
        self.tlu = normlab.TLU(8)
        self.frn = normlab.FilterResponseNorm2d(8, learnable_eps=True)
        self.gn = nn.GroupNorm(2, 8)
        self.a2 = normlab.AltScaleBatchNorm2d(8, form="a2")
        self.rbn = normlab.ScaleCalibratedBatchNorm2d(8, stats="normalized")
        self.fc = nn.Linear(8, 4)
        self.ln = nn.LayerNorm(4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(self.inorm(x))))
        x = self.tlu(self.fbn(self.conv2(x)))
        x = self.rbn(self.a2(self.gn(self.frn(x))))
        return self.ln(self.fc(x.mean((2, 3))))


def _ids(params):
    return {id(p) for p in params}


def _expected(m):
    decay = [m.conv1.weight, m.conv2.weight, m.fc.weight]
    scale = [m.inorm.weight, m.bn1.weight, m.fbn.weight, m.frn.weight, m.gn.weight, m.a2.weight,
             m.a2.gamma0, m.rbn.weight, m.ln.weight]
    no_decay = [m.conv2.bias, m.bn1.bias, m.fbn.bias, m.tlu.tau, m.frn.bias, m.frn.tau,
                m.frn.learned_eps, m.gn.bias, m.a2.bias, m.rbn.bias, m.rbn.calib_weight,
                m.rbn.calib_bias, m.fc.bias, m.ln.bias]
    return decay, no_decay, scale


def test_param_groups_hold_exactly_the_right_tensors():
    m = SmallCNN()
    groups = param_groups(m, lr=0.1, weight_decay=1e-4)
    by_name = {g["name"]: g for g in groups}
    decay, no_decay, scale = _expected(m)
    assert _ids(by_name["decay"]["params"]) == _ids(decay)
    assert _ids(by_name["no_decay"]["params"]) == _ids(no_decay)
    assert _ids(by_name["norm_scale"]["params"]) == _ids(scale)
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))
    assert (by_name["decay"]["lr"], by_name["decay"]["weight_decay"]) == (0.1, 1e-4)
    assert (by_name["no_decay"]["lr"], by_name["no_decay"]["weight_decay"]) == (0.1, 0.0)
    assert by_name["norm_scale"]["lr"] == pytest.approx(0.1 / 100)
    assert by_name["norm_scale"]["weight_decay"] == 0.0
    assert param_roles(m)["a2.gamma0"] == "norm_scale"
    assert param_roles(m)["rbn.calib_bias"] == "no_decay"


def test_param_groups_divisor_frozen_and_empty_groups():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
    m[1].bias.requires_grad_(False)
    groups = param_groups(m, lr=1.0, weight_decay=0.5, gamma_lr_divisor=4)
    assert [g["name"] for g in groups] == ["decay", "norm_scale"]
    assert groups[1]["lr"] == 0.25
    groups = param_groups(m, lr=1.0, weight_decay=0.5, include_frozen=True)
    assert [g["name"] for g in groups] == ["decay", "no_decay", "norm_scale"]


@pytest.mark.parametrize("make_sched,expected", [
    (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
     lambda t: 0.5 ** (t // 2)),
    (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
     lambda t: 0.5 * (1 + math.cos(math.pi * t / 10))),
    (lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)),
     lambda t: 1.0 / (1 + t)),
])
def test_lr_ratio_survives_schedulers(make_sched, expected):
    m = SmallCNN()
    opt = torch.optim.SGD(param_groups(m, lr=0.1, weight_decay=1e-4), lr=0.1, momentum=0.9)
    sched = make_sched(opt)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    for t in range(1, 8):
        opt.step()
        sched.step()
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        assert lrs["decay"] == pytest.approx(0.1 * expected(t), rel=1e-9)
        assert lrs["no_decay"] == pytest.approx(lrs["decay"], rel=1e-12)
        assert lrs["norm_scale"] == pytest.approx(lrs["decay"] / 100, rel=1e-9)
        assert {g["name"]: g["weight_decay"] for g in opt.param_groups} == {
            "decay": 1e-4, "no_decay": 0.0, "norm_scale": 0.0}


def test_weight_decay_reaches_only_the_decay_group():
    m = SmallCNN()
    opt = torch.optim.SGD(param_groups(m, lr=1.0, weight_decay=0.1), lr=1.0)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradients: only weight decay moves parameters
    roles = param_roles(m)
    for name, p in m.named_parameters():
        if roles[name] == "decay":
            torch.testing.assert_close(p, before[name] * 0.9)
        else:
            torch.testing.assert_close(p, before[name])


def test_init_norm_sets_every_scale():
    m = SmallCNN()
    assert init_norm_(m, gamma=0.1) is m
    relu_std = math.sqrt(0.5 - 1 / (2 * math.pi))
    torch.testing.assert_close(m.inorm.weight, torch.full((3,), 0.1 * relu_std))
    for mod in (m.bn1, m.fbn, m.frn, m.gn, m.a2, m.rbn, m.ln):
        assert torch.all(mod.weight == 0.1), type(mod).__name__
        assert torch.all(mod.bias == 0.0)
    assert torch.all(m.a2.gamma0 == 1.0)
    assert m.fbn.gamma_init == 0.1
    m.fbn.reset_parameters()
    assert torch.all(m.fbn.weight == 0.1)
    assert torch.all(m.rbn.calib_bias == 1.0)  # RBN's own init is left alone


def test_fan_in_init():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(64, 256, 3), nn.Linear(512, 300), nn.ConvTranspose2d(4, 4, 3))
    before = m[2].weight.detach().clone()
    fan_in_init_(m)
    conv_std = m[0].weight.std().item()
    assert conv_std == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.02)
    bound = math.sqrt(2) * math.sqrt(3 / 512)
    w = m[1].weight
    assert w.abs().max().item() <= bound and w.abs().max().item() > 0.99 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert torch.all(m[0].bias == 0) and torch.all(m[1].bias == 0)
    torch.testing.assert_close(m[2].weight, before)  # transposed conv untouched


def test_errors():
    m = SmallCNN()
    with pytest.raises(ValueError, match="lr must be a number > 0, got 0"):
        param_groups(m, lr=0, weight_decay=0.0)
    with pytest.raises(ValueError, match="weight_decay must be a number >= 0, got -1"):
        param_groups(m, lr=0.1, weight_decay=-1)
    with pytest.raises(ValueError, match="gamma_lr_divisor must be a number > 0"):
        param_groups(m, lr=0.1, weight_decay=0.0, gamma_lr_divisor=0)
    with pytest.raises(TypeError, match="model must be an nn.Module, got list"):
        param_groups([], lr=0.1, weight_decay=0.0)
    with pytest.raises(ValueError, match="has no trainable parameters"):
        param_groups(nn.ReLU(), lr=0.1, weight_decay=0.0)
    with pytest.raises(ValueError, match="gamma must be a number > 0, got -0.5"):
        init_norm_(m, gamma=-0.5)
    with pytest.raises(ValueError, match="nonlinearity must be one of"):
        fan_in_init_(m, nonlinearity="gelu")
