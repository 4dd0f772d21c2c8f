"""The lab's command line and API end to end: interrupt and resume, bad arguments, presets in
smoke mode, reports."""

import csv
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from scipy import stats as sps

from conftest import run_cli
from normlab.cli import main
from normlab.lab.cli import compare
from normlab.lab.presets import PRESETS, Plan, Variant, make_plan
from normlab.lab.report import render_report
from normlab.lab.store import DB_NAME, RunStore
from normlab.lab.train import RunConfig


pytestmark = pytest.mark.usefixtures("one_thread")


def _count(db):
    try:
        with sqlite3.connect(db, timeout=10) as conn:
            return conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    except sqlite3.OperationalError:  # the schema is being created right now
        return 0


def test_killed_compare_resumes_with_every_run_exactly_once(tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--norms", "none", "bn", "--seeds", "3", "--limit", "1500", "--epochs",
            "3", "--jobs", "1", "--threads", "1", "--quiet", "--no-plots", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "normlab.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = out / DB_NAME
    deadline = time.time() + 90
    try:
        while time.time() < deadline:
            if db.exists() and _count(db) >= 1:
                break
            assert proc.poll() is None, "compare ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # mid-way: a run is in flight
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before = {(r.config_hash, r.seed): r.finished_at for r in RunStore(out).runs()}
    assert 1 <= len(done_before) < 6, "the kill should land after the first run, before the last"

    assert main(args) == 0  # the same command resumes
    runs = RunStore(out).runs()
    keys = [(r.config_hash, r.seed) for r in runs]
    assert len(keys) == len(set(keys)) == 6  # 2 methods × 3 seeds, each exactly once
    plan = make_plan(norms=["none", "bn"], seeds=3, limit=1500, epochs=3)
    assert set(keys) == {(v.config.config_hash(), s) for v, s in plan.runs()}
    for r in runs:  # finished runs were skipped, not trained again
        if (r.config_hash, r.seed) in done_before:
            assert r.finished_at == done_before[(r.config_hash, r.seed)]
    assert (out / "report.md").exists() and (out / "results.csv").exists()
    assert main(args) == 0 and _count(db) == 6  # nothing left to do


@pytest.mark.parametrize("argv, message", [
    (["compare", "--seeds", "0"], "argument --seeds: must be >= 1, got 0"),
    (["compare", "--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
    (["compare", "--norms", "bn", "xyz"], "unknown norm 'xyz'"),
    (["compare", "--data", "nope"], "unknown dataset 'nope'"),
    (["compare", "--model", "nope"], "unknown model 'nope'"),
    (["compare", "--lr", "-1"], "argument --lr: must be > 0, got -1"),
    (["compare", "--preset", "fbn-mnist", "--norms", "bn"], "--norms replaces the methods"),
    (["compare", "--norms", "bn", "fbn", "--baseline", "gn"], "baseline 'gn' is not one of"),
    (["compare", "--batch-sizes", "1", "--norms", "bn"], "batch_size 1 is too small"),
    (["compare", "--device", "cuda:0"] if not torch.cuda.is_available()
     else ["compare", "--device", "tpu"], "device"),
    (["train", "--batch-size", "abc"], "argument --batch-size: expected an integer, got 'abc'"),
    (["train", "--norm", "fbn:treshold=3"], "unknown option 'treshold' for norm 'fbn'"),
    (["train", "--data-option", "oops"], "expected KEY=VALUE, got 'oops'"),
    (["report", "/nonexistent/folder"], "no such folder"),
    (["compare", "--precise-bn", "0"], "argument --precise-bn: must be >= 1, got 0"),
    (["compare", "--schedule", "step"], "argument --schedule: invalid choice: 'step'"),
    (["compare", "--scale", "huge"], "argument --scale: invalid choice: 'huge'"),
    (["compare", "--preset", "revisit-gamma", "--scale", "paper"],
     "reads cifar10 (Davis & Frank 2021"),
    (["train", "--model", "mlp", "--model-option", "activation=gelu"],
     "activation must be one of sigmoid, relu, tanh"),
    (["train", "--model", "lenet5", "--probe", "shape"],
     "the probes measure the fully connected net"),
    (["compare", "--preset", "bn-learning-rate", "--lr", "0.1"],
     "--lr: preset 'bn-learning-rate' varies this across its methods or groups"),
    (["compare", "--preset", "revisit-input-norm", "--input-norm", "fixed"],
     "--input-norm: preset 'revisit-input-norm' varies this"),
])
def test_bad_arguments_give_one_line_errors(argv, message, capsys, tmp_path):
    code, _, err = run_cli(argv + (["--out", tmp_path / "o"] if argv[0] == "compare" else []),
                           capsys)
    err = err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"normlab {argv[0]}: error: ")
    assert message in err


def test_list_shows_every_section(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("norms", "models", "datasets", "presets", "lenet5", "mnist", "fbn-threshold",
                 "revisit-alternatives"):
        assert word in out


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_runs_in_smoke_mode(preset, tmp_path):
    plan, counts = compare(preset, tmp_path, smoke=True, progress=False, jobs=1)
    assert counts == {"total": 2 * len(plan.variants), "skipped": 0, "ran": 2 * len(plan.variants)}
    assert RunStore(tmp_path).count() == len({(v.config.config_hash(), s) for v, s in plan.runs()})
    for name in ("report.md", "results.csv", "runs.csv", "curves.png", "final.png"):
        assert (tmp_path / name).stat().st_size > 0
    probe = {v.config.probe for v in plan.variants} - {None}
    assert (tmp_path / "percentiles.png").exists() == ("percentiles" in probe)
    assert (tmp_path / "shape.png").exists() == ("shape" in probe)
    for score in plan.scores:
        assert (tmp_path / f"results-{score.replace(':', '')}.csv").stat().st_size > 0
    varies = len({v.config.batch_size for v in plan.variants}) > 1
    assert (tmp_path / "batch_size.png").exists() == varies
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(plan.variants)
    assert sum(r["baseline"] == "1" for r in rows) == len(plan.groups)


def _fake_plan_and_store(tmp_path):
    """Two groups (batch 8, 32) × three methods, 5 seeds, with known scores."""
    variants, scores = [], {}
    base_scores = [90.0, 91.0, 89.5, 90.5, 90.2]
    for bs in (8, 32):
        for label, shift in (("bn", 0.0), ("fbn", None), ("frn", -0.5)):
            cfg = RunConfig(norm=label, batch_size=bs, epochs=2)
            variants.append(Variant(label, f"batch {bs}", cfg))
            if shift is None:  # clearly better: +1 with small noise
                scores[cfg.config_hash()] = [b + 1.0 + 0.1 * (i % 2) for i, b in
                                             enumerate(base_scores)]
            else:
                scores[cfg.config_hash()] = [b + shift for b in base_scores]
    plan = Plan("fake", variants, [1, 2, 3, 4, 5], "bn", "a fake comparison")
    store = RunStore(tmp_path)
    store.set_meta("plan", plan.to_dict())
    for v in variants:
        h = v.config.config_hash()
        for seed, acc in zip(plan.seeds, scores[h]):
            store.add_run(config_hash=h, seed=seed, config=v.config.to_dict(),
                          epochs=[{"epoch": 1, "val_acc": acc - 1, "test_acc": acc - 2},
                                  {"epoch": 2, "val_acc": acc, "test_acc": acc}],
                          chosen_epoch=2, val_acc=acc, test_acc=acc, wall_time=1.0,
                          device="cpu", versions={"torch": torch.__version__})
    return plan, scores, base_scores


def test_report_marks_significance_and_best_and_rerenders(tmp_path, capsys):
    plan, scores, base = _fake_plan_and_store(tmp_path)
    written = render_report(tmp_path)
    assert set(written) == {"report.md", "results.csv", "runs.csv", "curves.png", "final.png",
                            "batch_size.png"}
    md = (tmp_path / "report.md").read_text()
    fbn = scores[plan.variants[1].config.config_hash()]
    mean = sum(fbn) / 5
    assert f"| fbn | <u>**{mean:.2f} ± " in md     # significant and best: bold + underlined
    assert "| frn | 89.74 ± 0.56 | 5 |" in md         # worse: neither
    assert md.count("| bn | 90.24 ± 0.56 | 5 | baseline |") == 2
    with open(tmp_path / "results.csv") as f:
        rows = {(r["group"], r["method"]): r for r in csv.DictReader(f)}
    ref = sps.ttest_rel(fbn, base, alternative="greater")
    assert float(rows[("batch 8", "fbn")]["p"]) == pytest.approx(float(ref.pvalue), rel=1e-5)
    assert rows[("batch 32", "fbn")]["significant"] == "1"
    assert rows[("batch 32", "frn")]["significant"] == "0"
    with open(tmp_path / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 30

    for name in written:
        os.remove(tmp_path / name)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fbn" in out and "*" in out
    assert all((tmp_path / name).exists() for name in written)


def test_compare_cli_with_parallel_jobs(tmp_path, capsys):
    out = tmp_path / "par"
    argv = ["compare", "--norms", "bn", "fbn:threshold=3", "--seeds", "2", "--smoke", "--jobs",
            "2", "--quiet", "--no-plots", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "fbn:threshold=3" in text and "baseline" in text
    assert "4 runs trained, 0 already finished" in text
    assert RunStore(out).count() == 4
    assert main(argv) == 0
    assert "0 runs trained, 4 already finished" in capsys.readouterr().out


def test_torchrun_sync_stats_matches_one_process(tmp_path):
    """2 processes × half batches with synchronized statistics and averaged gradients train
    the same model as one process with the whole batch."""
    out = tmp_path / "ddp"
    # torchrun as `python -m torch.distributed.run`, normlab as `-m normlab`: no PATH needed
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", "--master_port=29671", "-m", "normlab", "compare", "--norms", "bn", "--seeds", "1", "--smoke",
           "--sync-stats", "--quiet", "--no-plots", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = RunStore(out).runs()
    assert run.config["sync_stats"] and run.extra["world_size"] == 2
    from normlab.lab.train import train_run

    single = train_run(RunConfig.from_dict(dict(run.config, sync_stats=False)), 1)
    for got, ref in zip(run.epochs, single.epochs):  # (train metrics: rank 0's shard only)
        assert got["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-4)
        assert got["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-4)
