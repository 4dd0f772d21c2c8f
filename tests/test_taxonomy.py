"""normlab.taxonomy: one classification for every tool; normlab.fold: the fold math as pure
functions, against independent formulas in float64; the registry's signature-derived options
and capabilities."""

import inspect

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import normlab
from normlab import fold, registry
from normlab.taxonomy import (NORM_TYPES, Family, Tail, affine_tail, classify, eval_affine,
                              is_norm, scale_parameters, uses_batch_stats)

F64 = torch.float64

# (layer, family, tail, normlab's?) — torch's own layers are classified too
CASES = [
    (lambda: nn.BatchNorm2d(4), Family.BATCH, Tail.STANDARD, False),
    (lambda: nn.SyncBatchNorm(4), Family.BATCH, Tail.STANDARD, False),
    (lambda: nn.LazyBatchNorm1d(), Family.BATCH, Tail.STANDARD, False),
    (lambda: nn.InstanceNorm2d(4), Family.INSTANCE, Tail.STANDARD, False),
    (lambda: nn.GroupNorm(2, 4), Family.GROUP, Tail.STANDARD, False),
    (lambda: nn.LayerNorm(4), Family.LAYER, Tail.STANDARD, False),
    (lambda: nn.RMSNorm(4), Family.RMS, Tail.STANDARD, False),
    (lambda: normlab.FilteredBatchNorm2d(4), Family.BATCH, Tail.STANDARD, True),
    (lambda: normlab.SyncFilteredBatchNorm(4), Family.BATCH, Tail.STANDARD, True),
    (lambda: normlab.BatchRenorm2d(4), Family.RENORM, Tail.STANDARD, True),
    (lambda: normlab.SyncBatchRenorm(4), Family.RENORM, Tail.STANDARD, True),
    (lambda: normlab.InputNorm(4), Family.BATCH, Tail.INPUT, True),
    (lambda: normlab.create_norm("bn_a1", 4), Family.BATCH, Tail.ALT_SCALE, True),
    (lambda: normlab.create_norm("bn_a2", 4), Family.BATCH, Tail.ALT_SCALE, True),
    (lambda: normlab.create_norm("rbn", 4), Family.BATCH, Tail.SCALED, True),
    (lambda: normlab.create_norm("iebn_minus", 4), Family.BATCH, Tail.SCALED, True),
    (lambda: normlab.FilteredGroupNorm(2, 4), Family.GROUP, Tail.STANDARD, True),
    (lambda: normlab.FilteredLayerNorm(4), Family.LAYER, Tail.STANDARD, True),
    (lambda: normlab.FilteredInstanceNorm2d(4), Family.INSTANCE, Tail.STANDARD, True),
    (lambda: normlab.FilterResponseNorm2d(4), Family.FRN, Tail.STANDARD, True),
    (lambda: normlab.GroupFilterResponseNorm(2, 4), Family.FRN, Tail.STANDARD, True),
]


@pytest.mark.parametrize("make,family,tail,ours", CASES)
def test_classify_every_layer(make, family, tail, ours):
    layer = make()
    kind = classify(layer)
    assert (kind.family, kind.tail, kind.normlab) == (family, tail, ours)
    assert classify(type(layer)) == kind and is_norm(layer)
    assert uses_batch_stats(layer) == (family in (Family.BATCH, Family.RENORM))
    assert isinstance(layer, NORM_TYPES)


def test_non_norms_and_subclasses():
    for layer in (nn.Linear(2, 2), nn.Conv2d(2, 2, 1), normlab.TLU(2), nn.Identity()):
        assert classify(layer) is None and not is_norm(layer) and not uses_batch_stats(layer)

    class MyBN(normlab.FilteredBatchNorm2d):  # an extension keeps its parent's kind
        pass

    assert classify(MyBN(3)) == classify(normlab.FilteredBatchNorm2d(3))
    assert classify(MyBN(3)).normlab


def _train(layer, shape=(16, 4, 3, 3)):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
    layer.train()
    for _ in range(3):
        layer(torch.randn(shape) * 2 + 1)
    return layer.eval()


@pytest.mark.parametrize("spec", ["bn", "fbn", "brn", "bn_a1", "bn_a2", "rbn_minus",
                                  "iebn_minus", "inputnorm"])
def test_eval_affine_is_the_eval_output(spec):
    layer = _train(normlab.create_norm(spec, 4)).double()
    scale, shift = eval_affine(layer)
    x = torch.randn(5, 4, 3, 3, dtype=F64)
    torch.testing.assert_close(layer(x), x * scale.view(1, 4, 1, 1) + shift.view(1, 4, 1, 1),
                               rtol=1e-12, atol=1e-12)


def test_eval_affine_none_where_eval_is_not_a_fixed_map():
    assert eval_affine(normlab.create_norm("gn", 4)) is None            # per-sample statistics
    assert eval_affine(normlab.create_norm("rbn", 4)) is None           # S from each sample
    assert eval_affine(normlab.create_norm("bn:track_running_stats=false", 4)) is None
    assert eval_affine(nn.InstanceNorm2d(4, track_running_stats=True)) is None
    assert eval_affine(nn.Linear(4, 4)) is None


def test_affine_tail_is_w_xhat_plus_b():
    torch.manual_seed(1)
    for spec in ["bn", "bn_a1", "bn_a2", "rbn_minus", "inputnorm", "gn", "frn:act=none"]:
        layer = normlab.create_norm(spec, 4).double()
        with torch.no_grad():
            for p in layer.parameters():
                p.uniform_(-2, 2)
        (w, _, w_src), (b, _, b_src) = affine_tail(layer)
        x = torch.randn(6, 4, 5, 5, dtype=F64)
        if spec in ("bn_a1", "bn_a2", "rbn_minus", "inputnorm"):
            xhat = TF.batch_norm(x, None, None, training=True, eps=layer.eps)
        else:
            plain = spec + ("," if ":" in spec else ":") + "affine=false"
            xhat = normlab.create_norm(plain, 4).double()(x)
        w = torch.ones(4, dtype=F64) if w is None else w
        b = torch.zeros(4, dtype=F64) if b is None else b
        torch.testing.assert_close(layer(x), xhat * w.view(1, 4, 1, 1) + b.view(1, 4, 1, 1),
                                   rtol=1e-10, atol=1e-10)
        assert set(w_src) | set(b_src) <= {n for n, _ in layer.named_parameters()}
    rbn = normlab.create_norm("rbn", 4)
    with torch.no_grad():
        rbn.calib_weight.fill_(0.5)
    assert "depends on the sample" in affine_tail(rbn)
    with pytest.raises(TypeError, match="not a normalization layer"):
        affine_tail(nn.Linear(2, 2))


def test_scale_parameters():
    a2 = normlab.create_norm("bn_a2", 3)
    assert [id(p) for p in scale_parameters(a2)] == [id(a2.weight), id(a2.gamma0)]
    bn = nn.BatchNorm2d(3)
    assert scale_parameters(bn) == [bn.weight]
    assert scale_parameters(nn.BatchNorm2d(3, affine=False)) == []


# -- fold: pure functions against independent float64 formulas --------------------------------

def test_eval_scale_shift_is_batch_norms_eval():
    torch.manual_seed(2)
    mean, var = torch.randn(5, dtype=F64), torch.rand(5, dtype=F64) + 0.1
    w, b = torch.randn(5, dtype=F64), torch.randn(5, dtype=F64)
    x = torch.randn(7, 5, dtype=F64)
    for weight, bias in ((w, b), (None, b), (w, None), (None, None)):
        s, t = fold.eval_scale_shift(mean, var, 1e-3, weight, bias)
        expect = TF.batch_norm(x, mean, var, weight, bias, False, 0.0, 1e-3)
        torch.testing.assert_close(x * s + t, expect, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("layer", [nn.Linear(6, 4), nn.Conv2d(6, 4, 3, groups=2),
                                   nn.Conv1d(6, 4, 2, bias=False)])
def test_fold_after_equals_layer_then_affine(layer):
    torch.manual_seed(3)
    layer = layer.double()
    s, t = torch.randn(4, dtype=F64), torch.randn(4, dtype=F64)
    x = torch.randn(3, 6, *([5] * (layer.weight.dim() - 2)), dtype=F64)
    w, b = fold.fold_after(layer.weight, layer.bias, s, t)
    view = [1, -1] + [1] * (x.dim() - 2)
    expect = layer(x) * s.view(view) + t.view(view)
    got = (TF.linear(x, w, b) if isinstance(layer, nn.Linear)
           else layer._conv_forward(x, w, b))
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="one per output channel"):
        fold.fold_after(layer.weight, layer.bias, s[:2], t[:2])


def _naive_bias_term(weight, t, layout, groups):
    """Σ over input channels and taps of W·t, per output channel, by explicit loops."""
    if layout == "linear":
        return torch.stack([sum(weight[o, c] * t[c] for c in range(weight.shape[1]))
                            for o in range(weight.shape[0])])
    if layout == "conv":
        out, in_g = weight.shape[:2]
        return torch.stack([sum(weight[o, j].sum() * t[(o // (out // groups)) * in_g + j]
                                for j in range(in_g)) for o in range(out)])
    cin, out_g = weight.shape[:2]
    in_g = cin // groups
    return torch.stack([sum(weight[g * in_g + j, o % out_g].sum() * t[g * in_g + j]
                            for j in range(in_g))
                        for o in range(out_g * groups) for g in [o // out_g]])


@pytest.mark.parametrize("layout,layer", [
    ("linear", nn.Linear(6, 4)),
    ("conv", nn.Conv2d(6, 4, 3, groups=2)),
    ("conv", nn.Conv1d(6, 4, 1, bias=False)),
    ("conv_transpose", nn.ConvTranspose2d(6, 4, 3, groups=2)),
])
def test_fold_before_equals_affine_then_layer(layout, layer):
    torch.manual_seed(4)
    layer = layer.double()
    groups = getattr(layer, "groups", 1)
    s, t = torch.randn(6, dtype=F64), torch.randn(6, dtype=F64)
    w, b = fold.fold_before(layer.weight, layer.bias, s, t, layout=layout, groups=groups)
    bias = layer.bias if layer.bias is not None else torch.zeros(4, dtype=F64)
    torch.testing.assert_close(b, bias + _naive_bias_term(layer.weight.detach(), t, layout,
                                                          groups), rtol=1e-12, atol=1e-12)
    if layout != "conv_transpose":  # no padding: every output sees every tap
        x = torch.randn(2, 6, *([5] * (layer.weight.dim() - 2)), dtype=F64)
        view = [1, -1] + [1] * (x.dim() - 2)
        expect = layer(x * s.view(view) + t.view(view))
        got = (TF.linear(x, w, b) if layout == "linear" else layer._conv_forward(x, w, b))
        torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="layout must be"):
        fold.fold_before(layer.weight, layer.bias, s, t, layout="dense")


def test_tail_translations():
    w = torch.tensor([2.0, 0.0, -1.0, 0.0], dtype=F64)
    b = torch.tensor([1.0, 3.0, 0.5, 0.0], dtype=F64)
    gamma, beta, lost = fold.tail_to_alt_scale(w, b)
    xhat = torch.randn(10, 4, dtype=F64)
    keep = ~lost
    torch.testing.assert_close((gamma * (xhat + beta))[:, keep], (w * xhat + b)[:, keep])
    assert lost.tolist() == [False, True, False, False]
    wb = torch.tensor([1.0, -1.0, 0.0, 3.0], dtype=F64)
    g = fold.tail_to_scaled(w, wb)
    torch.testing.assert_close(g * torch.sigmoid(wb), w, rtol=1e-15, atol=1e-15)


# -- registry: options from the signatures, capabilities ---------------------------------------

def test_registry_defaults_are_the_class_defaults():
    """Every option of a spec that the class also takes has the class's default, except the
    few a spec sets on purpose (fbn's threshold is the class's 2 too; gn/frn/...: none)."""
    on_purpose = {("gn", "threshold"), ("ln", "threshold"), ("in", "threshold"),
                  ("ffrn", "threshold"), ("iebn", "wb_init"), ("iebn_minus", "wb_init")}
    for name in normlab.list_norms():
        entry = registry.norm_entry(name)
        if entry.layer_type is None:
            continue
        source = normlab.GroupFilterResponseNorm if entry.kind.family is Family.FRN \
            else entry.layer_type
        params = inspect.signature(source).parameters
        for key, default in entry.options.items():
            if key in params and (name, key) not in on_purpose:
                assert default == params[key].default, (name, key)


def test_registry_bias_option_comes_from_the_signature():
    layer = normlab.create_norm("bn:bias=false", 4)
    assert layer.bias is None and layer.weight is not None
    assert normlab.create_norm("frn:bias=false", 4).bias is None


def test_registry_capabilities():
    batch = {"bn", "fbn", "brn", "bn_a1", "bn_a2", "rbn", "rbn_minus", "iebn", "iebn_minus",
             "inputnorm"}
    for name in normlab.list_norms():
        assert registry.uses_batch_stats(name) == (name in batch), name
    assert registry.uses_batch_stats("fbn:threshold=3")
    assert registry.spec_kind("none") is None
    assert registry.spec_kind("gfrn:groups=2").family is Family.FRN


def test_registry_extension_capabilities_by_probe_and_layer_type():
    try:
        normlab.register_norm("test_tax_bn", lambda c, d, **o: nn.BatchNorm2d(c, **o),
                              description="torch BN", options={"eps": 1e-5})
        assert registry.uses_batch_stats("test_tax_bn")           # probed once
        normlab.register_norm("test_tax_gn", lambda c, d, **o: nn.GroupNorm(1, c),
                              description="GN", layer_type=nn.GroupNorm)
        assert registry.spec_kind("test_tax_gn").family is Family.GROUP
        with pytest.raises(TypeError, match=r"^layer_type must be an nn.Module class, got 3$"):
            normlab.register_norm("test_tax_bad", nn.Identity, description="x", layer_type=3)
    finally:
        for name in ("test_tax_bn", "test_tax_gn"):
            registry._REGISTRY.pop(name, None)


def test_run_config_asks_the_registry_for_batch_statistics():
    from normlab.lab.train import RunConfig
    for spec in ("bn", "rbn", "bn_a2", "brn:r_max=2"):
        with pytest.raises(ValueError, match="too small for batch statistics"):
            RunConfig(norm=spec, batch_size=1)
    assert RunConfig(norm="gn", batch_size=1).batch_size == 1
    assert RunConfig(norm="frn", batch_size=1).batch_size == 1
