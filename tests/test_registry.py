"""The registry: names and spec strings build the right layers; bad specs are explained."""

import pytest
import torch
from torch import nn

import normlab
from normlab.registry import default_groups, parse_spec, spec_activation


def test_every_registered_norm_builds_and_runs_in_each_dim():
    for name in normlab.list_norms():
        for dim, shape in ((1, (4, 8)), (2, (4, 8, 3, 3)), (3, (2, 8, 2, 2, 2))):
            layer = normlab.create_norm(name, 8, dim=dim)
            y = layer(torch.randn(*shape))
            assert y.shape == shape, name


def test_spec_options_reach_the_layer():
    fbn = normlab.create_norm("fbn:threshold=3,gaussian_consistent=true", 16)
    assert isinstance(fbn, normlab.FilteredBatchNorm2d)
    assert fbn.threshold == 3.0 and fbn.gaussian_consistent is True
    assert normlab.create_norm("bn", 16).threshold is None
    assert normlab.create_norm("fbn:threshold=none", 16).threshold is None
    gn = normlab.create_norm("gn:groups=8", 16)
    assert isinstance(gn, normlab.FilteredGroupNorm) and gn.num_groups == 8 and gn.threshold is None
    frn = normlab.create_norm("frn:learnable_eps=true", 16)
    assert isinstance(frn, normlab.FilterResponseNorm2d) and frn.learnable_eps
    assert frn.activation == "tlu"
    assert isinstance(normlab.create_norm("frn", 16, dim=1), normlab.FilterResponseNorm1d)
    assert isinstance(normlab.create_norm("bn", 16, dim=3), normlab.FilteredBatchNorm3d)
    assert normlab.create_norm("ln", 16).num_groups == 1
    assert normlab.create_norm("in", 16).num_groups == 16
    assert normlab.create_norm("bn:gamma_init=0.1", 4).weight.data.tolist() == pytest.approx([0.1] * 4)
    assert normlab.create_norm("fbn", 4, threshold=5).threshold == 5.0


def test_act_option_puts_tlu_after_any_norm():
    layer = normlab.create_norm("bn:act=tlu", 8)
    assert isinstance(layer, normlab.NormActivation)
    assert isinstance(layer.act, normlab.TLU) and isinstance(layer.norm, normlab.FilteredBatchNorm2d)
    assert normlab.create_norm("frn:act=relu", 8).activation == "relu"
    assert spec_activation("frn") == "tlu"
    assert spec_activation("frn:act=none") is None
    assert spec_activation("gn") is None


def test_create_norm_act_replaces_relu_only_for_specs_with_activation():
    block = normlab.create_norm_act("bn", 8)
    assert isinstance(block.act, nn.ReLU)
    frn = normlab.create_norm_act("frn", 8)
    assert isinstance(frn, normlab.FilterResponseNorm2d)
    assert isinstance(normlab.create_norm_act("none", 8).act, nn.ReLU)


def test_default_groups():
    assert default_groups(64) == 32
    assert default_groups(48) == 24
    assert default_groups(6) == 6


@pytest.mark.parametrize(("spec", "match"), [
    ("foo", r"unknown norm 'foo' in spec 'foo'; valid names: .*bn.*fbn"),
    ("fbn:tresh=2", r"unknown option 'tresh' for norm 'fbn' .* valid options: .*threshold"),
    ("fbn:threshold", r"option 'threshold' in spec 'fbn:threshold' needs the form key=value"),
    ("bn:act=gelu", r"act must be one of"),
    ("", r"non-empty string"),
    ("gn:groups=5", r"groups=5 does not divide num_channels=8"),
    ("fbn:threshold=-1", r"threshold must be > 0"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        normlab.create_norm(spec, 8)


def test_parse_spec_values_and_other_errors():
    assert parse_spec("fbn:threshold=2.5,affine=false") == ("fbn", {"threshold": 2.5, "affine": False})
    with pytest.raises(ValueError, match="dim must be 1, 2 or 3"):
        normlab.create_norm("bn", 8, dim=4)
    with pytest.raises(ValueError, match="num_channels must be a positive int, got 0"):
        normlab.create_norm("bn", 0)
    with pytest.raises(ValueError, match="already registered"):
        normlab.register_norm("bn", lambda c, d: nn.Identity(), description="x")
