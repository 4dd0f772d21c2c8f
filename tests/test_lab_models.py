"""Tests for normlab.lab.models: shapes, where the norms are and of which type, activations,
parameter counts against known/hand-computed numbers, init, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normlab.lab.models import build_model, list_models, model_placements
from normlab.nn import (
    TLU,
    BatchRenorm1d,
    BatchRenorm2d,
    FilteredBatchNorm1d,
    FilteredBatchNorm2d,
    FilteredGroupNorm,
    FilterResponseNorm1d,
    FilterResponseNorm2d,
    GroupFilterResponseNorm,
)
from normlab.nn._common import AffineMixin

ALL = ["lenet5", "alexnet", "vgg", "resnet18", "resnet34", "resnet50", "preact_resnet18",
       "mobilenetv2", "preact_resnet50"]
SMALL = {"lenet5": 1.0, "alexnet": 0.25, "vgg": 0.25, "resnet18": 0.125, "resnet34": 0.125,
         "resnet50": 0.125, "preact_resnet18": 0.125, "mobilenetv2": 0.25,
         "preact_resnet50": 0.125}
# norms with placement "all": every conv / hidden FC norm, counted by hand from the definitions
EXPECTED_NORMS = {
    "lenet5": 4,                       # conv1, conv2, fc1, fc2
    "alexnet": 7,                      # 5 conv + 2 hidden FC
    "vgg": 8,                          # 6 conv + 2 hidden FC
    "resnet18": 1 + 8 * 2 + 3,         # stem + 2 per block + 3 projection shortcuts
    "resnet34": 1 + 16 * 2 + 3,
    "resnet50": 1 + 16 * 3 + 4,        # first stage projects 64 -> 256 as well
    "preact_resnet18": 8 * 2 + 1,      # 2 per block + the final norm; shortcuts are bare convs
    "preact_resnet50": 16 * 3 + 1,     # 3 per bottleneck + the final norm
    "mobilenetv2": 1 + 2 + 16 * 3 + 1,  # stem, t=1 block, 16 expanding blocks, last 1x1
}


def _norms(model: nn.Module) -> list[nn.Module]:
    """Every normalization layer: normlab's (AffineMixin) and torch's built-in ones."""
    torch_norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    return [m for m in model.modules() if isinstance(m, (AffineMixin, *torch_norms))]


def _small(name: str, norm: str = "bn", **kw) -> nn.Module:
    return build_model(name, norm=norm, width=SMALL[name], in_channels=3, image_size=16, **kw)


@pytest.mark.parametrize("name", ALL)
def test_forward_backward_shape_and_norm_count(name):
    torch.manual_seed(0)
    model = _small(name, num_classes=7)
    x = torch.randn(4, 3, 16, 16)
    out = model(x)
    assert out.shape == (4, 7)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    norms = _norms(model)
    assert len(norms) == EXPECTED_NORMS[name]
    assert all(type(m) in (FilteredBatchNorm2d, FilteredBatchNorm1d) and m.threshold is None
               for m in norms)
    model.eval()
    assert model(x).shape == (4, 7)


@pytest.mark.parametrize("name", ALL)
def test_spec_builds_every_norm_and_frn_replaces_relu(name):
    fbn = _norms(_small(name, "fbn:threshold=3"))
    assert len(fbn) == EXPECTED_NORMS[name]
    assert all(isinstance(m, (FilteredBatchNorm1d, FilteredBatchNorm2d)) and m.threshold == 3.0
               for m in fbn)
    model = _small(name, "frn")
    frn = _norms(model)
    assert len(frn) == EXPECTED_NORMS[name]
    assert all(type(m) in (FilterResponseNorm1d, FilterResponseNorm2d) for m in frn)
    # FRN carries TLU: no ReLU/ReLU6 anywhere, not even after residual additions
    assert not any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in model.modules())
    # every FRN that is followed by an activation has its TLU inside it
    assert sum(m.activation == "tlu" for m in frn) > 0
    out = model(torch.randn(2, 3, 16, 16))
    assert torch.isfinite(out).all()
    assert _norms(_small(name, "none")) == []


def test_gn_brn_and_activation_override():
    gn = _norms(_small("resnet18", "gn:groups=4"))
    assert all(type(m) is FilteredGroupNorm and m.num_groups == 4 for m in gn)
    brn = _norms(_small("vgg", "brn"))
    assert all(type(m) in (BatchRenorm1d, BatchRenorm2d) for m in brn)
    gfrn = _norms(_small("mobilenetv2", "gfrn:groups=2"))
    assert all(type(m) is GroupFilterResponseNorm for m in gfrn)
    # "bn:act=tlu": BN with TLU in place of every ReLU, residual additions included
    model = _small("resnet18", "bn:act=tlu")
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert isinstance(model.layer1[0].act, TLU)


def test_resnet_norm_before_addition_has_no_activation():
    block = _small("resnet18", "frn").layer2[0]
    assert block.norm2.activation == "none" and block.shortcut[1].activation == "none"
    assert block.norm1.activation == "tlu"
    assert isinstance(block.act, TLU)
    block = _small("resnet18", "bn").layer2[0]
    assert type(block.norm2) is FilteredBatchNorm2d and isinstance(block.act, nn.ReLU)


def test_lenet_placements():
    def layout(placement):
        model = build_model("lenet5", norm="bn", placement=placement)
        return [(type(m).__name__, m.num_features) for m in _norms(model)]

    assert layout("all") == [("FilteredBatchNorm2d", 6), ("FilteredBatchNorm2d", 16),
                             ("FilteredBatchNorm1d", 120), ("FilteredBatchNorm1d", 84)]
    # [HA20] §IV.A: one norm between the last two fully connected layers
    assert layout("fc2") == layout("last") == [("FilteredBatchNorm1d", 84)]
    model = build_model("lenet5", norm="bn", placement="last")
    fc2, norm_act, fc3 = model.classifier[3], model.classifier[4], model.classifier[5]
    assert (fc2.out_features, fc3.in_features) == (84, 84) and fc2.bias is None
    assert isinstance(norm_act.norm, FilteredBatchNorm1d)
    assert model.classifier[1].bias is not None          # fc1 unnormalized keeps its bias
    assert layout("conv1") == [("FilteredBatchNorm2d", 6)]
    assert layout("conv1, fc2") == [("FilteredBatchNorm2d", 6), ("FilteredBatchNorm1d", 84)]
    assert layout("fc") == [("FilteredBatchNorm1d", 120), ("FilteredBatchNorm1d", 84)]
    assert layout("none") == []
    assert set(model_placements("lenet5")) >= {"all", "none", "fc2", "last", "conv1"}


def test_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # LeNet-5 without norms, by hand: conv 1·6·25+6, 6·16·25+16; fc 400·120+120, 120·84+84,
    # 84·10+10
    by_hand = (6 * 25 + 6) + (6 * 16 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + 850
    assert count(build_model("lenet5", norm="none")) == by_hand == 61706
    # with BN everywhere: the four normalized layers lose their bias, gain γ and β
    assert count(build_model("lenet5", norm="bn")) == by_hand - 226 + 2 * 226
    # ResNet-18 with the CIFAR stem at width 1 (the well-known 11.17M of CIFAR ResNet-18)
    assert count(build_model("resnet18", in_channels=3, image_size=32)) == 11_173_962


def test_cifar_stem_and_width():
    model = _small("resnet18")
    stem = model.stem[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1) and stem.padding == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert stem.out_channels == 8                              # 64 × 0.125
    assert build_model("vgg", width=2.0).features[0].out_channels == 64   # VGG-11's width


def test_init_follows_revisiting_seed():
    torch.manual_seed(0)
    model = build_model("alexnet", norm="none", width=0.5, in_channels=3, image_size=32)
    conv = model.features[3]                                    # 32 -> 64 channels, 5x5
    fan_in = conv.in_channels * 25
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)
    assert all(m.bias.abs().max() == 0 for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None)
    fc = model.classifier[1]
    assert fc.weight.abs().max() <= 1 / math.sqrt(fc.in_features)


def test_small_images_and_training_step():
    torch.manual_seed(0)
    model = build_model("lenet5", norm="fbn", image_size=8)       # 8×8 digits fit
    x, y = torch.randn(32, 1, 8, 8), torch.arange(32) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first = None
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first                              # it fits a tiny batch


def test_errors_list_valid_choices():
    with pytest.raises(ValueError, match=r"unknown model 'resnet20'; valid names: lenet5, "
                                         r"alexnet, vgg, resnet18, resnet34, resnet50, "
                                         r"preact_resnet18, mobilenetv2"):
        build_model("resnet20")
    with pytest.raises(ValueError, match=r"unknown placement 'fc3' for lenet5; valid "
                                         r"placements: all, none, conv, fc, last, conv1"):
        build_model("lenet5", placement="fc3")
    with pytest.raises(ValueError, match=r"unknown placement 'fc2' for resnet18; valid "
                                         r"placements: all"):
        build_model("resnet18", placement="fc2")
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'depth' for model 'vgg'; "
                                         r"valid options: width"):
        build_model("vgg", depth=16)
    with pytest.raises(ValueError, match=r"width must be a positive number, got 0"):
        build_model("vgg", width=0)
    with pytest.raises(ValueError, match=r"unknown norm 'batchnorm'"):
        build_model("lenet5", norm="batchnorm")
    with pytest.raises(ValueError, match=r"num_classes must be a positive int, got 0"):
        build_model("lenet5", num_classes=0)


def test_list_models_and_config():
    assert list(list_models()) == ALL + ["mlp"]
    model = build_model("lenet5", norm="fbn:threshold=3", placement="last")
    assert model.config["norm"] == "fbn:threshold=3" and model.config["placement"] == "last"


# ---- the fully connected net of the BN paper (Ioffe & Szegedy 2015, §4.1) --------------------

def _children(block):
    return [name for name, _ in block.named_children()]


def test_mlp_placements_order_the_norm_around_the_nonlinearity():
    pre = build_model("mlp", norm="bn")               # the paper's: BN on Wu + b
    assert len(pre.hidden) == 3
    for block in pre.hidden:
        assert _children(block) == ["linear", "norm", "act"]
        assert block.linear.out_features == 100 and isinstance(block.act, nn.Sigmoid)
        assert isinstance(block.norm, FilteredBatchNorm1d) and block.norm.threshold is None
    assert pre.hidden[0].linear.in_features == 784 and pre.classifier.out_features == 10
    post = build_model("mlp", norm="bn", placement="post", activation="relu", dropout=0.3)
    assert _children(post.hidden[1]) == ["linear", "act", "norm", "dropout"]
    assert isinstance(post.hidden[1].act, nn.ReLU) and post.hidden[1].dropout.p == 0.3
    plain = build_model("mlp", norm="none", depth=2, hidden=7, activation="tanh")
    assert [_children(b) for b in plain.hidden] == [["linear", "act"]] * 2
    assert build_model("mlp", norm="bn", placement="all").placement == "pre"
    frn = build_model("mlp", norm="frn")               # the spec's own activation: TLU
    assert isinstance(frn.hidden[0].act, TLU)
    x = torch.randn(5, 1, 28, 28)
    for model in (pre, post, plain, frn):
        assert model(x).shape == (5, 10)


def test_mlp_init_is_gaussian_at_the_fan_in_scale():
    torch.manual_seed(0)
    for scale in (0.1, 1.0, 10.0):
        model = build_model("mlp", norm="none", hidden=400, init_scale=scale)
        w = model.hidden[0].linear.weight           # 400 × 784 draws of N(0, (s/28)²)
        assert w.mean().abs() < 0.01 * scale
        assert abs(w.std().item() / (scale / 28.0) - 1) < 0.01
        assert torch.equal(model.hidden[0].linear.bias, torch.zeros(400))
        assert abs(model.classifier.weight.std().item() / (scale / 20.0) - 1) < 0.05


def test_mlp_and_stem_errors():
    with pytest.raises(ValueError, match=r"unknown placement 'conv' for mlp; valid placements: "
                                         r"pre"):
        build_model("mlp", placement="conv")
    with pytest.raises(ValueError, match=r"activation must be one of sigmoid, relu, tanh"):
        build_model("mlp", activation="gelu")
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\), got 1"):
        build_model("mlp", dropout=1)
    with pytest.raises(ValueError, match=r"init_scale must be a number > 0"):
        build_model("mlp", init_scale=0)
    with pytest.raises(ValueError, match=r"depth must be an int >= 1, got 0"):
        build_model("mlp", depth=0)
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'width' for model 'mlp'; valid "
                                         r"options: depth, hidden, activation, dropout, init_scale"):
        build_model("mlp", width=2)
    with pytest.raises(ValueError, match=r"stem must be 'cifar'"):
        build_model("resnet18", stem="tiny")


def test_imagenet_stem_downsamples_four_times():
    model = build_model("preact_resnet18", norm="bn", in_channels=3, width=0.125,
                        stem="imagenet")
    x = torch.randn(2, 3, 64, 64)
    assert model.stem(x).shape[-1] == 16 and model(x).shape == (2, 10)
    assert build_model("resnet18", width=0.125, stem="imagenet").stem[0].kernel_size == (7, 7)
