"""The sqlite run store: one transaction per finished run, resume keys, parallel writers."""

import multiprocessing as mp
import sqlite3

import pytest

from normlab.lab.store import DB_NAME, RunStore


def _run(store, h="abc", seed=1, acc=90.0):
    return store.add_run(config_hash=h, seed=seed, config={"norm": "bn"},
                         epochs=[{"epoch": 1, "val_acc": acc, "test_acc": acc}], chosen_epoch=1,
                         val_acc=acc, test_acc=acc, wall_time=1.5, device="cpu",
                         versions={"torch": "x"})


def test_round_trip_and_first_writer_wins(tmp_path):
    store = RunStore(tmp_path)
    assert not store.has("abc", 1)
    assert _run(store, acc=91.0)
    assert store.has("abc", 1) and not store.has("abc", 2)
    assert not _run(store, acc=50.0)  # same (config, seed) again: ignored, first kept
    (row,) = store.runs()
    assert (row.config_hash, row.seed, row.test_acc, row.chosen_epoch) == ("abc", 1, 91.0, 1)
    assert row.epochs == [{"epoch": 1, "val_acc": 91.0, "test_acc": 91.0}]
    assert row.config == {"norm": "bn"} and row.versions == {"torch": "x"}
    assert store.finished_keys() == {("abc", 1)}
    store.set_meta("plan", {"a": [1, 2]})
    assert RunStore(tmp_path).get_meta("plan") == {"a": [1, 2]}
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run database at"):
        RunStore(tmp_path / "nothing", create=False)


def _writer(path, worker, count):
    store = RunStore(path)
    for i in range(count):
        _run(store, h=f"cfg{i % 3}", seed=1 + i // 3 + 100 * worker)
        _run(store, h="shared", seed=1 + i)  # every worker writes these: each must land once


def test_parallel_processes_write_each_run_exactly_once(tmp_path):
    RunStore(tmp_path)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 15)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = RunStore(tmp_path)
    assert store.count() == 3 * 15 + 15
    keys = [(r.config_hash, r.seed) for r in store.runs()]
    assert len(keys) == len(set(keys))
