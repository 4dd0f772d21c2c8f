"""The run store: one SQLite database (``runs.sqlite``) in the output folder.

Every finished run is one row keyed by ``(config_hash, seed)`` holding the full config, the
per-epoch metrics, the chosen epoch (best validation accuracy), its test accuracy, the wall
time, the device and the library versions. A row is written in a **single transaction only
when the run has finished**, so killing the process at any moment loses no finished run and
leaves no half-written one; re-running the same command skips the rows that exist.

Several processes (``--jobs N``) may write to the same database at once: the database is in
WAL mode and every connection waits up to ``timeout`` seconds for the write lock.

The ``meta`` table holds the *plan* of the last comparison written to this folder (its
variants, seeds and baseline), so ``normlab report DIR`` can re-render the report from the
database alone.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DB_NAME = "runs.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    config_hash  TEXT    NOT NULL,
    seed         INTEGER NOT NULL,
    config       TEXT    NOT NULL,
    epochs       TEXT    NOT NULL,
    chosen_epoch INTEGER NOT NULL,
    val_acc      REAL,
    test_acc     REAL,
    wall_time    REAL    NOT NULL,
    device       TEXT    NOT NULL,
    versions     TEXT    NOT NULL,
    extra        TEXT    NOT NULL DEFAULT '{}',
    finished_at  REAL    NOT NULL,
    PRIMARY KEY (config_hash, seed)
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class StoredRun:
    """One finished run as read back from the store."""

    config_hash: str
    seed: int
    config: dict[str, Any]
    epochs: list[dict[str, float]]
    chosen_epoch: int
    val_acc: float | None
    test_acc: float | None
    wall_time: float
    device: str
    versions: dict[str, str]
    extra: dict[str, Any]
    finished_at: float


class RunStore:
    """SQLite store of finished runs in ``out_dir/runs.sqlite``.

    >>> store = RunStore("normlab-runs/compare")
    >>> store.has("3f2a...", 1)
    False
    """

    def __init__(self, out_dir: str | Path, *, timeout: float = 60.0, create: bool = True):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / DB_NAME
        if not create and not self.path.is_file():
            raise FileNotFoundError(
                f"no run database at {str(self.path)!r}; run `normlab compare --out "
                f"{self.out_dir}` first")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.timeout = float(timeout)
        with self._connect() as conn:
            conn.executescript(_SCHEMA)

    def _connect(self) -> "_Closing":
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        # WAL lets readers work while one writer commits; set once per database (persistent).
        for attempt in range(20):
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError:  # another process is switching it right now
                time.sleep(0.05 * (attempt + 1))
        conn.execute("PRAGMA synchronous = NORMAL")
        return _Closing(conn)

    # ---- runs ---------------------------------------------------------------------------
    def has(self, config_hash: str, seed: int) -> bool:
        with self._connect() as conn:
            row = conn.execute("SELECT 1 FROM runs WHERE config_hash = ? AND seed = ?",
                               (config_hash, int(seed))).fetchone()
        return row is not None

    def finished_keys(self) -> set[tuple[str, int]]:
        """``{(config_hash, seed)}`` of every finished run."""
        with self._connect() as conn:
            return {(h, int(s)) for h, s in conn.execute("SELECT config_hash, seed FROM runs")}

    def add_run(self, *, config_hash: str, seed: int, config: dict[str, Any],
                epochs: list[dict[str, float]], chosen_epoch: int, val_acc: float | None,
                test_acc: float | None, wall_time: float, device: str,
                versions: dict[str, str], extra: dict[str, Any] | None = None) -> bool:
        """Write one finished run in a single transaction; returns False if it already existed
        (another process finished the same run first; the first one is kept)."""
        values = (config_hash, int(seed), json.dumps(config, sort_keys=True),
                  json.dumps(epochs), int(chosen_epoch), _num(val_acc), _num(test_acc),
                  float(wall_time), str(device), json.dumps(versions, sort_keys=True),
                  json.dumps(extra or {}, sort_keys=True), time.time())
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO runs (config_hash, seed, config, epochs, chosen_epoch,"
                    " val_acc, test_acc, wall_time, device, versions, extra, finished_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return cursor.rowcount == 1

    def runs(self, config_hash: str | None = None) -> list[StoredRun]:
        """Finished runs (of one config, or all), ordered by config then seed."""
        query = ("SELECT config_hash, seed, config, epochs, chosen_epoch, val_acc, test_acc,"
                 " wall_time, device, versions, extra, finished_at FROM runs")
        params: tuple = ()
        if config_hash is not None:
            query += " WHERE config_hash = ?"
            params = (config_hash,)
        query += " ORDER BY config_hash, seed"
        with self._connect() as conn:
            rows = conn.execute(query, params).fetchall()
        return [StoredRun(h, int(s), json.loads(c), json.loads(e), int(ch), v, t, w, d,
                          json.loads(ver), json.loads(x), f)
                for h, s, c, e, ch, v, t, w, d, ver, x, f in rows]

    def count(self) -> int:
        with self._connect() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    # ---- meta ---------------------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        with self._connect() as conn:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                         (key, json.dumps(value, sort_keys=True)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        with self._connect() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])


def _num(value: float | None) -> float | None:
    return None if value is None else float(value)


class _Closing:
    """A connection used as ``with`` block that *closes* it at the end (sqlite3's own context
    manager only commits)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc: Any) -> None:
        self.conn.close()
