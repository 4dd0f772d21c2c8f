"""Model surgery: convert() swaps norms in any model; fuse_for_inference() folds them."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab
from normlab.convert import convert, fuse_for_inference


class Block(nn.Module):
    """ResNet basic block: attribute pattern conv → bn → relu with a *shared* ReLU."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = Block(8, 8)
        self.layer2 = Block(8, 16, stride=2)
        self.fc = nn.Linear(16, 5)
        self.head_bn = nn.BatchNorm1d(5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head_bn(self.fc(x.mean((2, 3))))


def _trained_model(seed=0):
    torch.manual_seed(seed)
    model = TinyResNet()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 8, 8) * 2 + 1)
    return model


def _bn_count(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_bn_to_unfiltered_fbn_is_identical_train_and_eval():
    model = _trained_model()
    ref = copy.deepcopy(model)
    new, report = convert(model, "fbn:threshold=none")
    assert new is model and _bn_count(new) == 0
    assert len(report.replaced) == 7 and not report.unconverted
    assert {b for _, _, b in report.replaced} == {"FilteredBatchNorm2d", "FilteredBatchNorm1d"}
    assert isinstance(new.layer2.downsample[1], normlab.FilteredBatchNorm2d)
    assert new.layer1.bn1.threshold is None
    x = torch.randn(6, 3, 8, 8)
    ref.eval(), new.eval()
    torch.testing.assert_close(new(x), ref(x), rtol=0, atol=0)
    ref.train(), new.train()
    torch.testing.assert_close(new(x), ref(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(new.layer2.bn2.running_var, ref.layer2.bn2.running_var)
    assert int(new.stem[1].num_batches_tracked) == int(ref.stem[1].num_batches_tracked) == 4


def test_convert_keeps_dtype_device_mode_and_options():
    model = _trained_model().double().eval()
    model.layer1.bn1.eps = 1e-3
    model.layer1.bn1.momentum = 0.3
    new, _ = convert(model, "fbn:threshold=2", inplace=False)
    assert _bn_count(model) == 7  # inplace=False leaves the original alone
    bn = new.layer1.bn1
    assert bn.weight.dtype == torch.float64 and bn.running_mean.dtype == torch.float64
    assert not bn.training and (bn.eps, bn.momentum, bn.threshold) == (1e-3, 0.3, 2.0)
    torch.testing.assert_close(bn.weight, model.layer1.bn1.weight)


def test_group_norm_keeps_groups_and_layer_norm_rules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 6), nn.LayerNorm(6))
    with torch.no_grad():
        model[1].weight.normal_()
        model[5].bias.normal_()
    x = torch.randn(3, 3, 6, 6)
    ref = model(x)
    new, report = convert(copy.deepcopy(model), "fgn:threshold=none")
    assert new[1].num_groups == 2
    assert report.unconverted[0][:2] == ("5", "LayerNorm")
    assert "only the specs 'ln' and 'fln'" in report.unconverted[0][2]
    torch.testing.assert_close(new(x), ref)
    new, report = convert(copy.deepcopy(model), "fln:threshold=none", include=(nn.LayerNorm,))
    assert isinstance(new[5], normlab.FilteredLayerNorm) and len(report.replaced) == 1
    torch.testing.assert_close(new(x), ref)


def test_example_input_sets_rank_for_rank_free_layers():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.GroupNorm(2, 4))
    new, _ = convert(copy.deepcopy(model), "bn", example_input=torch.randn(2, 2, 9))
    assert isinstance(new[1], normlab.FilteredBatchNorm1d)
    new, _ = convert(copy.deepcopy(model), "bn")
    assert isinstance(new[1], normlab.FilteredBatchNorm2d)  # default dim=2


def _relu_calls(model, x):
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in model.modules()
             if isinstance(m, nn.ReLU)]
    model(x)
    for h in hooks:
        h.remove()
    return len(calls)


def test_frn_replaces_following_relus():
    model = _trained_model()
    x = torch.randn(4, 3, 8, 8)
    assert _relu_calls(model, x) == 5  # stem + 2 per block
    new, report = convert(copy.deepcopy(model), "frn", replace_activation=True)
    # the ReLU after each norm is gone (TLU takes its place); post-residual ReLUs stay
    assert _relu_calls(new, x) == 2
    assert isinstance(new.stem[2], nn.Identity)
    assert new.layer1.bn1.activation == "tlu" and new.layer1.bn2.activation == "none"
    assert new.layer2.downsample[1].activation == "none" and new.head_bn.activation == "none"
    removed = {p for p, _ in report.activations_removed}
    assert removed == {"stem.2", "layer1.relu", "layer2.relu"}
    assert isinstance(new.layer1, torch.fx.GraphModule)  # shared ReLU → forward rewritten
    y = new(x)
    y.sum().backward()
    assert new.layer1.bn1.tau.grad is not None
    # without replace_activation: TLU everywhere, ReLUs kept, and the report says so
    kept, report = convert(copy.deepcopy(model), "frn")
    assert _relu_calls(kept, x) == 5 and kept.layer1.bn2.activation == "tlu"
    assert any("replace_activation" in n for n in report.notes)


def test_unshared_relu_attribute_and_functional_relu():
    class Net(nn.Module):
        def __init__(self, functional):
            super().__init__()
            self.functional = functional
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.act = nn.ReLU()

        def forward(self, x):
            y = self.bn(self.conv(x))
            return F.relu(y) if self.functional else self.act(y)

    net, report = convert(Net(False), "frn", replace_activation=True)
    assert type(net) is Net and isinstance(net.act, nn.Identity)  # used once: class kept
    assert report.activations_removed == [("act", "attribute ReLU after bn -> Identity")]
    net, report = convert(Net(True), "frn", replace_activation=True)
    assert isinstance(net, torch.fx.GraphModule)  # F.relu call: forward rewritten
    assert "relu" not in net.code and len(report.activations_removed) == 1
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(net(x), net.bn(net.conv(x)))


def test_frn_to_bn_keeps_the_tlu():
    torch.manual_seed(0)
    frn = normlab.FilterResponseNorm2d(4)
    with torch.no_grad():
        frn.tau.normal_()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), frn)
    new, report = convert(model, "bn")
    assert isinstance(new[1], normlab.NormActivation)
    assert isinstance(new[1].act, normlab.TLU)
    torch.testing.assert_close(new[1].act.tau, frn.tau)
    assert any("kept after the new layer" in n for n in report.notes)


def test_convert_errors():
    model = _trained_model()
    with pytest.raises(ValueError, match="unknown norm 'nope'"):
        convert(model, "nope")
    with pytest.raises(ValueError, match="unknown option 'thresh' for norm 'fbn'"):
        convert(model, "fbn:thresh=2")
    with pytest.raises(TypeError, match="include must be a non-empty tuple of nn.Module classes"):
        convert(model, "bn", include=("BatchNorm2d",))
    with pytest.raises(TypeError, match="model must be an nn.Module, got dict"):
        convert({}, "bn")
    assert _bn_count(model) == 7  # nothing changed by the failed calls
    _, report = convert(nn.Linear(2, 2), "bn")
    assert report.notes == ["no layer of the included types was found"]


def _real_modules(model):
    return sum(1 for m in model.modules() if not isinstance(m, nn.Identity))


def test_fuse_equal_outputs_and_fewer_modules():
    model = _trained_model()
    x = torch.randn(5, 3, 8, 8)
    model.train()  # fuse works on a copy in eval mode and leaves the original alone
    fused, report = fuse_for_inference(model, return_report=True)
    assert model.training and _bn_count(model) == 7
    assert not fused.training and _bn_count(fused) == 0
    assert len(report.folded) == 7
    assert _real_modules(fused) == _real_modules(model) - 7
    model.eval()
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_fuse_normlab_layers_and_input_norm():
    torch.manual_seed(0)
    model = nn.Sequential(
        normlab.InputNorm(3, gamma=0.5), nn.Conv2d(3, 6, 3),             # unpadded: folds
        normlab.FilteredBatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), normlab.BatchRenorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 1), normlab.AltScaleBatchNorm2d(6, form="a2"),
        nn.Conv2d(6, 6, 1), normlab.create_norm("iebn_minus", 6),
        nn.Conv2d(6, 6, 1), nn.GroupNorm(2, 6),                          # per-sample: kept
        nn.Conv2d(6, 6, 1), normlab.create_norm("rbn", 6),               # sample-dependent
        nn.Flatten(), nn.Linear(6 * 4 * 4, 4))
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if not isinstance(m, (nn.Conv2d, nn.Linear)):
                with torch.no_grad():
                    p.uniform_(0.5, 1.5)
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 3, 6, 6) * 255)
    model.eval()
    x = torch.rand(4, 3, 6, 6) * 255
    fused, report = fuse_for_inference(model, return_report=True)
    kinds = {type(m).__name__ for m in fused}
    assert kinds == {"Conv2d", "ReLU", "GroupNorm", "ScaleCalibratedBatchNorm2d", "Flatten",
                     "Linear"}
    assert len(report.folded) == 5 and ("0", "1") in report.folded
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-4)


def test_fuse_keeps_input_norm_before_padded_conv_and_folds_into_linear():
    torch.manual_seed(0)
    model = nn.Sequential(normlab.InputNorm(3), nn.Conv2d(3, 4, 3, padding=1))
    model(torch.randn(8, 3, 5, 5) + 3)
    fused = fuse_for_inference(model)
    assert isinstance(fused[0], normlab.InputNorm)
    mlp = nn.Sequential(normlab.InputNorm(5), nn.Linear(5, 3))
    mlp(torch.randn(16, 5) * 4 + 2)
    mlp.eval()
    fused = fuse_for_inference(mlp)
    assert len(fused) == 1
    x = torch.randn(7, 5) * 4 + 2
    torch.testing.assert_close(fused(x), mlp(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fuse_for_inference(None)
