"""The functional core against independent NumPy/SciPy formulas."""

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from normlab import functional as F


def numpy_filtered_moments(values: np.ndarray, threshold: float, eps: float):
    """Independent filtered moments of one reduction set ([HA20] eq. 2-7)."""
    mu = values.mean()
    sigma = math.sqrt(values.var() + eps)
    kept = values[np.abs((values - mu) / sigma) <= threshold]
    if kept.size == 0:
        kept = values
    return kept.mean(), kept.var(), kept.size


def test_moments_match_numpy():
    x = torch.randn(6, 3, 5, 4, dtype=torch.float64)
    m = F.moments(x, (0, 2, 3))
    xn = x.numpy().transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(m.mean.reshape(-1).numpy(), xn.mean(1), rtol=1e-12)
    np.testing.assert_allclose(m.var.reshape(-1).numpy(), xn.var(1), rtol=1e-12)
    assert m.mean.shape == (1, 3, 1, 1)
    nu2 = F.mean_square(x, (2, 3))
    np.testing.assert_allclose(nu2.numpy(), (x.numpy() ** 2).mean(axis=(2, 3), keepdims=True))


def test_filtered_moments_with_planted_outliers_match_independent_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, 6, 6, generator=g, dtype=torch.float64)
    x[3, 1, 2, 2] = 40.0
    x[7, 1, 0, 5] = -25.0
    x[0, 2, 1, 1] = 30.0
    for threshold in (2.0, 3.0, 7.0):
        m = F.filtered_moments(x, (0, 2, 3), threshold, eps=1e-5)
        for c in range(4):
            mu, var, count = numpy_filtered_moments(x[:, c].numpy().ravel(), threshold, 1e-5)
            assert m.mean.reshape(-1)[c].item() == pytest.approx(mu, rel=1e-12, abs=1e-14)
            assert m.var.reshape(-1)[c].item() == pytest.approx(var, rel=1e-12)
            assert m.count.reshape(-1)[c].item() == count
    # the outliers are dropped at T=7 but were in the plain moments
    plain = F.moments(x, (0, 2, 3))
    filtered = F.filtered_moments(x, (0, 2, 3), 7.0)
    assert filtered.var[0, 1, 0, 0] < 0.5 * plain.var[0, 1, 0, 0]
    assert filtered.count[0, 1, 0, 0] == x[:, 1].numel() - 2


def test_filtered_moments_without_threshold_are_plain():
    x = torch.randn(5, 3, 7, dtype=torch.float64)
    for threshold in (None, math.inf):
        m = F.filtered_moments(x, (0, 2), threshold)
        p = F.moments(x, (0, 2))
        assert torch.equal(m.mean, p.mean) and torch.equal(m.var, p.var)


def test_uncentered_filter_masks_on_abs_x_over_nu():
    x = torch.ones(1, 1, 100, dtype=torch.float64)
    x[0, 0, 0] = 100.0
    m = F.filtered_moments(x, (2,), 3.0, centered=False, eps=0.0)
    nu2 = (x ** 2).mean()
    keep = x.abs() / nu2.sqrt() <= 3.0
    assert m.count.item() == keep.sum().item() == 99
    assert m.var.item() == pytest.approx(1.0)
    assert m.mean.item() == 0.0


def test_filter_that_keeps_nothing_falls_back_to_plain_moments():
    # two values ±1: z = ±1 (eps=0), so T=0.5 keeps nothing in that set
    x = torch.tensor([[[-1.0, 1.0], [0.0, 3.0]]], dtype=torch.float64)  # (1, 2 channels, 2)
    m = F.filtered_moments(x, (0, 2), 0.5, eps=0.0)
    assert m.count.reshape(-1).tolist() == [2, 2]
    assert m.var.reshape(-1).tolist() == pytest.approx([1.0, 2.25])


@pytest.mark.parametrize("threshold", [0.5, 1.0, 2.0, 3.0, 7.0])
def test_truncated_normal_factor_matches_scipy(threshold):
    expected = sps.truncnorm(-threshold, threshold).var()
    assert F.truncated_normal_variance_factor(threshold) == pytest.approx(expected, rel=1e-10)


def test_truncated_normal_factor_edge_cases():
    assert F.truncated_normal_variance_factor(2.0) == pytest.approx(0.7737, abs=1e-4)
    assert F.truncated_normal_variance_factor(math.inf) == 1.0
    with pytest.raises(ValueError, match="threshold must be > 0, got -1"):
        F.truncated_normal_variance_factor(-1)


def test_gaussian_consistent_variance_recovers_plain_on_clean_gaussian():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400_000, 1, generator=g, dtype=torch.float64) * 3.0 + 1.0
    plain = F.moments(x, (0,))
    paper = F.filtered_moments(x, (0,), 2.0)
    consistent = F.filtered_moments(x, (0,), 2.0, gaussian_consistent=True)
    assert paper.var.item() == pytest.approx(0.774 * plain.var.item(), rel=0.01)
    assert consistent.var.item() == pytest.approx(plain.var.item(), rel=0.01)
    assert consistent.mean.item() == pytest.approx(plain.mean.item(), abs=0.02)


def test_half_inputs_give_float32_statistics():
    x = torch.randn(4, 3, 5, 5).to(torch.bfloat16)
    m = F.filtered_moments(x, (0, 2, 3), 2.0)
    assert m.mean.dtype == m.var.dtype == torch.float32


def test_tlu_and_affine_tlu_values_and_gradient_routing():
    y = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0], requires_grad=True)
    tau = torch.tensor(0.0, requires_grad=True)
    z = F.tlu(y, tau)
    assert z.tolist() == [0.0, 0.0, 0.0, 0.5, 3.0]
    z.backward(torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0]))
    # [SK20] eq. 4: dz/dtau = 1 where y < tau; the tie y == tau goes to y
    assert tau.grad.item() == 3.0
    assert y.grad.tolist() == [0.0, 0.0, 4.0, 8.0, 16.0]
    kappa = torch.tensor(0.25)
    z = F.affine_tlu(torch.tensor([-4.0, 1.0]), kappa, torch.tensor(0.5))
    assert z.tolist() == [max(-4.0, -1.0 + 0.5), max(1.0, 0.25 + 0.5)]


def test_dims_errors():
    with pytest.raises(ValueError, match="dims is empty"):
        F.moments(torch.randn(3), ())
    with pytest.raises(TypeError, match="expected a torch.Tensor, got list"):
        F.moments([1.0, 2.0], (0,))


def test_tlu_and_affine_tlu_keep_the_activation_dtype():
    """Half activations with float32 τ/κ (autocast-style) stay half, like the fused kernels."""
    y = torch.tensor([-1.0, 0.2, 3.0], dtype=torch.bfloat16)
    tau, kappa = torch.tensor([0.5]), torch.tensor([0.25])
    assert F.tlu(y, tau).dtype == torch.bfloat16
    z = F.affine_tlu(y, kappa, tau)
    assert z.dtype == torch.bfloat16
    torch.testing.assert_close(z.float(), torch.tensor([0.25, 0.55, 3.0]), atol=5e-3, rtol=0)
