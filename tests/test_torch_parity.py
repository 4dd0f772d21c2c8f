"""Reported drop-in gaps against torch 2.13 (issues 12 and 16), each checked against torch.

torch's own modules are the oracle: ``threshold=None`` must equal them bit for bit, the
filtered layers must follow the same API, state-dict and error rules.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import normlab
import normlab.functional as NF
from normlab import (
    BatchRenorm2d,
    FilteredBatchNorm1d,
    FilteredBatchNorm2d,
    FilteredGroupNorm,
    FilteredInstanceNorm1d,
    FilteredInstanceNorm2d,
    FilteredLayerNorm,
)


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# -- bias= in torch 2.13's argument order ------------------------------------------------

@pytest.mark.parametrize(("ours", "theirs", "shape"), [
    (lambda: FilteredBatchNorm1d(10, bias=False, threshold=None),
     lambda: nn.BatchNorm1d(10, bias=False), (4, 10)),
    (lambda: FilteredGroupNorm(3, 6, 1e-3, bias=False, threshold=None),
     lambda: nn.GroupNorm(3, 6, 1e-3, bias=False), (4, 6, 5)),
    (lambda: FilteredInstanceNorm2d(3, 1e-3, 0.3, affine=True, bias=False, threshold=None),
     lambda: nn.InstanceNorm2d(3, 1e-3, 0.3, affine=True, bias=False), (4, 3, 6, 6)),
    (lambda: FilteredLayerNorm([2, 2, 5], 1e-3, True, False, threshold=None),
     lambda: nn.LayerNorm([2, 2, 5], 1e-3, True, False), (4, 2, 2, 5)),
])
def test_bias_false_is_torchs(ours, theirs, shape):
    torch.manual_seed(0)
    a, b = ours(), theirs()
    assert a.bias is None and "bias" in dict(a.named_parameters(remove_duplicate=False)) or \
        a.bias is None
    assert list(a.state_dict()) == list(b.state_dict())
    with torch.no_grad():
        a.weight.uniform_(0.5, 2)
        b.weight.copy_(a.weight)
    x = torch.randn(shape) * 3 + 1
    assert torch.equal(a(x), b(x))
    assert "bias=False" in repr(a) and repr(a).startswith(repr(b).split("(")[0].replace(
        type(b).__name__, type(a).__name__))


@pytest.mark.parametrize("threshold", [None, 2.0])
def test_filtered_layer_norm_without_bias_builds_and_trains(threshold):
    norm = FilteredLayerNorm([2, 2, 5], bias=False, threshold=threshold)
    assert norm.bias is None and norm.weight.shape == (2, 2, 5)
    y = norm(torch.randn(4, 2, 2, 5))
    y.sum().backward()
    assert norm.weight.grad is not None


def test_convert_layer_norm_without_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6, bias=False))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2)
    x = torch.randn(5, 4)
    new, report = normlab.convert(copy.deepcopy(model), "fln:threshold=none",
                                  include=(nn.LayerNorm,))
    assert isinstance(new[1], FilteredLayerNorm) and new[1].bias is None
    assert len(report.replaced) == 1 and not report.unconverted
    torch.testing.assert_close(new(x), model(x), rtol=0, atol=0)


# -- state dicts: version 2, old checkpoints, the meta device ----------------------------

@pytest.mark.parametrize("cls", [FilteredBatchNorm2d, BatchRenorm2d, FilteredInstanceNorm2d])
def test_state_dict_version_is_torchs(cls):
    kwargs = {"track_running_stats": True} if cls is FilteredInstanceNorm2d else {}
    assert cls(3, **kwargs).state_dict()._metadata[""]["version"] == 2


@pytest.mark.parametrize("version", [None, 1])
def test_torch_1x_checkpoint_without_num_batches_tracked_loads(version):
    """A BN checkpoint from before torch 0.4.1 has no num_batches_tracked: torch fills 0."""
    torch.manual_seed(0)
    old = nn.BatchNorm2d(3)
    old.train()(torch.randn(8, 3, 4, 4) * 2 + 1)
    state = old.state_dict()
    del state["num_batches_tracked"]
    if version is None:
        del state._metadata[""]["version"]
    else:
        state._metadata[""]["version"] = version
    for count in (0, 7):  # torch keeps the module's own count (0 when freshly built)
        reference = nn.BatchNorm2d(3)
        reference.num_batches_tracked.fill_(count)
        reference.load_state_dict(state)
        for cls in (FilteredBatchNorm2d, BatchRenorm2d):
            module = cls(3)
            module.num_batches_tracked.fill_(count)
            module.load_state_dict(state)  # strict
            assert int(module.num_batches_tracked) == int(reference.num_batches_tracked) == count
            assert torch.equal(module.running_var, old.running_var)


def test_state_dicts_load_both_ways_with_torch():
    torch.manual_seed(0)
    theirs = nn.BatchNorm2d(3, bias=False)
    theirs(torch.randn(8, 3, 4, 4) * 2 + 1)
    ours = FilteredBatchNorm2d(3, bias=False, threshold=None)
    ours.load_state_dict(theirs.state_dict())
    _same_state(ours, theirs)
    back = nn.BatchNorm2d(3, bias=False)
    back.load_state_dict(ours.state_dict())
    _same_state(back, theirs)


@pytest.mark.parametrize("cls", [FilteredBatchNorm2d, BatchRenorm2d])
def test_meta_device_and_assign_leave_nothing_on_meta(cls):
    with torch.device("meta"):
        module = cls(3)
        reference = nn.BatchNorm2d(3)
    module.load_state_dict({}, strict=False, assign=True)
    reference.load_state_dict({}, strict=False, assign=True)
    assert module.num_batches_tracked.device == reference.num_batches_tracked.device \
        == torch.device("cpu")
    with torch.device("meta"):
        module = cls(3)
    module.load_state_dict(cls(3).state_dict(), assign=True)
    assert all(t.device.type == "cpu" for t in module.state_dict().values())


# -- InstanceNorm semantics --------------------------------------------------------------

@pytest.mark.parametrize("threshold", [None, 2.0])
@pytest.mark.parametrize("momentum", [0.3, None])
def test_instance_norm_running_stats_follow_torch(threshold, momentum):
    torch.manual_seed(0)
    theirs = nn.InstanceNorm1d(3, momentum=momentum, track_running_stats=True)
    ours = FilteredInstanceNorm1d(3, momentum=momentum, track_running_stats=True,
                                  threshold=threshold)
    for _ in range(3):
        x = torch.randn(4, 3, 50) * 2 + 1
        y = ours(x)
        if threshold is None:
            assert torch.equal(y, theirs(x))
        else:
            theirs(x)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 0
    if momentum is None:  # torch passes momentum 0.0: the running stats never move
        assert torch.equal(ours.running_mean, torch.zeros(3))
        assert torch.equal(ours.running_var, torch.ones(3))
    elif threshold is None:
        _same_state(ours, theirs)
    else:  # clean Gaussian data: the filtered running stats are near torch's
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, atol=0.1, rtol=0)


@pytest.mark.parametrize("threshold", [None, 2.0])
@pytest.mark.parametrize("shape", [(2, 3, 1), (3, 1), (2, 3, 1, 1)])
def test_instance_norm_one_spatial_element_raises_as_torch(threshold, shape):
    cls = FilteredInstanceNorm1d if len(shape) < 4 else FilteredInstanceNorm2d
    torch_cls = nn.InstanceNorm1d if len(shape) < 4 else nn.InstanceNorm2d
    x = torch.randn(shape)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        torch_cls(3)(x)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        cls(3, threshold=threshold)(x)
    with pytest.raises(ValueError, match="more than 1 spatial element"):  # eval, no stats
        cls(3, threshold=threshold).eval()(x)
    tracked = cls(3, track_running_stats=True, threshold=threshold).eval()
    torch.testing.assert_close(tracked(x), torch_cls(3, track_running_stats=True).eval()(x))


@pytest.mark.parametrize("threshold", [None, 2.0])
def test_group_norm_one_value_checks_follow_torch(threshold):
    """torch GN refuses only N·C/G·spatial == 1; several samples of one value give β."""
    x = torch.randn(1, 4)
    with pytest.raises(ValueError, match="more than 1 value per"):
        nn.GroupNorm(4, 4)(x)
    with pytest.raises(ValueError, match="more than 1 value per"):
        FilteredGroupNorm(4, 4, threshold=threshold)(x)
    x = torch.randn(3, 4)
    ours = FilteredGroupNorm(4, 4, threshold=threshold)
    torch.testing.assert_close(ours(x), nn.GroupNorm(4, 4)(x), atol=1e-4, rtol=0)


def test_instance_norm_channel_mismatch_warns_without_state_as_torch():
    x = torch.randn(2, 4, 6)
    with pytest.warns(UserWarning, match="does not match num_features"):
        y = FilteredInstanceNorm1d(3, threshold=None)(x)
    assert torch.equal(y, nn.InstanceNorm1d(4)(x))
    with pytest.raises(ValueError, match="built for 3 channels"):
        FilteredInstanceNorm1d(3, affine=True)(x)


# -- zero-size batches (issue 12) -----------------------------------------------------------

ZERO_SIZE = [
    (lambda: FilteredBatchNorm2d(5), lambda: nn.BatchNorm2d(5), (0, 5, 2, 2)),
    (lambda: FilteredBatchNorm1d(5, 1e-3, 0.3, False), lambda: nn.BatchNorm1d(5, 1e-3, 0.3, False),
     (0, 5, 9)),
    (lambda: FilteredBatchNorm2d(5, momentum=None), lambda: nn.BatchNorm2d(5, momentum=None),
     (0, 5, 2, 2)),
    (lambda: FilteredBatchNorm2d(5), lambda: nn.BatchNorm2d(5), (3, 5, 0, 2)),
    (lambda: BatchRenorm2d(5), lambda: nn.BatchNorm2d(5, momentum=0.01), (0, 5, 2, 2)),
    (lambda: FilteredGroupNorm(2, 4), lambda: nn.GroupNorm(2, 4), (0, 4, 3, 3)),
    (lambda: FilteredGroupNorm(2, 4), lambda: nn.GroupNorm(2, 4), (2, 4, 0, 3)),
    (lambda: FilteredLayerNorm(5), lambda: nn.LayerNorm(5), (0, 5)),
    (lambda: FilteredInstanceNorm2d(3, affine=True), None, (0, 3, 4, 4)),
    (lambda: FilteredInstanceNorm2d(3, track_running_stats=True, threshold=None), None,
     (0, 3, 4, 4)),
    (lambda: normlab.FilterResponseNorm2d(3), None, (0, 3, 4, 4)),
    (lambda: normlab.GroupFilterResponseNorm(2, 4, threshold=2.0), None, (0, 4, 3)),
]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("ours", "theirs", "shape"), ZERO_SIZE)
def test_zero_size_batches_return_empty_as_torch(ours, theirs, shape, training):
    module = ours().train(training)
    x = torch.randn(shape, requires_grad=True)
    y = module(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in module.parameters():
        assert p.grad is None or torch.equal(p.grad, torch.zeros_like(p))
    if theirs is not None:
        reference = theirs().train(training)
        reference(torch.randn(shape))
        for name, buf in reference.named_buffers():
            assert torch.equal(getattr(module, name), buf), name  # nbt + 1, stats unchanged


# -- strictness: eps, thresholds, spec values ---------------------------------------------

@pytest.mark.parametrize("build", [
    lambda eps: FilteredBatchNorm2d(3, eps=eps),
    lambda eps: BatchRenorm2d(3, eps=eps),
    lambda eps: FilteredGroupNorm(1, 3, eps=eps, threshold=None),
    lambda eps: FilteredLayerNorm(3, eps=eps),
    lambda eps: FilteredInstanceNorm2d(3, eps=eps),
    lambda eps: normlab.FilterResponseNorm2d(3, eps=eps),
    lambda eps: normlab.AltScaleBatchNorm2d(3, eps=eps),
    lambda eps: normlab.InputNorm(3, eps=eps),
])
@pytest.mark.parametrize("eps", [0, 0.0, -1e-5, float("nan"), float("inf")])
def test_eps_must_be_positive(build, eps):
    with pytest.raises(ValueError, match=r"eps must be positive \(> 0\)"):
        build(eps)


def test_frn_with_learned_eps_may_have_zero_constant_eps():
    norm = normlab.FilterResponseNorm2d(3, eps=0.0, learnable_eps=True)
    assert torch.isfinite(norm(torch.zeros(2, 3, 4, 4))).all()


def test_nan_threshold_refused_everywhere():
    with pytest.raises(ValueError, match="threshold must be > 0"):
        FilteredBatchNorm2d(3, threshold=float("nan"))
    with pytest.raises(ValueError, match="must be a number, not NaN"):
        normlab.create_norm("fbn:threshold=nan", 3)
    with pytest.raises(ValueError, match="must be a number, not NaN"):
        normlab.parse_spec("frn:threshold=nan")
    with pytest.raises(ValueError, match="threshold must be > 0 or None, got nan"):
        NF.filtered_moments(torch.randn(4, 3), (0,), math.nan)


@pytest.mark.parametrize(("spec", "match"), [
    ("fbn:affine=maybe", r"option affine='maybe' in spec 'fbn:affine=maybe' is a boolean"),
    ("gn:affine=2", r"is a boolean: use true or false"),
    ("frn:learnable_eps=yes please", r"is a boolean"),
    ("fbn:eps=small", r"option eps='small' .* must be a number"),
    ("brn:renorm_start=10.5", r"must be an integer"),
])
def test_spec_values_are_typed(spec, match):
    with pytest.raises(ValueError, match=match):
        normlab.parse_spec(spec)


def test_spec_values_still_parse():
    assert normlab.parse_spec("fbn:affine=false,threshold=none,eps=1e-3,momentum=none") == (
        "fbn", {"affine": False, "threshold": None, "eps": 1e-3, "momentum": None})
    assert normlab.parse_spec("gn:groups=4")[1] == {"groups": 4}
    assert normlab.parse_spec("inputnorm:activation=tanh")[1] == {"activation": "tanh"}


@pytest.mark.parametrize("value", ["yes", 2, None, 1.0])
def test_boolean_arguments_are_booleans(value):
    with pytest.raises(TypeError, match="affine must be True or False"):
        FilteredBatchNorm2d(3, affine=value)
