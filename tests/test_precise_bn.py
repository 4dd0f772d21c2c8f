"""normlab.precise_bn_ against Algorithm 2 of Ioffe & Szegedy 2015 (arXiv 1502.03167),
computed independently in float64: running mean = average of the batch means, running var =
average of m_b/(m_b − 1)·σ²_b (the kept count M_b for filtered layers), for every layer type,
in a chain (downstream layers see the training-mode output upstream), and across 2 gloo
processes for the synchronized layers."""

import math
import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import normlab
from normlab import distributed as D

ATOL = 1e-10


def batches_of(shape, count, seed=0, outliers=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(count):
        x = torch.randn(*shape, generator=g, dtype=torch.float64) * 1.5 + 0.3 * b
        if outliers:  # a different number of far values per batch: the kept counts differ
            flat = x.view(x.shape[0], x.shape[1], -1)
            for k in range(b % 3 + 1):
                flat[k, 0, 0] = 40.0 + 10 * k
        out.append(x)
    return out


def flat(x):
    return x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 1).reshape(x.shape[1], -1)


def plain_stats(x):
    """Per channel (mean, biased var, count) of x (N, C, *), written out by hand."""
    v = flat(x)
    m = v.shape[1]
    mean = v.sum(1) / m
    var = ((v - mean[:, None]) ** 2).sum(1) / m
    return mean, var, torch.full_like(mean, m)


def filtered_stats(x, threshold, eps, kappa=1.0):
    """Filtered-BN eq. 4–7 by hand: z-score with the plain moments, keep |z| ≤ T, recompute."""
    v = flat(x)
    mean0, var0, _ = plain_stats(x)
    keep = ((v - mean0[:, None]) / torch.sqrt(var0[:, None] + eps)).abs() <= threshold
    means, variances, counts = [], [], []
    for c in range(v.shape[0]):
        kept = v[c][keep[c]] if keep[c].any() else v[c]
        mu = kept.mean()
        means.append(mu)
        variances.append(((kept - mu) ** 2).mean() / kappa)
        counts.append(float(kept.numel()))
    return torch.stack(means), torch.stack(variances), torch.tensor(counts, dtype=v.dtype)


def algorithm2(per_batch):
    """running mean = 1/B Σ μ_b; running var = 1/B Σ m_b/(m_b − 1) σ²_b."""
    means = torch.stack([m for m, _, _ in per_batch])
    unbiased = torch.stack([v * c / (c - 1) for _, v, c in per_batch])
    return means.mean(0), unbiased.mean(0)


def normalize(x, mean, var, eps, weight, bias):
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps) * weight.view(shape) \
        + bias.view(shape)


def randomized(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight.copy_(torch.rand(module.weight.shape, generator=g, dtype=torch.float64) + .5)
        if module.bias is not None:
            module.bias.copy_(torch.rand(module.bias.shape, generator=g, dtype=torch.float64) - .5)
        module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=g,
                                              dtype=torch.float64))
        module.running_var.copy_(torch.rand(module.running_var.shape, generator=g,
                                            dtype=torch.float64) + 0.5)
        module.num_batches_tracked.fill_(7)
    return module


LAYERS = {
    "torch-bn2d": (lambda: nn.BatchNorm2d(3), (6, 3, 2, 2), None, 1.0),
    "torch-bn1d": (lambda: nn.BatchNorm1d(4), (10, 4), None, 1.0),
    "fbn2d-T2": (lambda: normlab.FilteredBatchNorm2d(3, threshold=2.0), (6, 3, 2, 2), 2.0, 1.0),
    "fbn1d-T1.5-gauss": (lambda: normlab.FilteredBatchNorm1d(4, threshold=1.5,
                                                             gaussian_consistent=True),
                         (12, 4, 3), 1.5, normlab.functional.truncated_normal_variance_factor(1.5)),
    "fbn3d-T2": (lambda: normlab.FilteredBatchNorm3d(2, threshold=2.0), (4, 2, 2, 2, 3), 2.0, 1.0),
    "brn2d": (lambda: normlab.BatchRenorm2d(3, renorm_start=0, r_max_full_at=1, d_max_full_at=1),
              (6, 3, 2, 2), None, 1.0),
    "fbrn1d": (lambda: normlab.BatchRenorm1d(4, threshold=2.0, renorm_start=0, r_max_full_at=1,
                                             d_max_full_at=1), (10, 4), 2.0, 1.0),
    "sync-fbn-single-process": (lambda: D.SyncFilteredBatchNorm(3), (6, 3, 2, 2), 2.0, 1.0),
    "torch-syncbn-single-process": (lambda: nn.SyncBatchNorm(3), (6, 3, 2, 2), None, 1.0),
    "rbn": (lambda: normlab.nn.ScaleCalibratedBatchNorm2d(3, stats="normalized"),
            (6, 3, 2, 2), None, 1.0),
    "iebn-minus-filtered": (lambda: normlab.nn.ScaleCalibratedBatchNorm1d(
        4, stats=None, wb_init=-1.0, threshold=2.0), (10, 4), 2.0, 1.0),
    "a2": (lambda: normlab.nn.AltScaleBatchNorm2d(3, form="a2"), (6, 3, 2, 2), None, 1.0),
    "input-norm": (lambda: normlab.nn.InputNorm(3), (6, 3, 2, 2), None, 1.0),
}


@pytest.mark.parametrize("kind", LAYERS)
def test_each_layer_type_equals_algorithm_2_in_float64(kind):
    make, shape, threshold, kappa = LAYERS[kind]
    layer = randomized(make().double())
    xs = batches_of(shape, 5)
    expected = [plain_stats(x) if threshold is None else
                filtered_stats(x, threshold, layer.eps, kappa) for x in xs]
    if threshold is not None:  # the outliers really change the kept count between batches
        assert len({tuple(c.tolist()) for _, _, c in expected}) > 1
    mean, var = algorithm2(expected)
    momentum, tracked = layer.momentum, int(layer.num_batches_tracked)
    layer.eval()
    normlab.precise_bn_(layer, xs, progress=False)
    torch.testing.assert_close(layer.running_mean, mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.running_var, var, atol=ATOL, rtol=0)
    assert not layer.training and layer.momentum == momentum
    assert int(layer.num_batches_tracked) == tracked


def test_equal_counts_give_m_over_m_minus_1_times_the_average_batch_variance():
    layer = nn.BatchNorm1d(3).double()
    xs = batches_of((8, 3), 4, outliers=False)
    normlab.precise_bn_(layer, xs, progress=False)
    m = 8
    expected_var = m / (m - 1) * torch.stack([x.var(0, unbiased=False) for x in xs]).mean(0)
    torch.testing.assert_close(layer.running_var, expected_var, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0),
                               atol=ATOL, rtol=0)


def test_a_chain_sees_the_training_output_upstream_with_the_trained_running_stats():
    """Batch renorm's training output reads its running statistics (r, d): every batch must
    see them as trained, not as the estimate in progress; the filtered layer downstream gets
    Algorithm 2 of those outputs."""
    brn = randomized(normlab.BatchRenorm1d(4, renorm_start=0, r_max_full_at=1, d_max_full_at=1,
                                           r_max=1.5, d_max=0.5).double())
    fbn = randomized(normlab.FilteredBatchNorm1d(4, threshold=2.0).double(), seed=2)
    model = nn.Sequential(brn, nn.Tanh(), fbn).eval()
    r_mean, r_var = brn.running_mean.clone(), brn.running_var.clone()
    xs = batches_of((9, 4), 4)
    first, second = [], []
    for x in xs:
        mu, var, count = plain_stats(x)
        first.append((mu, var, count))
        sigma_b, sigma = torch.sqrt(var + brn.eps), torch.sqrt(r_var + brn.eps)
        r = (sigma_b / sigma).clamp(1 / 1.5, 1.5)
        d = ((mu - r_mean) / sigma).clamp(-0.5, 0.5)
        y = torch.tanh(normalize(x, mu, var, brn.eps, brn.weight * r, brn.bias + brn.weight * d))
        second.append(filtered_stats(y.detach(), 2.0, fbn.eps))
    normlab.precise_bn_(model, xs, progress=False)
    for layer, per_batch in ((brn, first), (fbn, second)):
        mean, var = algorithm2(per_batch)
        torch.testing.assert_close(layer.running_mean, mean, atol=ATOL, rtol=0)
        torch.testing.assert_close(layer.running_var, var, atol=ATOL, rtol=0)


def test_equals_torch_update_bn_and_the_layers_cumulative_average():
    """For layers whose training forward ignores the running statistics, Algorithm 2 with
    per-batch m_b is what a cumulative average (momentum=None) computes: torch's update_bn
    on torch BN, and filtered BN's own momentum=None average over varying kept counts."""
    xs = batches_of((7, 3, 2), 6)
    ours = nn.Sequential(nn.Conv1d(3, 3, 1), nn.BatchNorm1d(3)).double()
    theirs = nn.Sequential(nn.Conv1d(3, 3, 1), nn.BatchNorm1d(3)).double()
    theirs.load_state_dict(ours.state_dict())
    normlab.precise_bn_(ours, xs, progress=False)
    torch.optim.swa_utils.update_bn(xs, theirs)
    torch.testing.assert_close(ours[1].running_mean, theirs[1].running_mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours[1].running_var, theirs[1].running_var, atol=ATOL, rtol=0)

    fbn = normlab.FilteredBatchNorm1d(3, threshold=2.0).double()
    cumulative = normlab.FilteredBatchNorm1d(3, threshold=2.0, momentum=None).double()
    normlab.precise_bn_(fbn, xs, progress=False)
    cumulative.train()
    with torch.no_grad():
        for x in xs:
            cumulative(x)
    torch.testing.assert_close(fbn.running_mean, cumulative.running_mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(fbn.running_var, cumulative.running_var, atol=ATOL, rtol=0)


def test_modes_parameters_and_batch_forms():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5),
                          nn.Linear(4, 4), normlab.FilteredBatchNorm1d(4)).double()
    model.train()
    model[4].eval()  # mixed modes survive
    params = {k: v.clone() for k, v in model.named_parameters()}
    xs = batches_of((8, 3), 3, outliers=False)
    pairs = [(x, torch.zeros(8)) for x in xs]
    normlab.precise_bn_(model, iter(pairs), progress=False)
    assert model.training and model[1].training and not model[4].training
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k])
    a = model[1].running_mean.clone()
    normlab.precise_bn_(model, [{"input": x} for x in xs], progress=True)  # dict batches, tqdm
    torch.testing.assert_close(model[1].running_mean, a, atol=ATOL, rtol=0)
    # num_batches: only the first two
    normlab.precise_bn_(model, xs, num_batches=2, progress=False)
    torch.testing.assert_close(model[1].running_mean,
                               torch.stack([model[0](x).mean(0) for x in xs[:2]]).mean(0),
                               atol=ATOL, rtol=0)


def test_empty_batches_contribute_nothing():
    layer = normlab.FilteredBatchNorm1d(3, threshold=2.0).double()
    xs = batches_of((9, 3), 3)
    normlab.precise_bn_(layer, xs[:1] + [torch.zeros(0, 3, dtype=torch.float64)] + xs[1:],
                        progress=False)
    mean, var = algorithm2([filtered_stats(x, 2.0, layer.eps) for x in xs])
    torch.testing.assert_close(layer.running_mean, mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.running_var, var, atol=ATOL, rtol=0)


def test_float32_buffers_are_written_in_their_dtype():
    layer = nn.BatchNorm2d(3)
    xs = [x.float() for x in batches_of((4, 3, 2, 2), 3)]
    normlab.precise_bn_(layer, xs, progress=False)
    assert layer.running_mean.dtype == torch.float32
    mean, var = algorithm2([plain_stats(x.double()) for x in xs])
    torch.testing.assert_close(layer.running_var.double(), var, atol=1e-5, rtol=1e-5)


def test_told_what_it_cannot_do():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        normlab.precise_bn_("model", [])
    with pytest.raises(ValueError, match="num_batches must be an int >= 1"):
        normlab.precise_bn_(nn.BatchNorm1d(2), [torch.randn(4, 2)], num_batches=0)
    with pytest.raises(ValueError, match="got no batches"):
        normlab.precise_bn_(nn.BatchNorm1d(2), [], progress=False)
    with pytest.raises(TypeError, match="batches must be tensors"):
        normlab.precise_bn_(nn.BatchNorm1d(2), ["text"], progress=False)
    with pytest.raises(ValueError, match="all_reduce=True needs"):
        normlab.precise_bn_(nn.BatchNorm1d(2), [torch.randn(4, 2)], all_reduce=True)
    with pytest.raises(ValueError, match="lazy"):
        normlab.precise_bn_(nn.LazyBatchNorm1d(), [torch.randn(4, 2)], progress=False)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        normlab.precise_bn_(nn.BatchNorm1d(2), [torch.randn(1, 2)], progress=False)
    # instance norm with running stats is left alone, and says so; an unreached layer too
    model = nn.Sequential(nn.InstanceNorm1d(2, track_running_stats=True), nn.BatchNorm1d(2))
    unused = nn.ModuleDict({"used": model, "spare": nn.BatchNorm1d(2)})
    before = unused["spare"].running_mean.clone()
    with pytest.warns(RuntimeWarning) as record:
        normlab.precise_bn_(model, [torch.randn(4, 2, 3)], progress=False)
        normlab.precise_bn_(unused["spare"], [torch.randn(4, 2)], num_batches=3, progress=False)
    text = " ".join(str(w.message) for w in record)
    assert "InstanceNorm1d" in text and "asked for 3 batches" in text
    with pytest.warns(RuntimeWarning, match="no batch reached spare"):
        class Partial(nn.Module):
            def __init__(self):
                super().__init__()
                self.used, self.spare = nn.BatchNorm1d(2), nn.BatchNorm1d(2)

            def forward(self, x):
                return self.used(x)
        partial = Partial()
        normlab.precise_bn_(partial, [torch.randn(4, 2)], progress=False)
    assert torch.equal(partial.spare.running_mean, before)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        normlab.precise_bn_(nn.BatchNorm1d(2), [torch.full((4, 2), float("nan"))],
                            progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.warns(RuntimeWarning, match="nothing to do"):
            normlab.precise_bn_(nn.Linear(2, 2), [torch.randn(4, 2)], progress=False)


# ---- two gloo processes ---------------------------------------------------------------------

WORLD = 2
SPLIT = (3, 5)  # uneven per-rank batches


def dist_model():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 1), D.SyncFilteredBatchNorm(3, threshold=2.0), nn.ReLU(),
        nn.Conv2d(3, 3, 1), D.SyncBatchRenorm(3, threshold=2.0, renorm_start=0,
                                              r_max_full_at=1, d_max_full_at=1),
        nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).double()
    randomized(model[4], seed=3)
    return model


def _worker(rank, port, outdir):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    D.setup_from_env("cpu", backend="gloo", env=env)
    model = dist_model()
    start = sum(SPLIT[:rank])
    xs = [x[start:start + SPLIT[rank]] for x in batches_of((8, 2, 2, 2), 4)]
    normlab.precise_bn_(model, xs, progress=False)
    torch.save({k: v for k, v in model.state_dict().items() if "running" in k},
               os.path.join(outdir, f"rank{rank}.pt"))
    D.cleanup()


def test_two_gloo_processes_global_statistics_and_all_reduced_sums(tmp_path):
    from test_distributed import free_port

    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    model = dist_model()
    xs = batches_of((8, 2, 2, 2), 4)
    # independent float64 computation, layer by layer, of what each process sees
    syn1, syn2, local = [], [], []
    brn = model[4]
    r_mean, r_var = brn.running_mean.clone(), brn.running_var.clone()
    with torch.no_grad():
        for x in xs:
            a = model[0](x)                        # the global batch: both ranks' rows
            mu, var, count = filtered_stats(a, 2.0, 1e-5)
            syn1.append((mu, var, count))
            fb = model[1]
            h = torch.relu(normalize(a, mu, var, fb.eps, fb.weight, fb.bias))
            b = model[3](h)
            mu2, var2, count2 = filtered_stats(b, 2.0, 1e-5)
            syn2.append((mu2, var2, count2))
            sigma_b, sigma = torch.sqrt(var2 + brn.eps), torch.sqrt(r_var + brn.eps)
            r = (sigma_b / sigma).clamp(1 / 3.0, 3.0)
            d = ((mu2 - r_mean) / sigma).clamp(-5.0, 5.0)
            c = model[5](normalize(b, mu2, var2, brn.eps, brn.weight * r,
                                   brn.bias + brn.weight * d))
            local += [plain_stats(c[:3]), plain_stats(c[3:])]  # unsynced: each rank's rows
    for key, per_batch in (("1", syn1), ("4", syn2), ("6", local)):
        mean, var = algorithm2(per_batch)
        for g in got:
            torch.testing.assert_close(g[f"{key}.running_mean"], mean, atol=ATOL, rtol=0)
            torch.testing.assert_close(g[f"{key}.running_var"], var, atol=ATOL, rtol=0)
    assert not math.isclose(float(got[0]["6.running_var"][0]),
                            float(algorithm2(local[::2])[1][0]))  # the sums were all-reduced
