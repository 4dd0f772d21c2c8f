"""Model surgery on shared modules, tied weights and TorchScript: exact, or refused with a
reason — never a silently wrong model (issue 12)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.convert import convert
from normlab.fuse import fuse_for_inference


def _trained_bns(model: nn.Module) -> nn.Module:
    """Random running statistics and affine parameters, eval mode: folding is not trivial."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=gen) - 0.5)
    return model.eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_fuse_refuses_a_conv_used_twice():
    conv = nn.Conv2d(3, 3, 3, padding=1)
    model = _trained_bns(nn.Sequential(conv, nn.BatchNorm2d(3), nn.ReLU(), conv,
                                       nn.BatchNorm2d(3)))
    x = torch.randn(2, 3, 8, 8)
    fused, report = fuse_for_inference(model, return_report=True)
    assert _rel_err(fused(x), model(x)) < 1e-6  # was 0.2-2 when folded once per use
    assert report.folded == []
    assert [p for p, _ in report.kept] == ["1", "4"]
    assert all("used at several places" in reason for _, reason in report.kept)


def test_fuse_refuses_tied_weights():
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    model = _trained_bns(nn.Sequential(first, nn.BatchNorm1d(4), second, nn.BatchNorm1d(4)))
    x = torch.randn(5, 4)
    fused, report = fuse_for_inference(model, return_report=True)
    assert _rel_err(fused(x), model(x)) < 1e-6
    assert report.folded == []
    assert {p for p, _ in report.kept} == {"1", "3"}
    assert all("shared (tied)" in reason for _, reason in report.kept)


class _UsesWeightTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + F.conv2d(x, self.conv.weight)


class _SharedAcrossParents(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.other = nn.Sequential(self.conv, nn.BatchNorm2d(3))

    def forward(self, x):
        return self.bn(self.conv(x)) + self.other(x)


@pytest.mark.parametrize("make, reason", [(_UsesWeightTwice, "uses the parameters"),
                                          (_SharedAcrossParents, "used at several places")])
def test_fuse_refuses_attribute_patterns_with_shared_weights(make, reason):
    model = _trained_bns(make())
    x = torch.randn(2, 3, 5, 5)
    fused, report = fuse_for_inference(model, return_report=True)
    assert _rel_err(fused(x), model(x)) < 1e-6
    assert report.folded == []
    assert any(reason in r for _, r in report.kept), report


def test_fuse_still_folds_a_block_shared_as_a_whole():
    block = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
    model = _trained_bns(nn.Sequential(block, block))  # the same conv+BN twice: one fold fits
    x = torch.randn(2, 3, 6, 6)
    fused, report = fuse_for_inference(model, return_report=True)
    assert _rel_err(fused(x), model(x)) < 1e-6
    assert report.folded == [("0.1", "0.0")] and fused[0] is fused[1]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())


def test_convert_replaces_a_norm_at_every_place_it_is_registered():
    bn = nn.BatchNorm2d(3)
    model = _trained_bns(nn.Sequential(nn.Conv2d(3, 3, 1), bn, nn.Conv2d(3, 3, 1), bn))
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)
    model, report = convert(model, "fbn:threshold=none")
    assert type(model[1]).__name__ == "FilteredBatchNorm2d" and model[1] is model[3]
    assert [p for p, _, _ in report.replaced] == ["1", "3"] and not report.unconverted
    assert str(report).startswith("convert to 'fbn:threshold=none': 2 replaced")
    assert any("one module registered at 2 places" in n for n in report.notes)
    torch.testing.assert_close(model(x), expected)  # carried state, same formula


def test_convert_keeps_a_shared_block_shared():
    block = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    model = nn.Sequential(block, nn.ReLU(), block)
    model, report = convert(model, "gn:groups=3")
    assert model[0] is model[2] and type(model[0][1]).__name__ == "FilteredGroupNorm"
    assert [p for p, _, _ in report.replaced] == ["0.1", "2.1"]


def test_convert_shared_norm_removes_relus_only_if_every_place_has_one():
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(bn, nn.ReLU(), bn)  # a ReLU after the first place only
    model, report = convert(model, "frn", replace_activation=True)
    assert model[0] is model[2] and isinstance(model[1], nn.ReLU)
    assert report.activations_removed == []
    assert getattr(model[0], "activation", "none") == "none"  # built with act=none


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("how", ["script", "trace", "nested"])
def test_surgery_refuses_torchscript(how):
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).eval()
    if how == "script":
        model = torch.jit.script(model)
    elif how == "trace":
        model = torch.jit.trace(model, torch.randn(1, 3, 4, 4))
    else:
        model = nn.Sequential(torch.jit.script(model), nn.ReLU())
    for tool in (lambda m: convert(m, "fbn"), fuse_for_inference):
        with pytest.raises(TypeError, match="TorchScript") as info:
            tool(model)
        assert "\n" not in str(info.value)
