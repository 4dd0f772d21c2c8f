"""Group/layer/instance norms and FRN: equivalences with torch and the papers' formulas
([HA20], [SK20])."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import normlab


def planted(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype) * 1.5 + 0.3
    flat = x.view(x.shape[0], x.shape[1], -1)
    flat[0, 0, 0] = 30.0
    flat[1, -1, -1] = -20.0
    return x


def set_affine(*modules):
    g = torch.Generator().manual_seed(7)
    w = torch.rand(modules[0].weight.shape, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(modules[0].bias.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        for m in modules:
            m.weight.copy_(w), m.bias.copy_(b)


# -- group norm -----------------------------------------------------------------------------

@pytest.mark.parametrize("threshold", [None, math.inf])
def test_unfiltered_group_norm_is_torch_group_norm(threshold):
    ours = normlab.FilteredGroupNorm(4, 8, threshold=threshold).double()
    ref = nn.GroupNorm(4, 8).double()
    set_affine(ours, ref)
    x = planted((3, 8, 5, 5))
    assert torch.equal(ours(x), ref(x))
    ours.load_state_dict(ref.state_dict())


def test_group_norm_one_group_equals_layer_norm_and_c_groups_equals_instance_norm():
    x = planted((3, 6, 4, 4))
    gn1 = normlab.FilteredGroupNorm(1, 6, threshold=None, affine=False).double()
    ln = nn.LayerNorm((6, 4, 4), elementwise_affine=False).double()
    torch.testing.assert_close(gn1(x), ln(x), rtol=1e-12, atol=1e-12)
    gnc = normlab.FilteredGroupNorm(6, 6, threshold=None).double()
    inorm = nn.InstanceNorm2d(6, affine=True).double()
    set_affine(gnc, inorm)
    torch.testing.assert_close(gnc(x), inorm(x), rtol=1e-12, atol=1e-12)
    # the filtered forms agree with each other the same way
    fgn1 = normlab.FilteredGroupNorm(1, 6, threshold=2.0, affine=False).double()
    fln = normlab.FilteredLayerNorm((6, 4, 4), threshold=2.0, elementwise_affine=False).double()
    torch.testing.assert_close(fgn1(x), fln(x), rtol=1e-12, atol=1e-12)


def test_filtered_group_norm_matches_independent_formula():
    m = normlab.FilteredGroupNorm(2, 4, threshold=2.0, eps=1e-5).double()
    set_affine(m)
    x = planted((2, 4, 3, 3))
    y = m(x).detach().numpy()
    xn = x.numpy()
    w, b = m.weight.detach().numpy(), m.bias.detach().numpy()
    for n in range(2):
        for grp in range(2):
            chans = slice(2 * grp, 2 * grp + 2)
            v = xn[n, chans]
            mu, sigma = v.mean(), math.sqrt(v.var() + 1e-5)
            kept = v[np.abs((v - mu) / sigma) <= 2.0]
            expect = (v - kept.mean()) / math.sqrt(kept.var() + 1e-5)
            expect = expect * w[chans, None, None] + b[chans, None, None]
            np.testing.assert_allclose(y[n, chans], expect, rtol=1e-10, atol=1e-12)
    # and the outlier did change group 0 of sample 0
    plain = nn.GroupNorm(2, 4).double()
    set_affine(plain)
    assert not torch.allclose(m(x)[0, :2], plain(x)[0, :2], atol=1e-2)


def test_group_norm_errors():
    with pytest.raises(ValueError, match=r"num_channels \(8\) must be divisible by num_groups \(3\)"):
        normlab.FilteredGroupNorm(3, 8)
    with pytest.raises(ValueError, match="built for 8 channels but the input has 4"):
        normlab.FilteredGroupNorm(2, 8)(torch.randn(2, 4, 3))


def test_filtered_layer_norm_is_torch_layer_norm_without_threshold():
    ours = normlab.FilteredLayerNorm(16, threshold=None).double()
    ref = nn.LayerNorm(16).double()
    set_affine(ours, ref)
    x = planted((4, 3, 16))
    assert torch.equal(ours(x), ref(x))
    assert set(ours.state_dict()) == set(ref.state_dict())
    with pytest.raises(ValueError, match=r"last dims are \(16,\), got shape \(4, 3, 8\)"):
        ours(torch.randn(4, 3, 8))


def test_filtered_instance_norm_matches_torch_without_threshold_including_running_stats():
    ours = normlab.FilteredInstanceNorm2d(3, affine=True, track_running_stats=True,
                                          threshold=None).double()
    ref = nn.InstanceNorm2d(3, affine=True, track_running_stats=True).double()
    set_affine(ours, ref)
    for seed in range(2):
        x = planted((4, 3, 5, 5), seed=seed)
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))
    # unbatched input works like torch
    torch.testing.assert_close(ours(x[0]), ref(x[0]))


def test_filtered_instance_norm_running_stats_use_filtered_moments():
    m = normlab.FilteredInstanceNorm1d(2, threshold=2.0, track_running_stats=True,
                                       momentum=1.0).double()
    x = planted((3, 2, 40))
    m(x)
    from normlab import functional as F
    stats = F.filtered_moments(x, (2,), 2.0, eps=m.eps)
    unbiased = stats.var * stats.count / (stats.count - 1)
    torch.testing.assert_close(m.running_mean, stats.mean.mean(0).reshape(-1))
    torch.testing.assert_close(m.running_var, unbiased.mean(0).reshape(-1))


# -- filter response normalization --------------------------------------------------------

def numpy_frn(x, weight, bias, tau, eps):
    nu2 = (x ** 2).mean(axis=tuple(range(2, x.ndim)), keepdims=True)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = x / np.sqrt(nu2 + eps) * weight.reshape(shape) + bias.reshape(shape)
    return np.maximum(y, tau.reshape(shape))


def test_frn_tlu_matches_seed_equations_1_to_3():
    m = normlab.FilterResponseNorm2d(3).double()
    set_affine(m)
    with torch.no_grad():
        m.tau.copy_(torch.tensor([0.2, -0.1, 0.5]))
    x = planted((2, 3, 4, 4))
    expect = numpy_frn(x.numpy(), m.weight.detach().numpy(), m.bias.detach().numpy(),
                       m.tau.detach().numpy(), 1e-6)
    np.testing.assert_allclose(m(x).detach().numpy(), expect, rtol=1e-12, atol=1e-12)


def test_frn_is_batch_size_independent():
    m = normlab.FilterResponseNorm2d(3).double()
    x = planted((4, 3, 4, 4))
    torch.testing.assert_close(m(x)[1:2], m(x[1:2]))


def test_frn_learnable_eps_parameterization_seed_3_3():
    m = normlab.FilterResponseNorm1d(4, learnable_eps=True, activation="none").double()
    eps_params = [n for n, _ in m.named_parameters() if "eps" in n]
    assert eps_params == ["learned_eps"]
    assert m.learned_eps.item() == pytest.approx(1e-4)
    with torch.no_grad():
        m.learned_eps.fill_(-0.5)
    assert m.effective_eps().item() == pytest.approx(1e-6 + 0.5)
    x = torch.randn(3, 4, dtype=torch.float64)  # FC input: N = 1 value per set
    expect = x / torch.sqrt(x ** 2 + 1e-6 + 0.5)
    torch.testing.assert_close(m(x), expect)


def test_frn_loads_timm_style_state_dict():
    timm_like = {"weight": torch.rand(5), "bias": torch.randn(5), "tau": torch.randn(5)}
    m = normlab.FilterResponseNorm2d(5)
    m.load_state_dict(timm_like)
    assert set(m.state_dict()) == {"weight", "bias", "tau"}


def test_group_and_layer_frn():
    x = planted((2, 4, 3, 3))
    gfrn = normlab.GroupFilterResponseNorm(2, 4, activation="none", affine=False).double()
    nu2 = x.reshape(2, 2, -1).pow(2).mean(-1, keepdim=True)
    expect = (x.reshape(2, 2, -1) / torch.sqrt(nu2 + 1e-6)).reshape(x.shape)
    torch.testing.assert_close(gfrn(x), expect)
    lfrn = normlab.LayerFilterResponseNorm(4, activation="none", affine=False).double()
    nu2 = x.reshape(2, -1).pow(2).mean(-1).view(2, 1, 1, 1)
    torch.testing.assert_close(lfrn(x), x / torch.sqrt(nu2 + 1e-6))
    # FRN = GFRN with one channel per group
    frn = normlab.FilterResponseNorm2d(4, activation="relu").double()
    g4 = normlab.GroupFilterResponseNorm(4, 4, activation="relu").double()
    torch.testing.assert_close(frn(x), g4(x))


def test_filtered_frn_ignores_outliers_in_nu():
    m = normlab.FilterResponseNorm1d(1, threshold=3.0, activation="none", affine=False).double()
    x = torch.ones(1, 1, 50, dtype=torch.float64)
    x[0, 0, 0] = 100.0
    y = m(x)
    assert y[0, 0, 1].item() == pytest.approx(1.0 / math.sqrt(1.0 + 1e-6))
    plain = normlab.FilterResponseNorm1d(1, activation="none", affine=False).double()(x)
    assert plain[0, 0, 1].item() < 0.1


def test_frn_errors():
    with pytest.raises(ValueError, match="activation must be one of"):
        normlab.FilterResponseNorm2d(3, activation="gelu")
    with pytest.raises(ValueError, match="expects 4D input, got 2D"):
        normlab.FilterResponseNorm2d(3)(torch.randn(2, 3))
    with pytest.raises(TypeError, match="expects a floating-point tensor"):
        normlab.FilterResponseNorm1d(3)(torch.ones(2, 3, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_frn_and_gn_half_precision(dtype):
    x = planted((2, 4, 4, 4), dtype=torch.float32).to(dtype)
    for m in (normlab.FilterResponseNorm2d(4), normlab.FilteredGroupNorm(2, 4)):
        y = m(x)
        assert y.dtype == dtype and torch.isfinite(y).all()


def test_channels_last_frn():
    x = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    y = normlab.FilterResponseNorm2d(3)(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
