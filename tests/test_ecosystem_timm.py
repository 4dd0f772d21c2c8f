"""timm's tools on normlab's layers: docs/ecosystem.md's timm rows.

timm is an optional test dependency and does not install beside torch 2.13 (its torchvision
pins another torch); these tests skip without it. Checked with torch 2.14.1 (CPU),
torchvision 0.29.1 and timm 1.0.31 — run as docs/ecosystem.md says ("timm").
"""

from __future__ import annotations

import copy
import subprocess
import sys
from functools import partial

import pytest
import torch
from torch import nn

import normlab
from normlab.distributed import SyncBatchRenorm, SyncFilteredBatchNorm

timm = pytest.importorskip("timm")
from timm.layers import (  # noqa: E402  (after the skip)
    BatchNormAct2d,
    SyncBatchNormAct,
    convert_sync_batchnorm,
    freeze_batch_norm_2d,
)
from timm.models.resnet import BasicBlock, ResNet  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # timm's (noqa: E402)
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

_RENORM = {"renorm_start": 0, "r_max_full_at": 0, "d_max_full_at": 0}

# every normlab layer class a 2d timm model can take as norm_layer(num_channels)
NORM_LAYERS = {
    "FilteredBatchNorm2d": normlab.FilteredBatchNorm2d,
    "BatchRenorm2d": partial(normlab.BatchRenorm2d, **_RENORM),
    "SyncFilteredBatchNorm": SyncFilteredBatchNorm,
    "SyncBatchRenorm": SyncBatchRenorm,
    "AltScaleBatchNorm2d": partial(normlab.AltScaleBatchNorm2d, form="a2"),
    "ScaleCalibratedBatchNorm2d": normlab.ScaleCalibratedBatchNorm2d,
    "InputNorm": partial(normlab.InputNorm, threshold=2.0),
    "FilteredGroupNorm": lambda c, **kw: normlab.FilteredGroupNorm(2, c, **kw),
    "FilteredInstanceNorm2d": partial(normlab.FilteredInstanceNorm2d, affine=True),
    "FilterResponseNorm2d": normlab.FilterResponseNorm2d,
    "GroupFilterResponseNorm": lambda c, **kw: normlab.GroupFilterResponseNorm(2, c, **kw),
    "LayerFilterResponseNorm": normlab.LayerFilterResponseNorm,
}
BN_COMPATIBLE = ("FilteredBatchNorm2d", "BatchRenorm2d", "SyncFilteredBatchNorm",
                 "SyncBatchRenorm")  # torch BN's state-dict keys and eval forward


def _resnet(norm_layer=nn.BatchNorm2d) -> ResNet:
    torch.manual_seed(0)
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3, channels=(8, 16, 16, 16),
                  norm_layer=norm_layer)


def _images(n=4, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 64, 64, generator=g)  # 2 × 2 after the last stage
    x[0, :, 4, 4] = 50.0  # an outlier pixel
    return x


def _norms(model: nn.Module) -> list[nn.Module]:
    """The norm layers: bn1/bn2 and the downsample paths' (``downsample.1``); 13 here."""
    return [m for name, m in model.named_modules()
            if name.split(".")[-1].startswith("bn") or name.endswith("downsample.1")]


@pytest.mark.parametrize("name", NORM_LAYERS)
def test_norm_layer_builds_a_timm_resnet_of_normlab_layers(name):
    """Every norm of the model is the class asked for; train (forward, backward) and eval
    run; the batch layers load the torch-BN model's state dict (same keys)."""
    model = _resnet(NORM_LAYERS[name])
    reference = _norms(_resnet())
    norms = _norms(model)
    kind = type(NORM_LAYERS[name](4))
    assert len(norms) == len(reference) == 13 and all(type(m) is kind for m in norms)
    model.train()(_images()).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)
    assert torch.isfinite(model.eval()(_images(2, seed=1))).all()
    if name in BN_COMPATIBLE:
        model.load_state_dict(_resnet().state_dict())


@pytest.mark.parametrize("threshold", [None, 2.0])
def test_norm_layer_filtered_batch_norm_equals_torch_bn_without_filter(threshold):
    """threshold=None is torch's BatchNorm2d inside a timm model (train step and eval);
    with the filter the training output differs (the outlier pixel is filtered)."""
    theirs, ours = _resnet(), _resnet(partial(normlab.FilteredBatchNorm2d, threshold=threshold))
    ours.load_state_dict(theirs.state_dict())
    x = _images()
    same = torch.equal(theirs.train()(x), ours.train()(x))
    assert same == (threshold is None)
    if threshold is None:
        torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=0, atol=0)
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("threshold", [None, 2.0])
def test_norm_layer_filtered_layer_norm_in_a_timm_vit(threshold):
    """timm's ViT builds its LayerNorms with norm_layer(dim); threshold=None equals torch's
    LayerNorm (same weights)."""
    def vit(norm_layer):
        torch.manual_seed(0)
        return VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                                 num_classes=3, norm_layer=norm_layer)

    theirs = vit(partial(nn.LayerNorm, eps=1e-6))
    ours = vit(partial(normlab.FilteredLayerNorm, eps=1e-6, threshold=threshold))
    assert sum(isinstance(m, normlab.FilteredLayerNorm) for m in ours.modules()) == 3
    ours.load_state_dict(theirs.state_dict())
    x = _images(2)[:, :, :16, :16]
    if threshold is None:
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    ours(x).sum().backward()
    assert torch.isfinite(ours.blocks[0].norm1.weight.grad).all()


def test_norm_act_models_refuse_normlab_classes_by_name():
    """timm's BN+act models (EfficientNet, ...) map norm_layer to a fused norm+act class by
    name; a normlab class has none and timm says so (an AssertionError naming it)."""
    from timm.layers import get_norm_act_layer
    with pytest.raises(AssertionError, match="No equivalent norm_act layer for "
                                             "filteredbatchnorm2d"):
        get_norm_act_layer(normlab.FilteredBatchNorm2d, nn.ReLU)


# -- freeze_batch_norm_2d / FrozenBatchNorm2d ----------------------------------------------

def _trained_resnet(norm_layer) -> ResNet:
    model = _resnet(norm_layer)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.rand_like(p) * 0.1)
        for k in range(3):
            model.train()(_images(4, seed=10 + k))
    return model.eval()


@pytest.mark.parametrize("name", ["FilteredBatchNorm2d", "BatchRenorm2d"])
def test_freeze_batch_norm_2d_keeps_eval_outputs(name):
    """FBN and BRN are nn.BatchNorm2d whose eval forward is BN's, so timm's FrozenBatchNorm2d
    (the running statistics and affine, fixed) computes the same eval output."""
    model = _trained_resnet(NORM_LAYERS[name])
    x = _images(3, seed=7)
    expected = model(x)
    frozen = freeze_batch_norm_2d(copy.deepcopy(model))
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules()) == 13
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in frozen.modules())
    torch.testing.assert_close(frozen(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(frozen.train()(x), expected, rtol=1e-5, atol=1e-6)  # frozen


@pytest.mark.parametrize("name", ["SyncFilteredBatchNorm", "SyncBatchRenorm", "InputNorm",
                                  "AltScaleBatchNorm2d", "ScaleCalibratedBatchNorm2d",
                                  "FilteredGroupNorm", "FilterResponseNorm2d"])
def test_freeze_batch_norm_2d_leaves_other_classes_as_timm_leaves_them(name):
    """timm freezes exactly BatchNorm2d/SyncBatchNorm (and its norm+act forms); other norms —
    torch's BatchNorm1d/3d, GroupNorm, and these — stay trainable, unchanged."""
    model = _trained_resnet(NORM_LAYERS[name])
    state = copy.deepcopy(model.state_dict())
    frozen = freeze_batch_norm_2d(model)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules())
    torch.testing.assert_close(frozen.state_dict(), state, rtol=0, atol=0)


def test_unfreeze_batch_norm_2d_gives_plain_batch_norm():
    """FrozenBatchNorm2d keeps no filter: timm's unfreeze returns torch's BatchNorm2d (the
    documented limit; rebuild with normlab.convert to train filtered BN again)."""
    from timm.layers import unfreeze_batch_norm_2d
    frozen = freeze_batch_norm_2d(_trained_resnet(normlab.FilteredBatchNorm2d))
    thawed = unfreeze_batch_norm_2d(frozen)
    assert type(thawed.bn1) is nn.BatchNorm2d


# -- timm's convert_sync_batchnorm ----------------------------------------------------------

def _mixed() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 1), normlab.FilteredBatchNorm2d(4, threshold=1.5),
                         normlab.BatchRenorm2d(4, threshold=2.5), normlab.InputNorm(4),
                         nn.BatchNorm2d(4), BatchNormAct2d(4),
                         normlab.FilteredGroupNorm(2, 4))


def test_timm_convert_sync_batchnorm_keeps_normlab_methods():
    """import normlab routes timm's converter as torch's: FBN/InN → SyncFilteredBatchNorm,
    BRN → SyncBatchRenorm (threshold kept, parameters shared, outputs unchanged); timm's
    and torch's own layers convert as before; per-sample norms are left alone."""
    model = _mixed()
    with torch.no_grad():
        for k in range(2):
            model.train()(_images(4, seed=k))
    model.eval()
    x = _images(2, seed=3)
    expected = model(x)
    weight = model[1].weight
    converted = convert_sync_batchnorm(model)
    kinds = [type(m) for m in converted]
    assert kinds == [nn.Conv2d, SyncFilteredBatchNorm, SyncBatchRenorm, SyncFilteredBatchNorm,
                     nn.SyncBatchNorm, SyncBatchNormAct, normlab.FilteredGroupNorm]
    assert converted[1].threshold == 1.5 and converted[2].threshold == 2.5
    assert converted[1].weight is weight
    torch.testing.assert_close(converted(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["AltScaleBatchNorm2d", "ScaleCalibratedBatchNorm2d"])
def test_timm_convert_sync_batchnorm_tells_for_the_alternatives(name):
    with pytest.raises(ValueError, match=f"convert_sync has no synchronized version of {name}"):
        convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), NORM_LAYERS[name](4)))


@pytest.mark.parametrize("order", ["import timm.layers, normlab",
                                   "import normlab, timm.layers",
                                   "from timm.layers import convert_sync_batchnorm; import normlab"])
def test_timm_converter_rule_holds_in_any_import_order(order):
    """normlab installs its rule when timm is already imported, and on timm's import
    otherwise (an import hook on timm.layers.norm_act)."""
    script = (f"{order}\nimport sys, torch, timm.layers as L\n"
              "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), normlab.FilteredBatchNorm2d(4))\n"
              "print(type(L.convert_sync_batchnorm(m)[1]).__name__)\n")
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", script],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["SyncFilteredBatchNorm"]
