"""Synchronized batch statistics across 2 gloo processes == one process on the whole batch.

The multi-process test spawns 2 CPU processes (gloo, 127.0.0.1 only) once; each runs every
case on its slice of a batch and saves what it saw; the parent compares with a single
process on the whole batch (float64, atol 1e-10).
"""

import copy
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normlab
from normlab import distributed as D

ATOL = 1e-10
WORLD = 2

# name, kind, shape, per-rank split of the batch, constructor keywords
CASES = [
    ("fbn2d_even", "fbn", (8, 3, 4, 4), (4, 4), dict(threshold=2.0)),
    ("fbn2d_uneven", "fbn", (8, 3, 4, 4), (3, 5), dict(threshold=2.0, momentum=None)),
    ("fbn1d_gauss_fallback", "fbn", (8, 3), (3, 5),
     dict(threshold=0.5, gaussian_consistent=True)),
    ("fbn3d_empty_rank", "fbn", (6, 2, 2, 2, 3), (0, 6), dict(threshold=2.0, affine=False)),
    ("bn2d_uneven", "bn", (8, 3, 4, 4), (3, 5), {}),
    ("bn1d_single_sample_rank", "bn", (5, 4), (1, 4), {}),
    ("brn2d", "brn", (8, 3, 4, 4), (3, 5),
     dict(renorm_start=0, r_max_full_at=1, d_max_full_at=1, r_max=1.2, d_max=0.3,
          momentum=0.3)),
    ("fbrn1d", "brn", (8, 3, 5), (5, 3),
     dict(threshold=2.0, renorm_start=0, r_max_full_at=2, d_max_full_at=2, momentum=0.3)),
]

TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
FBN = {1: normlab.FilteredBatchNorm1d, 2: normlab.FilteredBatchNorm2d,
       3: normlab.FilteredBatchNorm3d}
BRN = {1: normlab.BatchRenorm1d, 2: normlab.BatchRenorm2d, 3: normlab.BatchRenorm3d}


def make_input(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 2.0 + 0.5
    flat = x.view(x.shape[0], x.shape[1], -1)
    flat[1, 0, 0] = 60.0          # rare large activations: the filter must drop them
    flat[-2, 1, -1] = -45.0
    if shape == (8, 3):           # channel 2: ±1, every |z| ≈ 1 > T=0.5 → keeps nothing
        flat[:, 2, 0] = torch.tensor([1.0, -1.0] * (shape[0] // 2), dtype=x.dtype)
    return x


def make_module(kind, shape, kw):
    dim = {2: 1, 3: 1, 4: 2, 5: 3}[len(shape)]
    channels = shape[1]
    torch.manual_seed(3)
    module = {"fbn": FBN, "bn": TORCH_BN, "brn": BRN}[kind][dim](channels, **kw).double()
    with torch.no_grad():
        if module.weight is not None:
            module.weight.uniform_(0.5, 1.5), module.bias.uniform_(-1, 1)
        if kind == "brn":  # running stats away from the batch's, so r and d are clipped
            module.running_mean.uniform_(-1, 1), module.running_var.uniform_(0.5, 3)
    return module


def run_protocol(module, shape, rows, device="cpu", dtype=torch.float64):
    """Two training steps (the second with backward) and one eval step on batch ``rows``."""
    def batch(seed):
        return make_input(shape, seed).to(device=device, dtype=dtype)[rows]

    out = {}
    module.train()
    out["y1"] = module(batch(1)).detach()
    x2 = batch(2).requires_grad_(True)
    proj = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y2 = module(x2)
    proj = proj.to(device=device, dtype=dtype)[rows]
    (y2 * proj).sum().backward()
    out["y2"], out["x_grad"] = y2.detach(), x2.grad
    if module.weight is not None:
        out["w_grad"], out["b_grad"] = module.weight.grad, module.bias.grad
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        out[name] = getattr(module, name).clone()
    module.eval()
    out["y_eval"] = module(batch(3)).detach()
    return {k: v.cpu() for k, v in out.items()}


def gradient_penalty(module, shape, rows):
    """∂/∂θ of ‖∂ℓ/∂x‖² for ℓ = Σ y·proj (create_graph=True through the norm), θ = x, γ, β."""
    x = make_input(shape, 11)[rows].requires_grad_(True)
    proj = torch.randn(shape, generator=torch.Generator().manual_seed(12),
                       dtype=torch.float64)[rows]
    module.train()
    (gx,) = torch.autograd.grad((module(x) * proj).sum(), x, create_graph=True)
    gx.square().sum().backward()
    return {"gx": gx.detach(), "x_grad": x.grad, "w_grad": module.weight.grad,
            "b_grad": module.bias.grad}


PENALTY_CASES = [c for c in CASES if c[0] in ("fbn2d_uneven", "bn2d_uneven", "fbrn1d")]


def rank_rows(split, rank):
    start = sum(split[:rank])
    return slice(start, start + split[rank])


def _worker(rank, port, outdir, device):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    # gloo also on CUDA: the test shares one GPU between both ranks, which NCCL refuses
    ctx = D.setup_from_env(device, backend="gloo", env=env)
    result = {"ctx": (ctx.rank, ctx.world_size, ctx.local_rank, str(ctx.device), ctx.is_main,
                      ctx.backend)}
    for name, kind, shape, split, kw in CASES:
        module = normlab.convert_sync(make_module(kind, shape, kw)).to(device)
        result[name] = run_protocol(module, shape, rank_rows(split, rank), device)
        result[name]["type"] = type(module).__name__
    for name, kind, shape, split, kw in PENALTY_CASES:  # second derivatives
        module = normlab.convert_sync(make_module(kind, shape, kw)).to(device)
        result["penalty_" + name] = gradient_penalty(module, shape, rank_rows(split, rank))
    # half-precision input, float32 parameters (as under autocast): float32 statistics
    torch.manual_seed(3)
    module = D.SyncFilteredBatchNorm(3).to(device)
    result["half"] = run_protocol(module, (8, 3, 4, 4), rank_rows((3, 5), rank), device,
                                  HALF[device])
    # the same step without synchronization (each rank its own half) must differ
    name, kind, shape, split, kw = CASES[1]
    result["unsynced_y1"] = make_module(kind, shape, kw)(
        make_input(shape, 1)[rank_rows(split, rank)]).detach()
    # errors every rank raises alike: too few values in the global batch
    tiny = torch.zeros((1, 3) if rank == 0 else (0, 3), dtype=torch.float64)
    try:
        D.SyncFilteredBatchNorm(3)(tiny)
    except ValueError as err:
        result["tiny_error"] = str(err)
    # DDP end to end: wrap_ddp(sync_stats=True), uneven split, DDP-averaged gradients
    torch.manual_seed(5)
    ddp = D.wrap_ddp(ddp_model(), ctx, sync_stats=True)
    x = make_input((8, 2, 4, 4), 4)[rank_rows((3, 5), rank)].to(device)
    ddp(x).square().sum().backward()
    result["ddp_types"] = [type(m).__name__ for m in D.unwrap(ddp).modules()]
    result["ddp_grads"] = {k: p.grad.cpu() for k, p in D.unwrap(ddp).named_parameters()}
    result["metric_sum"] = D.all_reduce_sum([rank + 1.0, 1.0], ctx).cpu()
    result["shard"] = D.shard_indices(7, ctx, shuffle=True, seed=1)
    group = dist.group.WORLD
    D.cleanup()
    try:  # a module bound to a group after the group is gone
        D.SyncFilteredBatchNorm(3, process_group=group)(torch.randn(4, 3))
    except RuntimeError as err:
        result["no_group_error"] = str(err)
    result["initialized_after_cleanup"] = dist.is_initialized()
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))


def ddp_model():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), normlab.FilteredBatchNorm2d(3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(48, 2)).double()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HALF = {"cpu": torch.bfloat16, "cuda": torch.float16}


def spawn_two_ranks(tmp_path_factory, device):
    outdir = str(tmp_path_factory.mktemp("dist"))
    # spawn, never fork: a forked child inherits the parent's OpenMP/gloo thread state (the
    # suite has run torch and normlab's OpenMP kernels before) and can deadlock
    mp.start_processes(_worker, args=(free_port(), outdir, device), nprocs=WORLD, join=True,
                       start_method="spawn")
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False)
            for r in range(WORLD)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return spawn_two_ranks(tmp_path_factory, "cpu")


def close(a, b, atol=ATOL, rtol=0.0):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def check_case(got, ref, atol=ATOL, rtol=0.0, stats_rtol=0.0):
    for key in ("y1", "y2", "x_grad", "y_eval"):  # per-sample: the ranks' slices, in order
        close(torch.cat([g[key] for g in got]), ref[key], atol, rtol)
    if "w_grad" in ref:  # parameter gradients are local sums; DDP reduces them
        close(got[0]["w_grad"] + got[1]["w_grad"], ref["w_grad"], atol, rtol)
        close(got[0]["b_grad"] + got[1]["b_grad"], ref["b_grad"], atol, rtol)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        for g in got:  # identical on every rank
            close(g[key], ref[key], ATOL, stats_rtol)


def test_setup_from_env_under_torchrun_variables(two_ranks):
    for rank, res in enumerate(two_ranks):
        assert res["ctx"] == (rank, 2, rank, "cpu", rank == 0, "gloo")
        assert not res["initialized_after_cleanup"]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_two_processes_equal_one_process_on_the_whole_batch(two_ranks, case):
    name, kind, shape, split, kw = case
    ref = run_protocol(make_module(kind, shape, kw), shape, slice(None))
    got = [res[name] for res in two_ranks]
    expected_type = "SyncBatchRenorm" if kind == "brn" else "SyncFilteredBatchNorm"
    assert all(g["type"] == expected_type for g in got)
    check_case(got, ref)


@pytest.mark.parametrize("case", PENALTY_CASES, ids=[c[0] for c in PENALTY_CASES])
def test_gradient_penalty_over_two_processes_equals_one_process(two_ranks, case):
    """Second derivatives through the synchronized modules are those of the global batch
    (issue: ∂/∂γ of a gradient penalty through SyncFilteredBatchNorm over 2 gloo processes
    was [47.46, 141.25, 89.60] against [48.72, 142.44, 89.98] in one process)."""
    name, kind, shape, split, kw = case
    ref = gradient_penalty(make_module(kind, shape, kw), shape, slice(None))
    got = [res["penalty_" + name] for res in two_ranks]
    for key in ("gx", "x_grad"):  # per sample: the ranks' slices, in order
        close(torch.cat([g[key] for g in got]), ref[key], 1e-9)
    close(got[0]["w_grad"] + got[1]["w_grad"], ref["w_grad"], 1e-9)  # local sums (DDP adds)
    assert ref["b_grad"] is None and all(g["b_grad"] is None for g in got)  # β is not in ∂ℓ/∂x


def test_half_precision_input_synchronizes_float32_statistics(two_ranks):
    torch.manual_seed(3)
    ref = run_protocol(normlab.FilteredBatchNorm2d(3), (8, 3, 4, 4), slice(None), "cpu",
                       torch.bfloat16)
    got = [res["half"] for res in two_ranks]
    assert got[0]["y2"].dtype == torch.bfloat16 and got[0]["running_var"].dtype == torch.float32
    check_case(got, ref, atol=0.05, rtol=0.02, stats_rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_two_processes_on_cuda_equal_one_process(tmp_path_factory):
    got = spawn_two_ranks(tmp_path_factory, "cuda")
    for name, kind, shape, split, kw in CASES:
        check_case([res[name] for res in got],
                   run_protocol(make_module(kind, shape, kw), shape, slice(None)))
    torch.manual_seed(3)
    ref = run_protocol(normlab.FilteredBatchNorm2d(3).cuda(), (8, 3, 4, 4), slice(None), "cuda",
                       torch.float16)
    check_case([res["half"] for res in got], ref, atol=0.05, rtol=0.02, stats_rtol=1e-5)
    torch.manual_seed(5)
    model = ddp_model()
    model(make_input((8, 2, 4, 4), 4)).square().sum().backward()
    for key, p in model.named_parameters():
        close(WORLD * got[0]["ddp_grads"][key], p.grad)


def test_without_synchronization_the_halves_differ(two_ranks):
    name, kind, shape, split, kw = CASES[1]
    ref = run_protocol(make_module(kind, shape, kw), shape, slice(None))
    unsynced = torch.cat([res["unsynced_y1"] for res in two_ranks])
    assert (unsynced - ref["y1"]).abs().max() > 1e-2


def test_filter_really_drops_values_and_falls_back_in_the_cases():
    # guards that the cases exercise the filter: some values dropped, channel 2 keeps none
    x = make_input((8, 3), 2)
    m = normlab.functional.filtered_moments(x, (0,), 0.5)
    assert m.count.reshape(-1)[2] == 8 and m.count.reshape(-1)[:2].lt(8).all()
    x4 = make_input((8, 3, 4, 4), 2)
    m4 = normlab.functional.filtered_moments(x4, (0, 2, 3), 2.0)
    assert m4.count.reshape(-1).lt(128).all()


def test_ddp_with_sync_stats_matches_single_process(two_ranks):
    torch.manual_seed(5)
    model = ddp_model()
    model(make_input((8, 2, 4, 4), 4)).square().sum().backward()
    for res in two_ranks:
        assert "SyncFilteredBatchNorm" in res["ddp_types"]
        assert "FilteredBatchNorm2d" not in res["ddp_types"]
        for key, p in model.named_parameters():  # DDP averages: grad = full-batch sum / 2
            close(WORLD * res["ddp_grads"][key], p.grad)


def test_collective_helpers(two_ranks):
    for res in two_ranks:
        assert res["metric_sum"].tolist() == [3.0, 2.0]
    shards = [res["shard"] for res in two_ranks]
    sampler = [list(torch.utils.data.DistributedSampler(range(7), num_replicas=2, rank=r,
                                                         shuffle=True, seed=1)) for r in (0, 1)]
    assert shards == sampler


def test_clear_errors_raised_on_every_rank(two_ranks):
    for res in two_ranks:
        assert "more than 1 value per channel in the global batch" in res["tiny_error"]
        assert "got 1" in res["tiny_error"]
        assert "torch.distributed is not initialized" in res["no_group_error"]


# ---------------------------------------------------------------- single process
def test_not_initialized_falls_back_to_the_unsynced_modules():
    assert not dist.is_initialized()
    for kind, shape, kw in (("fbn", (8, 3, 4, 4), dict(threshold=2.0)),
                            ("bn", (8, 3, 4, 4), {}),
                            ("brn", (8, 3, 5), dict(renorm_start=0, r_max_full_at=1,
                                                    d_max_full_at=1, threshold=2.0))):
        plain = make_module(kind, shape, kw)
        synced = normlab.convert_sync(copy.deepcopy(plain))
        a, b = run_protocol(plain, shape, slice(None)), run_protocol(synced, shape, slice(None))
        for key in a:
            assert torch.equal(a[key], b[key]), (kind, key)


def test_convert_sync_keeps_parameters_buffers_config_and_mode():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), normlab.FilteredBatchNorm2d(4, threshold=3.0, gamma_init=0.5),
        nn.Sequential(nn.BatchNorm2d(4, momentum=None, eps=1e-3), nn.GroupNorm(2, 4)),
        normlab.FilterResponseNorm2d(4), nn.Flatten(),
        nn.LazyLinear(5), normlab.BatchRenorm1d(5, r_max=2.0, threshold=2.5),
        nn.BatchNorm1d(5, affine=False, track_running_stats=False),
    )
    model(torch.randn(4, 3, 6, 6))  # materialize LazyLinear, move running stats
    model[2][0].eval()
    before = copy.deepcopy(model).eval()
    params = {k: p for k, p in model.named_parameters()}
    out = normlab.convert_sync(model)
    assert out is model
    assert [type(m).__name__ for m in (model[1], model[2][0], model[2][1], model[3], model[6],
                                       model[7])] == [
        "SyncFilteredBatchNorm", "SyncFilteredBatchNorm", "GroupNorm", "FilterResponseNorm2d",
        "SyncBatchRenorm", "SyncFilteredBatchNorm"]
    for k, p in model.named_parameters():
        assert p is params[k]
    assert model[1].threshold == 3.0 and model[1].gamma_init == 0.5
    assert model[2][0].threshold is None and model[2][0].momentum is None
    assert model[2][0].eps == 1e-3 and not model[2][0].training and model[1].training
    assert model[6].r_max == 2.0 and model[6].threshold == 2.5 and model[6].momentum == 0.01
    assert model[7].weight is None and model[7].running_mean is None
    assert model.state_dict().keys() == before.state_dict().keys()
    for k, v in before.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = torch.randn(4, 3, 6, 6)
    assert torch.equal(model.eval()(x), before(x))
    single = normlab.convert_sync(nn.BatchNorm3d(2))
    assert isinstance(single, normlab.SyncFilteredBatchNorm) and single.threshold is None


def test_convert_sync_and_constructor_errors():
    with pytest.raises(TypeError, match="convert_sync expects a torch.nn.Module, got str"):
        normlab.convert_sync("model")
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup"):
        normlab.SyncFilteredBatchNorm(3, process_group="world")
    with pytest.raises(TypeError, match="process_group must be"):
        normlab.convert_sync(nn.BatchNorm2d(3), process_group=0)
    with pytest.raises(ValueError, match="cannot convert the uninitialized LazyBatchNorm2d"):
        normlab.convert_sync(nn.Sequential(nn.LazyBatchNorm2d()))
    with pytest.raises(ValueError, match="needs running statistics"):
        normlab.SyncBatchRenorm(3, track_running_stats=False)
    with pytest.raises(ValueError, match=r"expects 2D or 3D or 4D or 5D input, got 1D"):
        normlab.SyncFilteredBatchNorm(3)(torch.randn(3))


def test_setup_from_env_single_process_and_errors():
    ctx = D.setup_from_env("cpu", env={})
    assert ctx == D.DistContext(0, 1, 0, torch.device("cpu"), True, None)
    assert not ctx.distributed and not dist.is_initialized()
    assert D.setup_from_env(env={"WORLD_SIZE": "1"}).world_size == 1
    two = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29500"}
    with pytest.raises(ValueError, match="RANK is not set but WORLD_SIZE=2 .* torchrun"):
        D.setup_from_env("cpu", env={k: v for k, v in two.items() if k != "RANK"})
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer, got 'two'"):
        D.setup_from_env("cpu", env={"WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="RANK=2 must be smaller than WORLD_SIZE=2"):
        D.setup_from_env("cpu", env={**two, "RANK": "2"})
    with pytest.raises(ValueError, match="MASTER_PORT is not set"):
        D.setup_from_env("cpu", env={k: v for k, v in two.items() if k != "MASTER_PORT"})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            D.setup_from_env("cuda", env={})
    assert not dist.is_initialized()


def test_wrap_ddp_and_helpers_single_process():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ctx = D.DistContext()
    wrapped = D.wrap_ddp(model, ctx, sync_stats=True)
    assert wrapped is model and isinstance(model[1], normlab.SyncFilteredBatchNorm)
    assert D.unwrap(wrapped) is model
    with pytest.raises(RuntimeError, match="world_size=2 but torch.distributed is not init"):
        D.wrap_ddp(model, D.DistContext(rank=1, world_size=2, is_main=False))
    with pytest.raises(TypeError, match="expects a DistContext"):
        D.wrap_ddp(model, {"rank": 0})
    assert D.all_reduce_sum([1.0, 2.0], ctx).tolist() == [1.0, 2.0]


@pytest.mark.parametrize("n", [0, 1, 7, 10])
@pytest.mark.parametrize("world", [1, 3, 4])
@pytest.mark.parametrize("shuffle", [False, True])
def test_shard_indices_is_distributed_sampler(n, world, shuffle):
    for rank in range(world):
        ctx = D.DistContext(rank=rank, world_size=world, is_main=rank == 0)
        sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank,
                                                      shuffle=shuffle, seed=4)
        sampler.set_epoch(2)
        assert D.shard_indices(n, ctx, shuffle=shuffle, seed=4, epoch=2) == list(sampler)
    parts = [D.shard_indices(n, D.DistContext(rank=r, world_size=world), pad=False)
             for r in range(world)]
    assert sorted(sum(parts, [])) == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert math.ceil(n / world) == len(D.shard_indices(n, D.DistContext(world_size=world)))
