"""BN-based input normalization ([DF21] §3.4) and the fixed/offline transforms."""

import math

import pytest
import torch
from torch import nn

import normlab
from normlab import FixedInputNorm, InputNorm, OfflineInputNorm, activation_std, with_input_norm

NAMES = ["relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "leaky_relu", "elu", "mish",
         "relu6", "hardswish", "softplus", "selu", "identity"]


def test_relu_closed_form():
    assert activation_std("relu") == pytest.approx(math.sqrt(0.5 - 1 / (2 * math.pi)), abs=1e-15)
    assert round(activation_std("relu"), 4) == 0.5838
    assert activation_std("identity") == 1.0
    assert activation_std(nn.ReLU()) == activation_std("relu")


@pytest.mark.parametrize("name", NAMES)
def test_activation_std_against_scipy_quad(name):
    integrate = pytest.importorskip("scipy.integrate")
    fn = normlab.nn.input_norm.ACTIVATION_FUNCTIONS[name]

    def f(z):
        return float(fn(torch.tensor(z, dtype=torch.float64)))

    pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    pts = [-3.0, 0.0, 3.0, 6.0]
    m1 = integrate.quad(lambda z: f(z) * pdf(z), -40, 40, points=pts, limit=200)[0]
    m2 = integrate.quad(lambda z: f(z) ** 2 * pdf(z), -40, 40, points=pts, limit=200)[0]
    assert activation_std(name) == pytest.approx(math.sqrt(m2 - m1 * m1), abs=1e-9)


def test_activation_std_monte_carlo_and_callables():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2_000_000, generator=g, dtype=torch.float64)
    for name, fn in [("relu", torch.relu), ("gelu", nn.functional.gelu), ("tanh", torch.tanh)]:
        assert activation_std(name) == pytest.approx(fn(z).std().item(), rel=2e-3)
    # modules with parameters and plain callables are integrated on the fly
    assert activation_std(nn.LeakyReLU(0.2)) == pytest.approx(
        nn.functional.leaky_relu(z, 0.2).std().item(), rel=2e-3)
    assert activation_std(lambda t: 2 * t) == pytest.approx(2.0, abs=1e-12)


def test_input_norm_init_and_no_shift():
    norm = InputNorm(3, activation="gelu", gamma=0.1)
    torch.testing.assert_close(norm.weight, torch.full((3,), 0.1 * activation_std("gelu")))
    assert norm.bias is None
    assert set(norm.state_dict()) == {"weight", "running_mean", "running_var",
                                      "num_batches_tracked"}
    assert [n for n, _ in norm.named_parameters()] == ["weight"]
    assert InputNorm(3).weight[0].item() == pytest.approx(0.58382, abs=1e-5)


def test_input_norm_train_and_eval_match_batch_norm():
    torch.manual_seed(0)
    norm = InputNorm(3, gamma=0.5)
    ref = nn.BatchNorm2d(3, affine=False)
    xs = [torch.rand(16, 3, 5, 5) * 255 for _ in range(3)]
    for x in xs:
        y = norm(x)
        torch.testing.assert_close(y, ref(x) * norm.weight.view(1, 3, 1, 1))
    torch.testing.assert_close(norm.running_mean, ref.running_mean)
    torch.testing.assert_close(norm.running_var, ref.running_var)
    var = xs[-1].var(dim=(0, 2, 3), unbiased=False)
    y = norm(xs[-1])
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(dim=(0, 2, 3), unbiased=False),
                               norm.weight.detach() ** 2 * var / (var + norm.eps))
    norm.eval()
    x = torch.rand(2, 3, 4, 4) * 255
    scale, shift = norm.inference_affine()
    expect = x.double() * scale.view(1, 3, 1, 1) + shift.view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x).double(), expect, rtol=1e-5, atol=1e-5)


def test_input_norm_any_rank_and_registry():
    for shape in [(8, 3), (8, 3, 7), (4, 3, 5, 5), (2, 3, 2, 3, 3)]:
        assert InputNorm(3)(torch.randn(shape)).shape == shape
    norm = normlab.create_norm("inputnorm:activation=tanh,gamma=0.5", 4)
    assert isinstance(norm, InputNorm)
    assert norm.weight[0].item() == pytest.approx(0.5 * activation_std("tanh"))
    assert InputNorm(2, threshold=2.0).threshold == 2.0


def test_with_input_norm_prepends_and_matches_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).double().eval()
    net = with_input_norm(model, 3, gamma=0.1)
    assert list(dict(net.named_children())) == ["input_norm", "model"]
    assert net.input_norm.weight.dtype == torch.float64 and not net.input_norm.training
    assert net.model is model
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(net(x), model(net.input_norm(x)))


def test_fixed_and_offline():
    fixed = FixedInputNorm(torch.uint8)
    assert (fixed.mean.item(), fixed.std.item()) == (128.0, 128.0)
    x = torch.tensor([[0, 128, 255]], dtype=torch.uint8)
    torch.testing.assert_close(fixed(x), (x.float() - 128) / 128)
    assert FixedInputNorm(value_range=(0.0, 1.0)).mean.item() == 0.5
    assert FixedInputNorm(torch.int8).mean.item() == 0.0
    torch.manual_seed(0)
    batches = [torch.rand(8, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
               for _ in range(5)]
    off = OfflineInputNorm.from_data([(b, torch.zeros(8)) for b in batches])
    every = torch.cat(batches).transpose(0, 1).reshape(3, -1).double()
    torch.testing.assert_close(off.mean.double(), every.mean(1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(off.std.double(), every.std(1, unbiased=False), rtol=1e-6, atol=1e-7)
    y = off(torch.cat(batches))
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def test_errors():
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        activation_std("swishy")
    with pytest.raises(TypeError, match="activation must be a name, an nn.Module or a callable"):
        activation_std(3)
    with pytest.raises(ValueError, match=r"gamma must be a number > 0 .* got 0"):
        InputNorm(3, gamma=0)
    with pytest.raises(ValueError, match="num_channels must be a positive int, got 0"):
        InputNorm(0)
    with pytest.raises(ValueError, match="needs an integer data dtype"):
        FixedInputNorm(torch.float32)
    with pytest.raises(ValueError, match="from_data got no data"):
        OfflineInputNorm.from_data([])
    with pytest.raises(ValueError, match="InputNorm was built for 3 channels"):
        InputNorm(3)(torch.randn(4, 2, 5, 5))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        with_input_norm("net", 3)


def test_constant_channel_pad_values_gradient_and_errors():
    value = torch.tensor([0.5, -2.0])
    pad = normlab.ConstantChannelPad(((1, 2), (0, 1)), value)
    x = torch.randn(3, 2, 4, 5, requires_grad=True)
    y = pad(x)
    assert y.shape == (3, 2, 7, 6)
    assert torch.equal(y[:, :, 1:5, 0:5], x)  # inside: bit-identical
    border = torch.ones(7, 6, dtype=torch.bool)
    border[1:5, 0:5] = False
    assert torch.equal(y[:, 0][:, border], torch.full((3, int(border.sum())), 0.5))
    assert torch.equal(y[:, 1][:, border], torch.full((3, int(border.sum())), -2.0))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert pad.double()(x.double().detach()).dtype == torch.float64
    assert "value" in pad.state_dict()
    with pytest.raises(ValueError, match="non-negative ints, got -1"):
        normlab.ConstantChannelPad(((1, -1),), value)
    with pytest.raises(ValueError, match="one \\(before, after\\) pair per spatial dim"):
        normlab.ConstantChannelPad((1, 1), value)
    with pytest.raises(TypeError, match="1-D floating tensor"):
        normlab.ConstantChannelPad(((1, 1),), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"built for \(N, 2, 2 spatial dims\) input, got shape "
                                         r"\(3, 2, 4\)"):
        pad(torch.randn(3, 2, 4))
