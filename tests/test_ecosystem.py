"""torch's tools on normlab's layers: every cell of docs/ecosystem.md's matrix is a test here.

Families (rows of the matrix's columns): batch statistics (FilteredBatchNorm*d), batch
renorm (BatchRenorm*d), synchronized (SyncFilteredBatchNorm/SyncBatchRenorm), the
revisiting-BN alternatives (A1/A2, RBN/IEBN), InputNorm, the per-sample filtered norms
(GN/LN/IN) and the FRN family with TLU. The rule: correct, or told — never silently wrong.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

import normlab
import normlab.functional as NF
from normlab import kernels
from normlab.distributed import SyncBatchRenorm, SyncFilteredBatchNorm

_RENORM = {"renorm_start": 0, "r_max_full_at": 0, "d_max_full_at": 0}

FAMILIES = {
    "batch": lambda c: normlab.FilteredBatchNorm2d(c, threshold=1.5),
    "renorm": lambda c: normlab.BatchRenorm2d(c, threshold=2.0, **_RENORM),
    "sync": lambda c: SyncFilteredBatchNorm(c, threshold=1.5),
    "sync_renorm": lambda c: SyncBatchRenorm(c, **_RENORM),
    "alternative": lambda c: normlab.AltScaleBatchNorm2d(c, form="a2"),
    "calibrated": lambda c: normlab.ScaleCalibratedBatchNorm2d(c, stats="normalized"),
    "input_norm": lambda c: normlab.InputNorm(c, threshold=2.0),
    "per_sample": lambda c: normlab.FilteredGroupNorm(1, c, threshold=1.5),
    "instance": lambda c: normlab.FilteredInstanceNorm2d(c, affine=True, track_running_stats=True),
    "frn": lambda c: normlab.FilterResponseNorm2d(c, threshold=2.0),
}
BATCH_NORMS = ("batch", "renorm", "sync", "sync_renorm", "input_norm")  # _BatchNorm subclasses
ALTERNATIVES = ("alternative", "calibrated")
PER_SAMPLE = ("per_sample", "instance", "frn")


def _data(n_batches=4, seed=0, dtype=torch.float32):
    """Batches of different sizes, mean 1 and spread 2, with planted outliers."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n_batches):
        x = torch.randn(3 + k, 3, 5, 5, generator=g, dtype=torch.float64) * 2 + 1
        x[0, :, 0, 0] = 40.0  # outliers the filter drops
        out.append(x.to(dtype))
    return out


def _model(family: str, dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), FAMILIES[family](4), nn.ReLU(),
                         nn.Conv2d(4, 2, 1)).to(dtype)


def _trained(family: str, dtype=torch.float32) -> nn.Sequential:
    model = _model(family, dtype)
    with torch.no_grad():
        for p in model[1].parameters():
            p.add_(torch.rand_like(p) * 0.5)
        for x in _data(3, seed=1, dtype=dtype):
            model.train()(x)
    return model


# -- torch.optim.swa_utils.update_bn ------------------------------------------------------

def _algorithm2(inputs, threshold, eps, gaussian_consistent=False):
    """Ioffe & Szegedy 2015 (arXiv 1502.03167) Algorithm 2 with filtered moments: the running
    mean is the average of the batches' (filtered) means, the running variance the average
    of their unbiased (filtered) variances, M/(M − 1) over the kept count M."""
    means, variances = [], []
    for x in inputs:
        xv = x.transpose(0, 1).reshape(x.shape[1], -1)
        m = NF.filtered_moments(xv, (1,), threshold, eps=eps,
                                gaussian_consistent=gaussian_consistent)
        count = m.count.reshape(-1)
        means.append(m.mean.reshape(-1))
        variances.append(m.var.reshape(-1) * count / (count - 1))
    return torch.stack(means).mean(0), torch.stack(variances).mean(0)


@pytest.mark.parametrize("family", BATCH_NORMS)
def test_update_bn_recomputes_filtered_statistics_as_algorithm_2(family):
    model = _trained(family, torch.float64)
    norm = model[1]
    momentum = norm.momentum
    seen = []
    hook = norm.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    loader = _data(4, seed=2, dtype=torch.float64)
    torch.optim.swa_utils.update_bn([(x, 0) for x in loader], model)
    hook.remove()
    assert len(seen) == len(loader)
    mean, var = _algorithm2(seen, norm.threshold, norm.eps)
    torch.testing.assert_close(norm.running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.running_var, var, rtol=1e-12, atol=1e-12)
    assert int(norm.num_batches_tracked) == len(loader)  # batch renorm's warm-up restarts
    assert norm.momentum == momentum and model.training


def _filtered_then_renorm(tail: bool) -> nn.Sequential:
    """conv → FilteredBatchNorm2d → conv → BatchRenorm2d (→ conv → FilteredBatchNorm2d)."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, padding=1), normlab.FilteredBatchNorm2d(4, threshold=1.5),
              nn.ReLU(), nn.Conv2d(4, 4, 1), normlab.BatchRenorm2d(4, threshold=2.0, **_RENORM)]
    if tail:
        layers += [nn.ReLU(), nn.Conv2d(4, 3, 1), normlab.FilteredBatchNorm2d(3)]
    model = nn.Sequential(*layers).double()
    with torch.no_grad():
        for x in _data(3, seed=1, dtype=torch.float64):
            model.train()(x)
    return model


def test_update_bn_equals_precise_bn():
    """Equal batch sizes, float64: torch's update_bn (the layers' own cumulative average,
    momentum=None) and normlab.precise_bn_ (Algorithm 2 from the same layers' training
    statistics) give the same running statistics for filtered BN and batch renorm — one
    definition of a batch's statistics (normlab.functional.filtered_moments, unbiased over
    the kept count M) behind both."""
    g = torch.Generator().manual_seed(3)
    loader = [torch.randn(6, 3, 5, 5, generator=g, dtype=torch.float64) * 2 + 1
              for _ in range(4)]
    for x in loader:
        x[0, :, 0, 0] = 40.0
    ours, theirs = _filtered_then_renorm(False), _filtered_then_renorm(False)
    normlab.precise_bn_(ours, loader, progress=False)
    torch.optim.swa_utils.update_bn(loader, theirs)
    for i in (1, 4):
        torch.testing.assert_close(theirs[i].running_mean, ours[i].running_mean,
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(theirs[i].running_var, ours[i].running_var,
                                   rtol=1e-12, atol=1e-12)
    # after a batch renorm they differ, by design of update_bn: it runs the renorm's
    # training forward with r, d from the statistics it is recomputing (reset, then partial
    # averages), so the layers after it see other activations than in training;
    # precise_bn_ runs every batch through the trained statistics (docs/ecosystem.md)
    ours, theirs = _filtered_then_renorm(True), _filtered_then_renorm(True)
    normlab.precise_bn_(ours, loader, progress=False)
    torch.optim.swa_utils.update_bn(loader, theirs)
    torch.testing.assert_close(theirs[4].running_var, ours[4].running_var,
                               rtol=1e-12, atol=1e-12)
    assert not torch.allclose(theirs[7].running_mean, ours[7].running_mean, rtol=1e-3)


@pytest.mark.parametrize("family", ALTERNATIVES)
def test_update_bn_passes_over_the_alternatives(family):
    """Not _BatchNorm subclasses (their weight/bias are not BN's tail): update_bn does not
    reset or average them. Alone, they are left as they are; next to a batch norm they run
    in train mode with their own momentum (docs/ecosystem.md: use normlab's recompute)."""
    model = _trained(family)
    state = copy.deepcopy(model.state_dict())
    loader = _data(2, seed=2)
    torch.optim.swa_utils.update_bn(loader, model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    mixed = nn.Sequential(_trained(family), normlab.FilteredBatchNorm2d(2))
    before = int(mixed[0][1].num_batches_tracked)
    torch.optim.swa_utils.update_bn(loader, mixed)
    assert int(mixed[0][1].num_batches_tracked) == before + len(loader)
    assert int(mixed[1].num_batches_tracked) == len(loader)


# -- torch.nn.SyncBatchNorm.convert_sync_batchnorm (Lightning's sync_batchnorm=True) --------

SYNC_TYPES = {"batch": SyncFilteredBatchNorm, "renorm": SyncBatchRenorm,
              "sync": SyncFilteredBatchNorm, "sync_renorm": SyncBatchRenorm,
              "input_norm": SyncFilteredBatchNorm}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_torch_convert_sync_batchnorm_keeps_the_method(family):
    model = _trained(family)
    old = model[1]
    x = _data(1, seed=3)[0]
    if family in ALTERNATIVES:
        with pytest.raises(ValueError, match=f"no synchronized version of {type(old).__name__}"):
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return
    reference = copy.deepcopy(model)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    new = converted[1]
    if family in PER_SAMPLE:
        assert new is old  # nothing to synchronize
    else:
        assert type(new) is SYNC_TYPES[family]
        assert new.threshold == old.threshold and new.weight is old.weight
        assert (new.bias is None) == (old.bias is None)
    for mode in (True, False):  # one process: the synchronized layer is the unsynced one
        torch.testing.assert_close(converted.train(mode)(x), reference.train(mode)(x),
                                   rtol=0, atol=0)


def test_torch_convert_sync_batchnorm_unchanged_for_torch_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, bias=False), nn.ReLU())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(converted[1]) is nn.SyncBatchNorm and converted[1].bias is None
    assert type(nn.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(3))) is nn.SyncBatchNorm


def test_timm_converter_routing_without_timm():
    """The routing normlab installs into timm's ``norm_act`` module, on a stand-in for it
    (timm itself is an optional test dependency, absent in CI): normlab's batch layers go to
    ``normlab.convert_sync``, everything else to timm's own converter."""
    import types

    from normlab import distributed

    seen = []

    def timm_convert(module, process_group=None):  # timm's converter: a module function
        seen.append(type(module).__name__)
        return module

    norm_act = types.SimpleNamespace(convert_sync_batchnorm=timm_convert)
    distributed._keep_normlab_in_timm(norm_act)
    routed = norm_act.convert_sync_batchnorm
    assert routed.__wrapped__ is timm_convert
    assert type(routed(normlab.FilteredBatchNorm2d(4))) is SyncFilteredBatchNorm
    assert type(routed(normlab.BatchRenorm2d(4))) is SyncBatchRenorm
    plain = nn.BatchNorm2d(4)
    assert routed(plain) is plain and seen == ["BatchNorm2d"]


# -- isinstance(m, _BatchNorm) patterns ----------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_isinstance_patterns(family):
    norm = FAMILIES[family](4)
    assert isinstance(norm, _BatchNorm) == (family in BATCH_NORMS)
    assert isinstance(norm, nn.BatchNorm2d) == (family in ("batch", "renorm"))
    assert isinstance(norm, nn.GroupNorm) == (family == "per_sample")
    assert isinstance(norm, nn.InstanceNorm2d) == (family == "instance")


@pytest.mark.parametrize("family", BATCH_NORMS)
def test_freezing_batch_norms_by_type_freezes_the_filtered_layers(family):
    """The fine-tuning pattern: every _BatchNorm in eval mode with frozen γ, β."""
    model = _trained(family)
    reference = copy.deepcopy(model).eval()
    model.train()
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
    x = _data(1, seed=4)[0]
    y = model(x)
    torch.testing.assert_close(y, reference(x), rtol=0, atol=0)  # running stats used
    y.sum().backward()
    assert all(p.grad is None for p in model[1].parameters())
    decay = [p for m in model.modules() if not isinstance(m, _BatchNorm)
             for p in m.parameters(recurse=False)]
    assert not any(p is q for p in decay for q in model[1].parameters())


# -- torch.nn.utils.fusion.fuse_conv_bn_eval ------------------------------------------------

@pytest.mark.parametrize("family", BATCH_NORMS)
def test_fuse_conv_bn_eval_is_exact(family):
    model = _trained(family, torch.float64).eval()
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(model[0], model[1])
    x = _data(1, seed=5, dtype=torch.float64)[0]
    torch.testing.assert_close(fused(x), model[1](model[0](x)), rtol=1e-12, atol=1e-12)


def test_fuse_conv_bn_eval_on_instance_norm_with_running_stats_is_exact():
    """Eval with running statistics is BN's per-channel map: torch's fold is exact."""
    model = _trained("instance", torch.float64).eval()
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(model[0], model[1])
    x = _data(1, seed=5, dtype=torch.float64)[0]
    torch.testing.assert_close(fused(x), model[1](model[0](x)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ("per_sample", "frn"))
def test_fuse_conv_bn_eval_refuses_per_sample_norms(family):
    model = _trained(family).eval()
    with pytest.raises(AttributeError, match="running_mean"):
        torch.nn.utils.fusion.fuse_conv_bn_eval(model[0], model[1])


# -- torch.fx -------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("spec", sorted(normlab.list_norms()))
def test_symbolic_trace_every_registry_spec(spec, training):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), normlab.create_norm_act(spec, 8),
                          nn.Conv2d(8, 4, 1), normlab.create_norm(spec, 4))
    for x in _data(2, seed=6):
        model.train()(x)
    model.train(training)
    reference = copy.deepcopy(model)
    traced = fx.symbolic_trace(model)
    for x in _data(2, seed=7):
        torch.testing.assert_close(traced(x), reference(x), rtol=0, atol=0)
        for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
            assert torch.equal(a, b), name  # buffers advance in the traced graph too


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("family", BATCH_NORMS)
def test_fx_optimization_fuse_is_exact_but_does_not_fold(family):
    """torch.fx.experimental.optimization.fuse matches ``type(m) is nn.BatchNorm2d``; a traced
    normlab layer is an F.batch_norm call in eval, which it leaves — exact, not folded.
    normlab.fuse_for_inference folds it."""
    from torch.fx.experimental.optimization import fuse
    model = _trained(family, torch.float64).eval()
    x = _data(1, seed=8, dtype=torch.float64)[0]
    fused = fuse(model)
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
    assert any(n.target is torch.nn.functional.batch_norm for n in fused.graph.nodes)
    folded, report = normlab.fuse_for_inference(copy.deepcopy(model), return_report=True)
    if family != "input_norm":  # an InputNorm folds into the conv that *follows* it
        assert not any(isinstance(m, _BatchNorm) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


# -- torch.func.replace_all_batch_norm_modules_ -------------------------------------------

@pytest.mark.parametrize("family", ("batch", "sync", "input_norm"))
def test_replace_all_batch_norm_modules_gives_batch_statistics(family):
    model = _trained(family)
    norm = model[1]
    torch.func.replace_all_batch_norm_modules_(model)
    assert norm.running_mean is None and not norm.track_running_stats
    x = _data(1, seed=9)[0]
    train_out = model.train()(x)
    torch.testing.assert_close(model.eval()(x), train_out, rtol=0, atol=0)
    assert norm.num_batches_tracked is None


def test_replace_all_batch_norm_modules_then_batch_renorm_is_told():
    model = torch.func.replace_all_batch_norm_modules_(_trained("renorm"))
    with pytest.raises(ValueError, match="BatchRenorm2d has no running statistics"):
        model(_data(1)[0])


@pytest.mark.parametrize("family", ALTERNATIVES)
def test_replace_all_batch_norm_modules_leaves_alternatives_and_vmap_tells(family):
    model = torch.func.replace_all_batch_norm_modules_(_trained(family))
    assert model[1].running_mean is not None
    # torch's message (A1/A2 run F.batch_norm) or normlab's, which names the ways out
    with pytest.raises(RuntimeError, match="running_mean or running_var, which will be updated "
                       "in place|vmap over a layer that updates running_mean or running_var: "
                       ".*replace_all_batch_norm_modules_"):
        torch.func.vmap(model)(torch.stack(_data(2)[:1] * 2))


@pytest.mark.parametrize("family", ("batch", "renorm", "alternative", "calibrated"))
def test_vmap_over_stacked_model_states_updates_each_models_running_stats(family):
    """Model ensembling (torch.func.stack_module_state + functional_call under vmap) in
    training: each model's running statistics move by its own batch, as a loop over the
    models does."""
    models = [_trained(family).train() for _ in range(2)]
    with torch.no_grad():
        models[1][1].running_mean.add_(1.0)
    loop = copy.deepcopy(models)
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = _data(1, seed=5)[0]

    def run(p, b):
        return torch.func.functional_call(base, (p, b), (x,))

    y = torch.func.vmap(run)(params, buffers)
    for k, model in enumerate(loop):
        torch.testing.assert_close(y[k], model(x), rtol=1e-5, atol=1e-5)
        for name, buffer in model.named_buffers():
            torch.testing.assert_close(buffers[name][k], buffer, rtol=1e-5, atol=1e-6)


def test_vmap_over_unfiltered_batch_norm_after_replace():
    model = torch.func.replace_all_batch_norm_modules_(nn.Sequential(
        nn.Conv2d(3, 3, 1), normlab.FilteredBatchNorm2d(3, threshold=None)))
    x = torch.randn(4, 2, 3, 4, 4)
    expected = torch.stack([model(xi) for xi in x])
    torch.testing.assert_close(torch.func.vmap(model)(x), expected)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_vmap_over_filtered_batch_norm_after_replace(backend):
    model = torch.func.replace_all_batch_norm_modules_(nn.Sequential(
        nn.Conv2d(3, 3, 1), normlab.FilteredBatchNorm2d(3)))
    x = torch.randn(4, 2, 3, 4, 4)
    with kernels.use_backend(backend):
        expected = torch.stack([model(xi) for xi in x])
        torch.testing.assert_close(torch.func.vmap(model)(x), expected)


# -- torch.ao.quantization eager fusion -----------------------------------------------------

@pytest.mark.parametrize("family", BATCH_NORMS + ALTERNATIVES)
def test_ao_eager_fuse_modules_refuses_clearly(family):
    from torch.ao.quantization import fuse_modules
    model = _trained(family).eval()
    with pytest.raises(AssertionError, match=f"did not find fuser method for.*{type(model[1]).__name__}"):
        fuse_modules(model, [["0", "1"]])


# -- the remaining cells: what the tools leave alone, and the alternatives' hazard -----------

@pytest.mark.parametrize(("ours", "theirs"), [
    (lambda: normlab.FilteredGroupNorm(2, 4, threshold=None), lambda: nn.GroupNorm(2, 4)),
    (lambda: normlab.FilteredInstanceNorm2d(4, affine=True, track_running_stats=True,
                                            threshold=None),
     lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True)),
    (lambda: normlab.FilterResponseNorm2d(4), None),
])
def test_update_bn_and_replace_all_treat_per_sample_norms_as_torchs(ours, theirs):
    """Not batch norms: neither tool resets them (update_bn runs them in train mode, so an
    InstanceNorm with running stats moves them by its momentum — exactly as torch's)."""
    results = []
    for build in filter(None, (ours, theirs)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 1), build(), normlab.FilteredBatchNorm2d(4))
        torch.optim.swa_utils.update_bn(_data(2, seed=2), model)
        torch.func.replace_all_batch_norm_modules_(model)
        assert model[2].running_mean is None  # the batch norm next to it was handled
        results.append(model[1].state_dict())
    if len(results) == 2:
        assert results[0].keys() == results[1].keys()
        assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


@pytest.mark.parametrize("family", ALTERNATIVES)
def test_fuse_conv_bn_eval_misreads_the_alternatives_use_normlab_fuse(family):
    """torch's fold reads weight/bias as BN's tail; A1/A2/RBN/IEBN's are not (documented as
    not supported in docs/ecosystem.md). normlab.fuse_for_inference folds A1/A2/RBN⁻/IEBN⁻
    exactly and keeps RBN/IEBN, whose scale depends on the sample."""
    model = _trained(family, torch.float64).eval()
    x = _data(1, seed=5, dtype=torch.float64)[0]
    expected = model[1](model[0](x))
    wrong = torch.nn.utils.fusion.fuse_conv_bn_eval(model[0], model[1])(x)
    assert not torch.allclose(wrong, expected)
    folded = normlab.fuse_for_inference(copy.deepcopy(model))
    torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("family", ALTERNATIVES + PER_SAMPLE)
def test_fx_optimization_fuse_leaves_other_norms_exact(family):
    from torch.fx.experimental.optimization import fuse
    model = _trained(family).eval()
    x = _data(1, seed=8)[0]
    torch.testing.assert_close(fuse(model)(x), model(x), rtol=0, atol=0)
