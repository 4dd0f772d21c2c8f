"""A1/A2 scale formulations ([DF21] eq. 26-27) and RBN/IEBN scale calibration (eq. 28-29)."""

import math

import pytest
import torch
from torch.autograd import gradcheck

import normlab
from normlab import AltScaleBatchNorm1d, AltScaleBatchNorm2d, ScaleCalibratedBatchNorm2d


def _xhat(x, eps=1e-5):
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def _randomize(m, *names):
    with torch.no_grad():
        for n in names:
            getattr(m, n).uniform_(-1.5, 1.5)
    return m


def test_a1_a2_forward_matches_formula():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64) * 3 + 1
    a1 = _randomize(AltScaleBatchNorm2d(4, form="a1", dtype=torch.float64), "weight", "bias")
    g, b = a1.weight.view(1, 4, 1, 1), a1.bias.view(1, 4, 1, 1)
    torch.testing.assert_close(a1(x), g * (_xhat(x) + b))
    a2 = _randomize(AltScaleBatchNorm2d(4, form="a2", dtype=torch.float64),
                    "weight", "bias", "gamma0")
    g, b, g0 = (t.view(1, 4, 1, 1) for t in (a2.weight, a2.bias, a2.gamma0))
    torch.testing.assert_close(a2(x), g * (g0 * _xhat(x) + b))


def test_inits_follow_the_seed():
    a2 = AltScaleBatchNorm2d(3, form="a2", gamma_init=0.1)
    assert torch.all(a2.weight == 0.1) and torch.all(a2.gamma0 == 1) and torch.all(a2.bias == 0)
    assert AltScaleBatchNorm2d(3).gamma0 is None
    x = torch.randn(8, 3, 4, 4)
    for spec, s in [("rbn", 1 / (1 + math.exp(-1))), ("rbn_minus", 0.7310585786),
                    ("iebn", 1 / (1 + math.exp(1))), ("iebn_minus", 0.2689414214)]:
        m = normlab.create_norm(spec, 3)
        assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        assert torch.all(m.calib_bias == (1.0 if spec.startswith("rbn") else -1.0))
        if m.calib_weight is not None:
            assert torch.all(m.calib_weight == 0)
        assert (m.calib_weight is None) == spec.endswith("minus")
        # initial effective scale gamma * S: 0.731 for RBN, 0.269 for IEBN ([DF21] §4.5)
        torch.testing.assert_close(m(x), s * _xhat(x), rtol=1e-5, atol=1e-5)


def test_rbn_iebn_forward_matches_formula():
    torch.manual_seed(1)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64) * 2 + 0.5
    xhat = _xhat(x)
    for stats, source in [("normalized", xhat), ("input", x)]:
        m = _randomize(ScaleCalibratedBatchNorm2d(3, stats=stats, dtype=torch.float64),
                       "weight", "bias", "calib_weight", "calib_bias")
        v = lambda t: t.view(1, 3, 1, 1)  # noqa: E731
        s = torch.sigmoid(v(m.calib_weight) * source.mean(dim=(2, 3), keepdim=True)
                          + v(m.calib_bias))
        torch.testing.assert_close(m(x), v(m.weight) * s * xhat + v(m.bias))
    m = _randomize(ScaleCalibratedBatchNorm2d(3, stats=None, dtype=torch.float64),
                   "weight", "bias", "calib_bias")
    expect = (m.weight * torch.sigmoid(m.calib_bias)).view(1, 3, 1, 1) * xhat + m.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(m(x), expect)


@pytest.mark.parametrize("make", [
    lambda: AltScaleBatchNorm1d(2, form="a2", dtype=torch.float64),
    lambda: AltScaleBatchNorm1d(2, form="a1", threshold=1.5, dtype=torch.float64),
    lambda: normlab.ScaleCalibratedBatchNorm1d(2, stats="normalized", dtype=torch.float64),
    lambda: normlab.ScaleCalibratedBatchNorm1d(2, stats="input", threshold=1.5, dtype=torch.float64),
    lambda: normlab.ScaleCalibratedBatchNorm1d(2, stats=None, dtype=torch.float64),
])
def test_gradcheck(make):
    torch.manual_seed(2)
    m = make()
    names = [n for n, _ in m.named_parameters()]
    _randomize(m, *names)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    params = [p for _, p in m.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    assert gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


def test_filter_option_uses_filtered_statistics():
    torch.manual_seed(3)
    x = torch.randn(16, 3, 4, 4)
    x[0, :, 0, 0] = 40.0  # outliers
    ref = normlab.FilteredBatchNorm2d(3, affine=False, threshold=2.0)
    a1 = _randomize(AltScaleBatchNorm2d(3, form="a1", threshold=2.0), "weight", "bias")
    g, b = a1.weight.view(1, 3, 1, 1), a1.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(a1(x), g * (ref(x) + b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a1.running_mean, ref.running_mean)
    rbn = ScaleCalibratedBatchNorm2d(3, stats="normalized", threshold=2.0)
    rbn(x)
    torch.testing.assert_close(rbn.running_var, ref.running_var)


def test_eval_uses_running_stats_and_inference_affine():
    torch.manual_seed(4)
    for m in [AltScaleBatchNorm2d(3, form="a2"), ScaleCalibratedBatchNorm2d(3, stats=None),
              ScaleCalibratedBatchNorm2d(3, stats="input")]:
        _randomize(m, *[n for n, _ in m.named_parameters()])
        for _ in range(3):
            m(torch.randn(8, 3, 4, 4) * 2 + 1)
        m.eval()
        x = torch.randn(2, 3, 4, 4)
        xhat = (x - m.running_mean.view(1, 3, 1, 1)) / torch.sqrt(
            m.running_var.view(1, 3, 1, 1) + m.eps)
        if m.inference_affine() is not None:
            s, t = m.inference_affine()
            torch.testing.assert_close(m(x).double(), x.double() * s.view(1, 3, 1, 1)
                                       + t.view(1, 3, 1, 1), rtol=1e-5, atol=1e-5)
        else:  # IEBN: sample-dependent scale on running-stat-normalized input
            v = lambda t: t.view(1, 3, 1, 1)  # noqa: E731
            s = torch.sigmoid(v(m.calib_weight) * x.mean((2, 3), keepdim=True) + v(m.calib_bias))
            torch.testing.assert_close(m(x), v(m.weight) * s * xhat + v(m.bias))


def test_registry_names_and_errors():
    assert isinstance(normlab.create_norm("bn_a1", 4), AltScaleBatchNorm2d)
    assert normlab.create_norm("bn_a2:gamma_init=0.1", 4, dim=1).gamma0 is not None
    assert normlab.create_norm("iebn:threshold=2", 4, dim=3).threshold == 2.0
    assert {"bn_a1", "bn_a2", "rbn", "rbn_minus", "iebn", "iebn_minus", "inputnorm"} <= set(
        normlab.list_norms())
    with pytest.raises(ValueError, match="form must be 'a1'"):
        AltScaleBatchNorm2d(3, form="a3")
    with pytest.raises(ValueError, match="need affine=True"):
        AltScaleBatchNorm2d(3, affine=False)
    with pytest.raises(ValueError, match="stats must be 'normalized' \\(RBN\\), 'input'"):
        ScaleCalibratedBatchNorm2d(3, stats="raw")
    with pytest.raises(RuntimeError, match="only for stats=None"):
        ScaleCalibratedBatchNorm2d(3).effective_affine()
    with pytest.raises(ValueError, match="expects 4D input"):
        ScaleCalibratedBatchNorm2d(3)(torch.randn(4, 3))
