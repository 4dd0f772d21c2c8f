"""FilteredBatchNorm*d and BatchRenorm*d: formulas, equivalences, state rules, errors."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from normlab import functional as F

BN = {1: (normlab.FilteredBatchNorm1d, nn.BatchNorm1d, (8, 3, 5)),
      2: (normlab.FilteredBatchNorm2d, nn.BatchNorm2d, (8, 3, 4, 5)),
      3: (normlab.FilteredBatchNorm3d, nn.BatchNorm3d, (4, 3, 2, 3, 4))}


def with_outliers(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype) * 2.0 + 0.5
    flat = x.view(x.shape[0], x.shape[1], -1)
    flat[1, 0, 0] = 60.0
    flat[2, 1, -1] = -45.0
    return x


def numpy_filtered_bn(x: np.ndarray, weight, bias, threshold, eps):
    """Independent filtered BN forward ([HA20] eq. 4-8) per channel, plus kept counts."""
    out = np.empty_like(x)
    means, variances, counts = [], [], []
    for c in range(x.shape[1]):
        v = x[:, c]
        mu, sigma = v.mean(), math.sqrt(v.var() + eps)
        kept = v[np.abs((v - mu) / sigma) <= threshold]
        mu_f, var_f = kept.mean(), kept.var()
        out[:, c] = weight[c] * (v - mu_f) / math.sqrt(var_f + eps) + bias[c]
        means.append(mu_f), variances.append(var_f), counts.append(kept.size)
    return out, np.array(means), np.array(variances), np.array(counts)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("threshold", [None, math.inf])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_no_threshold_is_torch_batchnorm_in_train_and_eval(dim, threshold, momentum):
    ours_cls, torch_cls, shape = BN[dim]
    torch.manual_seed(0)
    ref = torch_cls(3, momentum=momentum)
    ours = ours_cls(3, momentum=momentum, threshold=threshold)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5), ref.bias.uniform_(-1, 1)
    ours.load_state_dict(ref.state_dict())
    for step in range(3):
        x = with_outliers(shape, seed=step, dtype=torch.float32)
        assert torch.equal(ours(x), ref(x))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ours, name), getattr(ref, name))
    ours.eval(), ref.eval()
    x = with_outliers(shape, seed=9, dtype=torch.float32)
    assert torch.equal(ours(x), ref(x))


def test_filtered_forward_matches_independent_formula_and_running_stats():
    m = normlab.FilteredBatchNorm2d(3, threshold=2.0, momentum=0.3).double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.5, 1.5, -1.0])), m.bias.copy_(torch.tensor([0.1, 0.0, 2.0]))
    x = with_outliers((8, 3, 4, 5))
    y = m(x)
    xn = x.numpy().transpose(1, 0, 2, 3).reshape(3, -1).T[:, :, None]  # (values, C, 1)
    expect, means, variances, counts = numpy_filtered_bn(
        xn, m.weight.detach().numpy(), m.bias.detach().numpy(), 2.0, 1e-5)
    got = y.detach().numpy().transpose(1, 0, 2, 3).reshape(3, -1).T[:, :, None]
    np.testing.assert_allclose(got, expect, rtol=1e-10, atol=1e-12)
    assert (counts < x[:, 0].numel()).all()  # the filter removed something in every channel
    np.testing.assert_allclose(m.running_mean.numpy(), 0.3 * means, rtol=1e-10)
    unbiased = variances * counts / (counts - 1)
    np.testing.assert_allclose(m.running_var.numpy(), 0.7 + 0.3 * unbiased, rtol=1e-10)
    assert m.num_batches_tracked.item() == 1


def test_filtering_changes_statistics_only_when_outliers_exist():
    g = torch.Generator().manual_seed(3)
    clean = torch.randn(32, 4, 6, 6, generator=g, dtype=torch.float64)
    big_t = normlab.FilteredBatchNorm2d(4, threshold=50.0).double()
    bn = nn.BatchNorm2d(4).double()
    torch.testing.assert_close(big_t(clean), bn(clean), rtol=1e-12, atol=1e-12)
    dirty = clean.clone()
    dirty[0, 0, 0, 0] = 1000.0
    y_f = normlab.FilteredBatchNorm2d(4, threshold=3.0).double()(dirty)
    y_bn = nn.BatchNorm2d(4).double()(dirty)
    # without the outlier BN's scale collapses: clean values of channel 0 get squeezed
    mask = torch.ones_like(dirty[:, 0], dtype=torch.bool)
    mask[0, 0, 0] = False
    assert y_f[:, 0][mask].std() > 0.9
    assert y_bn[:, 0][mask].std() < 0.2
    torch.testing.assert_close(y_f[:, 1:], y_bn[:, 1:], rtol=0.05, atol=0.05)


def test_eval_uses_running_stats_exactly_like_batch_norm():
    m = normlab.FilteredBatchNorm2d(3, threshold=2.0)
    for seed in range(4):
        m(with_outliers((8, 3, 4, 4), seed=seed, dtype=torch.float32))
    m.eval()
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(2, 3, 4, 4)
    expect = torch.nn.functional.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias,
                                            False, 0.0, m.eps)
    assert torch.equal(m(x), expect)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed in eval"


def test_running_stats_move_only_in_training():
    m = normlab.FilteredBatchNorm1d(3)
    x = torch.randn(16, 3) * 3 + 1
    m(x)
    moved = m.running_mean.clone()
    assert not torch.equal(moved, torch.zeros(3))
    m.eval()
    m(x)
    assert torch.equal(m.running_mean, moved)
    m.train()
    m(x)
    assert not torch.equal(m.running_mean, moved)


def test_track_running_stats_false_always_uses_batch_stats():
    m = normlab.FilteredBatchNorm2d(3, track_running_stats=False, threshold=2.0).double().eval()
    assert m.running_mean is None
    x = with_outliers((8, 3, 4, 4))
    stats = F.filtered_moments(x, (0, 2, 3), 2.0, eps=m.eps)
    torch.testing.assert_close(m(x), F.normalize(x, stats, m.eps))


def test_state_dict_loads_both_ways_with_torch():
    ref = nn.BatchNorm2d(5)
    ref(torch.randn(4, 5, 3, 3))
    ours = normlab.FilteredBatchNorm2d(5)
    ours.load_state_dict(ref.state_dict())
    back = nn.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict())
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert torch.equal(back.running_var, ref.running_var)


def test_gamma_init_sets_weight():
    m = normlab.FilteredBatchNorm2d(4, gamma_init=0.1)
    assert torch.equal(m.weight.data, torch.full((4,), 0.1))
    assert torch.equal(m.bias.data, torch.zeros(4))
    assert normlab.FilteredBatchNorm2d(4, affine=False).weight is None


def test_zero_variance_channel_is_finite():
    x = torch.zeros(4, 2, 3, 3)
    x[:, 1] = torch.randn(4, 3, 3)
    y = normlab.FilteredBatchNorm2d(2)(x)
    assert torch.isfinite(y).all()
    assert torch.equal(y[:, 0], torch.zeros(4, 3, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_output_dtype_and_finite(dtype):
    m = normlab.FilteredBatchNorm2d(3)
    x = (with_outliers((8, 3, 4, 4), dtype=torch.float32)).to(dtype).requires_grad_()
    y = m(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    assert m.running_mean.dtype == torch.float32
    ref = normlab.FilteredBatchNorm2d(3)(x.detach().float())
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=3e-2)


def test_autocast_cpu_bfloat16():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), normlab.FilteredBatchNorm2d(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(4, 3, 8, 8))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_channels_last_keeps_memory_format():
    x = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    y = normlab.FilteredBatchNorm2d(3)(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, normlab.FilteredBatchNorm2d(3)(x.contiguous()))


@pytest.mark.parametrize(("make", "x", "match"), [
    (lambda: normlab.FilteredBatchNorm2d(3), torch.randn(2, 3, 4), r"expects 4D input, got 3D"),
    (lambda: normlab.FilteredBatchNorm2d(3), torch.randn(2, 4, 3, 3),
     r"built for 3 channels but the input has 4"),
    (lambda: normlab.FilteredBatchNorm1d(3), torch.randn(1, 3),
     r"more than 1 value per channel when training"),
])
def test_bad_input_errors(make, x, match):
    with pytest.raises(ValueError, match=match):
        make()(x)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"threshold": 0}, ValueError, r"threshold must be > 0 .* got 0"),
    ({"threshold": -2.0}, ValueError, r"threshold must be > 0"),
    ({"threshold": "2"}, TypeError, r"threshold must be a positive number or None, got '2'"),
    ({"momentum": 1.5}, ValueError, r"momentum must be in \[0, 1\] or None"),
    ({"eps": -1.0}, ValueError, r"eps must be positive \(> 0\) and finite, got -1.0"),
    ({"eps": 0.0}, ValueError, r"eps must be positive \(> 0\) and finite, got 0.0"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        normlab.FilteredBatchNorm2d(3, **kwargs)
    with pytest.raises(ValueError, match="num_features must be a positive int, got 0"):
        normlab.FilteredBatchNorm2d(0)


def test_gaussian_consistent_running_var_matches_bn_on_clean_input():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 2, 16, 16, generator=g, dtype=torch.float64) * 2.0
    consistent = normlab.FilteredBatchNorm2d(2, threshold=2.0, gaussian_consistent=True,
                                             momentum=1.0).double()
    paper = normlab.FilteredBatchNorm2d(2, threshold=2.0, momentum=1.0).double()
    bn = nn.BatchNorm2d(2, momentum=1.0).double()
    consistent(x), paper(x), bn(x)
    torch.testing.assert_close(consistent.running_var, bn.running_var, rtol=0.01, atol=0)
    torch.testing.assert_close(paper.running_var, 0.774 * bn.running_var, rtol=0.01, atol=0)


# -- batch renorm ---------------------------------------------------------------------------

def test_batch_renorm_warmup_is_batch_norm():
    brn = normlab.BatchRenorm2d(3, momentum=0.1, renorm_start=10)
    bn = nn.BatchNorm2d(3, momentum=0.1)
    for seed in range(3):
        x = with_outliers((8, 3, 4, 4), seed=seed, dtype=torch.float32)
        torch.testing.assert_close(brn(x), bn(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(brn.running_var, bn.running_var)
    assert brn.current_limits() == (1.0, 0.0)


def test_batch_renorm_formula_and_gradient_with_constant_r_d():
    brn = normlab.BatchRenorm2d(3, renorm_start=0, r_max_full_at=0, d_max_full_at=0,
                                r_max=1.5, d_max=0.5).double()
    with torch.no_grad():
        brn.running_mean.copy_(torch.tensor([0.3, -2.0, 0.0]))
        brn.running_var.copy_(torch.tensor([4.0, 0.5, 1.0]))
        brn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
    rm, rv = brn.running_mean.clone(), brn.running_var.clone()
    x = with_outliers((8, 3, 4, 4)).requires_grad_()
    y = brn(x)
    assert brn.current_limits() == (1.5, 0.5)
    # independent formula: r, d from the running stats, clipped, constants for the gradient
    xd = x.detach().requires_grad_()
    mu = xd.mean((0, 2, 3))
    sigma = (xd.var((0, 2, 3), unbiased=False) + brn.eps).sqrt()
    sig_run = (rv + brn.eps).sqrt()
    r = (sigma / sig_run).clamp(1 / 1.5, 1.5).detach()
    d = ((mu - rm) / sig_run).clamp(-0.5, 0.5).detach()
    view = (1, -1, 1, 1)
    xhat = (xd - mu.view(view)) / sigma.view(view)
    expect = (xhat * r.view(view) + d.view(view)) * brn.weight.view(view) + brn.bias.view(view)
    torch.testing.assert_close(y, expect, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, brn.weight), gy)
    ex, ew = torch.autograd.grad(expect, (xd, brn.weight), gy)
    torch.testing.assert_close(gx, ex, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gw, ew, rtol=1e-9, atol=1e-10)


def test_batch_renorm_warmup_schedule_and_errors():
    brn = normlab.BatchRenorm1d(2, renorm_start=2, r_max_full_at=6, d_max_full_at=4)
    limits = []
    for _ in range(7):
        limits.append(brn.current_limits())
        brn(torch.randn(8, 2))
    assert limits[0] == limits[2] == (1.0, 0.0)
    assert limits[4] == pytest.approx((2.0, 5.0))  # halfway for r (3 -> 2), d full at 4
    assert limits[6] == pytest.approx((3.0, 5.0))
    with pytest.raises(ValueError, match="BatchRenorm needs running statistics"):
        normlab.BatchRenorm2d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="r_max must be a number >= 1.0, got 0.5"):
        normlab.BatchRenorm2d(3, r_max=0.5)
