"""The lab never loses a finished run and checks its input before training (issue 12):
checkpoint paths, a full disk, diverged runs, the whole plan, read-only run folders, two
comparisons on one folder, and ``python -m normlab``."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import run_cli
from normlab.lab.cli import run_plan
from normlab.lab.presets import make_plan
from normlab.lab.store import RunStore
from normlab.lab.train import RunConfig

TINY = ["--data", "digits", "--limit", "120", "--epochs", "1", "--batch-size", "16",
        "--device", "cpu"]


def _tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_checkpoint_folder_is_refused_before_training(tmp_path, capsys, monkeypatch):
    import normlab.lab.train as train

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(train, "_batches", no_training)
    folder = tmp_path / "ckpts"
    folder.mkdir()
    code, _, err = run_cli(["train", *TINY, "--out", tmp_path / "out", "--checkpoint", folder],
                        capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--checkpoint" in err and "is a folder" in err
    assert RunStore(tmp_path / "out").count() == 0 and not _tmp_files(tmp_path)


@pytest.fixture
def full_disk(monkeypatch):
    """``torch.save`` writes a little, then fails as a full disk does."""
    import normlab.lab.train as train

    def save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train.torch, "save", save)


def test_full_disk_at_checkpoint_keeps_the_run_and_leaves_no_tmp(tmp_path, capsys, full_disk):
    ckpt = tmp_path / "model.pt"
    code, out, err = run_cli(["train", *TINY, "--out", tmp_path / "out", "--checkpoint", ckpt],
                          capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "No space left on device" in err and "the run itself is stored in" in err
    assert "test accuracy" in out  # the result was printed before the save
    assert RunStore(tmp_path / "out").count() == 1
    assert not ckpt.exists() and not _tmp_files(tmp_path)


def test_full_disk_during_compare_keeps_the_run(tmp_path, capsys, full_disk):
    out = tmp_path / "cmp"
    code, _, err = run_cli(["compare", "--norms", "bn", "--seeds", "1", *TINY, "--jobs", "1",
                         "--quiet", "--no-plots", "--save-checkpoints", "--out", out], capsys)
    assert code == 1 and "No space left on device" in err.strip().splitlines()[-1]
    assert RunStore(out).count() == 1 and not _tmp_files(out)


def test_artifacts_that_cannot_be_written_do_not_lose_the_run(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "artifacts").write_text("a file where the artifacts folder goes")
    code, _, err = run_cli(["train", *TINY, "--diagnose", "--out", out], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert "artifacts" in err
    (run,) = RunStore(out).runs()
    assert "artifacts" in run.extra["artifacts_error"]


def test_diverged_run_is_stored_as_diverged(tmp_path, capsys):
    # one step at lr 1e30: the loss of that step is finite, the model's outputs are not
    code, out, _ = run_cli(["train", *TINY, "--steps", "1", "--lr", "1e30", "--out", tmp_path],
                        capsys)
    assert code == 0 and "DIVERGED" in out
    (run,) = RunStore(tmp_path).runs()
    assert run.extra["diverged"] is True and run.val_acc is None


@pytest.mark.parametrize("field", ["lr", "warmup", "gamma", "gamma_lr_divisor", "momentum",
                                   "weight_decay"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_run_config_refuses_non_finite_numbers(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be finite, got"):
        RunConfig(**{field: value})


def test_compare_checks_the_whole_plan_before_the_first_run(tmp_path, capsys):
    out = tmp_path / "cmp"
    code, _, err = run_cli(["compare", "--norms", "bn", "fbn", "gn:groups=7", "--seeds", "1",
                         *TINY, "--jobs", "1", "--out", out], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "gn:groups=7" in err
    assert not (out / "runs.sqlite").exists() or RunStore(out).count() == 0  # bn never trained


def _finished_folder(base: Path) -> Path:
    plan = make_plan(norms=["none", "bn"], seeds=1, data="digits", limit=120, epochs=1,
                     batch_size=16)
    out = base / "finished"
    run_plan(plan, out, progress=False, device="cpu")
    for name in os.listdir(out):
        assert not name.endswith(("-wal", "-shm")), name  # closed cleanly
    return out


@contextlib.contextmanager
def _read_only(folder: Path):
    """Make ``folder`` read-only for the code under test: ``chmod a-w`` (and, as root — who
    writes anywhere — run as ``nobody``)."""
    paths = [folder, *folder.rglob("*")]
    for p in paths:
        p.chmod(0o555 if p.is_dir() else 0o444)
    root = os.geteuid() == 0
    try:
        if root:
            os.setegid(65534)
            os.seteuid(65534)
        with pytest.raises(OSError):
            (folder / "probe").write_text("x")
        yield
    finally:
        if root:
            os.seteuid(0)
            os.setegid(0)
        for p in paths:
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_report_works_on_a_read_only_folder(capsys):

    base = Path(tempfile.mkdtemp())
    base.chmod(0o755)
    try:
        folder = _finished_folder(base)
        before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
        elsewhere = base / "elsewhere"
        elsewhere.mkdir(mode=0o777)
        elsewhere.chmod(0o777)
        with _read_only(folder):
            code, out, err = run_cli(["report", folder], capsys)
            assert code == 0, err
            assert "none" in out and "bn" in out and "baseline" in out
            assert len(err.strip().splitlines()) == 1 and "read-only" in err
            # (no plots: matplotlib's fonts live where the other user may not read)
            code, out, err = run_cli(["report", folder, "--out", elsewhere, "--no-plots"], capsys)
            assert code == 0, err
        assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
        assert (elsewhere / "report.md").stat().st_size > 0
        assert (elsewhere / "results.csv").stat().st_size > 0
    finally:
        shutil.rmtree(base)


def test_read_only_folder_with_unmerged_log_is_refused_not_misread(capsys):
    """A run folder copied while a writer had runs only in its write-ahead log: reading it
    without that log's shared memory would miss those runs, so it is refused with one line."""
    import sqlite3

    base = Path(tempfile.mkdtemp())
    base.chmod(0o755)
    try:
        folder = _finished_folder(base)
        writer = sqlite3.connect(folder / "runs.sqlite", isolation_level=None)
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        writer.execute("UPDATE runs SET wall_time = 2.0")  # lands in runs.sqlite-wal only
        copy = base / "copy"
        copy.mkdir()
        for name in ("runs.sqlite", "runs.sqlite-wal"):
            shutil.copy(folder / name, copy / name)
        writer.close()
        with _read_only(copy):
            code, _, err = run_cli(["report", copy, "--no-plots"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "runs.sqlite-wal holds changes not yet merged" in err
    finally:
        shutil.rmtree(base)


def test_a_folder_holds_one_comparison(tmp_path):
    common = dict(data="digits", limit=120, epochs=1, batch_size=16)
    out = tmp_path / "cmp"
    run_plan(make_plan(norms=["bn"], seeds=1, **common), out, progress=False, device="cpu")
    other = make_plan(norms=["bn", "frn"], seeds=1, **common)
    with pytest.raises(ValueError, match="holds another comparison .*give this one its own"):
        run_plan(other, out, progress=False, device="cpu")
    assert RunStore(out).count() == 1
    # more seeds of the same comparison: fine, the finished run is skipped
    counts = run_plan(make_plan(norms=["bn"], seeds=2, **common), out, progress=False,
                      device="cpu")
    assert counts == {"total": 2, "skipped": 1, "ran": 1}


def test_two_compare_processes_with_different_plans_on_one_folder(tmp_path):
    """Started together, each with its own plan: one trains, the other is refused with one
    line — neither prints the other's table."""
    out = tmp_path / "cmp"
    env = dict(os.environ, PATH="")  # `python -m normlab`, no console script needed
    common = ["--seeds", "1", *TINY, "--jobs", "1", "--threads", "1", "--quiet", "--no-plots",
              "--out", str(out)]
    procs = [subprocess.Popen([sys.executable, "-m", "normlab", "compare", "--norms", *norms,
                               *common], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
             for norms in (["bn"], ["bn", "frn"])]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    codes = sorted(code for _, _, code in results)
    assert codes == [0, 2], results
    (out_ok, _, _), = [r for r in results if r[2] == 0]
    (_, err_refused, _), = [r for r in results if r[2] == 2]
    assert err_refused.strip().splitlines() == [err_refused.strip()]
    assert "holds another comparison" in err_refused
    winner = "frn" in out_ok
    assert RunStore(out).count() == (2 if winner else 1)


def test_python_dash_m_normlab_needs_no_console_script(tmp_path):
    result = subprocess.run([sys.executable, "-m", "normlab", "train", "--lr", "inf"],
                            capture_output=True, text=True, env=dict(os.environ, PATH=""),
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("normlab train: error: argument --lr: must be a finite "
                                     "number, got inf (see `normlab train --help`)")
