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
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m).__module__.startswith("torch")
               for m in model.modules())


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


def test_fuse_input_norm_into_linear_and_type_errors():
    torch.manual_seed(0)
    mlp = nn.Sequential(normlab.InputNorm(5), nn.Linear(5, 3))
    mlp(torch.randn(16, 5) * 4 + 2)
    mlp.eval()
    fused = fuse_for_inference(mlp)
    assert len(fused) == 1
    x = torch.randn(7, 5) * 4 + 2
    torch.testing.assert_close(fused(x), mlp(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fuse_for_inference(None)


# -- convert: what is carried into the revisiting-BN targets ----------------------------------

_RUNNING = {"running_mean", "running_var", "num_batches_tracked"}
# spec: (tensors equal to the old BN's, tensors computed from it, tensors at init, old dropped)
_TARGETS = {
    "bn_a1": (_RUNNING | {"weight"}, {"bias"}, set(), set()),
    "bn_a2": (_RUNNING | {"weight"}, {"bias"}, {"gamma0"}, set()),
    "rbn": (_RUNNING | {"bias"}, {"weight"}, {"calib_weight", "calib_bias"}, set()),
    "rbn_minus": (_RUNNING | {"bias"}, {"weight"}, {"calib_bias"}, set()),
    "iebn": (_RUNNING | {"bias"}, {"weight"}, {"calib_weight", "calib_bias"}, set()),
    "iebn_minus": (_RUNNING | {"bias"}, {"weight"}, {"calib_bias"}, set()),
    "inputnorm": (_RUNNING | {"weight"}, set(), set(), {"bias"}),
}


def _bn_paths(model):
    return {p: m for p, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _tensors(module):
    return dict(list(module.named_parameters(recurse=False))
                + list(module.named_buffers(recurse=False)))


@pytest.mark.parametrize("spec", sorted(_TARGETS))
def test_convert_carries_state_into_revisiting_bn_targets(spec):
    equal, computed, at_init, dropped = _TARGETS[spec]
    model = _trained_model().double()
    with torch.no_grad():  # signed γ, non-trivial running stats everywhere
        for bn in _bn_paths(model).values():
            bn.weight.mul_(torch.where(torch.rand_like(bn.weight) < 0.3, -1.0, 1.0))
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    old = copy.deepcopy(model).eval()
    old_layers = _bn_paths(old)
    include = tuple({type(m) for m in old_layers.values()})
    new, report = convert(model, spec, include=include)
    assert len(report.replaced) == 7 and not report.unconverted
    for path, src in old_layers.items():
        dst = new.get_submodule(path)
        got = _tensors(dst)
        old_tensors = _tensors(src)
        same = {n for n, t in got.items() if n in old_tensors and torch.equal(t, old_tensors[n])}
        assert same == equal, path
        state = report.state_of(path)
        assert set(state["carried"]) == equal | computed
        assert set(state["at_init"]) == at_init and set(state["dropped"]) == dropped
        assert set(got) == equal | computed | at_init  # every new tensor is accounted for
        g, b = src.weight, src.bias
        if spec.startswith("bn_a"):
            torch.testing.assert_close(dst.bias, b / g, rtol=1e-12, atol=0)
            assert state["carried"]["bias"] == "bias / weight"
        if spec == "bn_a2":
            assert torch.equal(dst.gamma0, torch.ones_like(g))
        if spec in ("rbn", "rbn_minus", "iebn", "iebn_minus"):
            wb = 1.0 if spec.startswith("rbn") else -1.0
            assert torch.equal(dst.calib_bias, torch.full_like(g, wb))
            torch.testing.assert_close(dst.weight, g / torch.sigmoid(torch.tensor(wb).double()),
                                       rtol=1e-12, atol=0)
        if spec == "inputnorm":
            assert dst.bias is None
            assert "no shift parameter" in state["dropped"]["bias"]
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64) * 2 + 1
    new.eval()
    if spec != "inputnorm":  # same eval-mode function (RBN/IEBN: w_v = 0, so S = sigmoid(w_b))
        torch.testing.assert_close(new(x), old(x), rtol=1e-10, atol=1e-10)
    else:  # no shift: each layer gives the old output minus β
        for path, src in old_layers.items():
            shape = (5, src.num_features) + ((4, 4) if isinstance(src, nn.BatchNorm2d) else ())
            h = torch.randn(shape, dtype=torch.float64) * 3 + 1
            beta = src.bias.view([1, -1] + [1] * (h.dim() - 2))
            torch.testing.assert_close(new.get_submodule(path)(h), src(h) - beta,
                                       rtol=1e-10, atol=1e-10)
    assert "carried" in str(report)


def test_convert_to_input_norm_equals_bn_without_shift():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    old = copy.deepcopy(model)
    new, report = convert(model, "inputnorm:activation=gelu", include=(nn.BatchNorm2d,))
    assert isinstance(new[1], normlab.InputNorm) and new[1].activation == "gelu"
    assert report.dropped == [("1", "bias", report.dropped[0][2])]
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(new(x), old(x), rtol=0, atol=0)  # β = 0: same function


def test_convert_revisiting_targets_in_training_mode_and_edge_cases():
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.0, 2.0, -0.5]))
        bn.bias.copy_(torch.tensor([1.0, 0.5, 0.0]))
    x = torch.randn(4, 3, 5, 5)
    # training mode: batch statistics, and RBN's S = sigmoid(w_b) while w_v = 0
    for spec in ("rbn", "iebn"):
        new, report = convert(nn.Sequential(copy.deepcopy(bn)), spec)
        assert new[0].training
        torch.testing.assert_close(new(x), copy.deepcopy(bn)(x), rtol=1e-5, atol=1e-5)
    # channel 0 has γ = 0 and β ≠ 0: A1 cannot express that; β is 0 there and it is reported
    new, report = convert(nn.Sequential(copy.deepcopy(bn)), "bn_a1")
    assert new[0].bias.tolist() == [0.0, 0.25, 0.0]
    assert any("channels [0] have γ = 0 and β ≠ 0" in n for n in report.notes)
    # an old BN without affine parameters: the targets get the identity tail
    plain = nn.BatchNorm2d(3, affine=False)
    new, report = convert(nn.Sequential(plain), "rbn_minus")
    torch.testing.assert_close(new[0].weight * torch.sigmoid(new[0].calib_bias),
                               torch.ones(3))
    assert report.state_of("0")["carried"]["bias"] == "0"


def test_convert_from_revisiting_layers_back_to_bn():
    torch.manual_seed(2)
    x = torch.randn(5, 3, 4, 4)
    for spec in ("bn_a2", "iebn_minus", "rbn"):
        layer = normlab.create_norm(spec, 3)
        with torch.no_grad():
            for name, p in layer.named_parameters():
                if name != "calib_weight":
                    p.uniform_(0.5, 1.5)
        layer(x * 2 + 1)
        layer.eval()
        new, report = convert(nn.Sequential(copy.deepcopy(layer)), "bn")
        assert isinstance(new[0], normlab.FilteredBatchNorm2d)
        torch.testing.assert_close(new(x), layer(x), rtol=1e-5, atol=1e-5)
    # RBN whose w_v ≠ 0: no per-channel γ, β can stand for S; γ, β stay at init, reported
    with torch.no_grad():
        layer.calib_weight.fill_(0.5)
    new, report = convert(nn.Sequential(layer), "bn")
    state = report.state_of("0")
    assert set(state["at_init"]) == {"weight", "bias"}
    assert "depends on the sample" in state["dropped"]["calib_weight"]
    # InputNorm -> BN: γ̂ carried, β = 0
    norm = normlab.InputNorm(3)
    norm(x * 5 + 2)
    norm.eval()
    new, report = convert(nn.Sequential(copy.deepcopy(norm)), "bn", include=(normlab.InputNorm,))
    assert report.state_of("0")["carried"]["weight"] == "weight"
    torch.testing.assert_close(new(x), norm(x), rtol=0, atol=0)


# -- fuse: InputNorm before padded, transposed and nested layers --------------------------------

def _input_norm(channels, dtype, mean=(50.0, 150.0)):
    norm = normlab.InputNorm(channels, gamma=0.7).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.running_mean.uniform_(*mean)
        norm.running_var.uniform_(100.0, 900.0)
    return norm.eval()


def _close(dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    return {"rtol": tol, "atol": tol}


_LAYERS = {  # name: (layer, replaces the InputNorm, input shape)
    "pad1": (lambda: nn.Conv2d(3, 4, 3, padding=1), "pad", (4, 3, 9, 8)),
    "pad2_dilated_strided": (lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2, stride=2), "pad",
                             (4, 3, 9, 8)),
    "same_even_kernel": (lambda: nn.Conv2d(3, 4, (4, 3), padding="same"), "pad", (4, 3, 9, 8)),
    "grouped": (lambda: nn.Conv2d(3, 6, 3, padding=1, groups=3), "pad", (4, 3, 9, 8)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 5, padding=2), "pad", (4, 3, 11)),
    "conv3d": (lambda: nn.Conv3d(3, 4, 3, padding=1), "pad", (2, 3, 4, 5, 6)),
    "reflect": (lambda: nn.Conv2d(3, 4, 3, padding=2, padding_mode="reflect"), None,
                (4, 3, 9, 8)),
    "replicate": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="replicate"), None,
                  (4, 3, 9, 8)),
    "circular": (lambda: nn.Conv2d(3, 4, 3, padding=2, padding_mode="circular"), None,
                 (4, 3, 9, 8)),
    "transposed": (lambda: nn.ConvTranspose2d(3, 4, 3, padding=1), "pad", (4, 3, 7, 6)),
    "transposed_dilated_outpad": (
        lambda: nn.ConvTranspose2d(3, 4, 3, padding=1, dilation=2, output_padding=1), "pad",
        (4, 3, 7, 6)),
    "transposed_grouped": (lambda: nn.ConvTranspose2d(3, 6, 3, groups=3), "pad", (4, 3, 7, 6)),
    "transposed_strided": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1,
                                                      output_padding=1), "kept", (4, 3, 7, 6)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(_LAYERS))
def test_fuse_input_norm_into_padded_and_transposed_convs(name, dtype):
    torch.manual_seed(0)
    make, outcome, shape = _LAYERS[name]
    model = nn.Sequential(_input_norm(3, dtype), make().to(dtype)).eval()
    x = torch.rand(shape, dtype=dtype) * 255
    fused, report = fuse_for_inference(model, return_report=True)
    torch.testing.assert_close(fused(x), model(x), **_close(dtype))
    if outcome == "kept":
        assert isinstance(fused[0], normlab.InputNorm) and not report.folded
        assert "stride (2, 2)" in report.kept[0][1]
        return
    assert report.folded == [("0", "1")]
    if outcome == "pad":  # zero padding of the normalized input = padding x with μ_run
        assert isinstance(fused[0], normlab.ConstantChannelPad) and len(fused) == 2
        assert torch.equal(fused[0].value, model[0].running_mean)
        conv = fused[1]
        assert conv.transposed or conv.padding == (0,) * len(conv.kernel_size)
    else:  # reflect/replicate/circular pad with input values: they commute with s·x + t
        assert len(fused) == 1 and fused[0].padding == model[1].padding


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fuse_input_norm_without_mean_keeps_zero_padding_and_folds_strided_transposed(dtype):
    torch.manual_seed(0)
    for layer in (nn.Conv2d(3, 4, 3, padding=1), nn.ConvTranspose2d(3, 4, 3, stride=2)):
        model = nn.Sequential(_input_norm(3, dtype, mean=(0.0, 0.0)), layer.to(dtype)).eval()
        x = torch.randn(4, 3, 7, 6, dtype=dtype) * 20
        fused, report = fuse_for_inference(model, return_report=True)
        assert len(fused) == 1 and report.folded == [("0", "1")]
        assert fused[0].padding == layer.padding
        torch.testing.assert_close(fused(x), model(x), **_close(dtype))


class _Stem(nn.Module):
    """forward hands its input to ``self.stem`` alone: the data flow is certain."""

    def __init__(self, residual=False):
        super().__init__()
        self.residual = residual
        self.stem = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3))
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        y = self.stem(x)
        return self.head(y + x if self.residual else y)


def _primed(model, x):
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fuse_input_norm_across_nested_sequentials_and_modules(dtype):
    torch.manual_seed(0)
    x = (torch.rand(8, 3, 7, 7) * 255).to(dtype)
    nested = nn.Sequential(normlab.InputNorm(3), nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=2), nn.BatchNorm2d(4)), nn.ReLU()))
    at_end = nn.Sequential(nn.Sequential(nn.Identity(), normlab.InputNorm(3)),
                           nn.Sequential(nn.Identity(), nn.Conv2d(3, 4, 3, padding=1)))
    wrapped = normlab.with_input_norm(_Stem(), 3, gamma=0.1)
    for model, into in ((nested, "1.0.0"), (at_end, "1.1"), (wrapped, "model.stem.0")):
        model = _primed(model.to(dtype), x)
        fused, report = fuse_for_inference(model, return_report=True)
        norm_path = next(p for p, m in model.named_modules() if isinstance(m, normlab.InputNorm))
        assert (norm_path, into) in report.folded
        assert not any(isinstance(m, normlab.InputNorm) for m in fused.modules())
        assert isinstance(fused.get_submodule(norm_path), normlab.ConstantChannelPad)
        torch.testing.assert_close(fused(x), model(x), **_close(dtype))


def test_fuse_keeps_input_norm_where_folding_is_impossible():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 7, 7) * 255
    relu = _primed(nn.Sequential(normlab.InputNorm(3), nn.ReLU(), nn.Conv2d(3, 4, 3)), x)
    residual = _primed(normlab.with_input_norm(_Stem(residual=True), 3), x)
    shared_conv = nn.Conv2d(3, 3, 1)
    shared = _primed(nn.Sequential(normlab.InputNorm(3), shared_conv, nn.ReLU(), shared_conv), x)
    last = _primed(nn.Sequential(nn.Conv2d(3, 3, 1), normlab.InputNorm(3)), x)
    tied = nn.Sequential(normlab.InputNorm(3), nn.Conv2d(3, 3, 1), nn.ReLU(), nn.Conv2d(3, 3, 1))
    tied[3].weight = tied[1].weight
    tied = _primed(tied, x)
    for model, reason in ((relu, "followed by ReLU (1), not a Linear, Conv or ConvTranspose"),
                          (tied, "the parameters of 1 are shared with another module"),
                          (residual, "does not hand its input to a single child alone"),
                          (shared, "1 is used at several places"),
                          (last, "nothing follows it")):
        fused, report = fuse_for_inference(model, return_report=True)
        norm_path = next(p for p, m in model.named_modules() if isinstance(m, normlab.InputNorm))
        assert isinstance(fused.get_submodule(norm_path), normlab.InputNorm)
        reasons = [r for p, r in report.kept if p == norm_path]
        assert len(reasons) == 1 and reason in reasons[0]
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-4)
