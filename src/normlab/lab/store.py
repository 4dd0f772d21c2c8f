"""The run store: one SQLite database (``runs.sqlite``) in the output folder.

Every finished run is one row keyed by ``(config_hash, seed)`` holding the full config, the
per-epoch metrics, the chosen epoch (best validation accuracy), its test accuracy, the wall
time, the device and the library versions. A row is written in a **single transaction only
when the run has finished**, so killing the process at any moment loses no finished run and
leaves no half-written one; re-running the same command skips the rows that exist.

Several processes (``--jobs N``) may write to the same database at once: the database is in
WAL mode and every connection waits up to ``timeout`` seconds for the write lock.

The ``meta`` table holds the *plan* of the comparison this folder belongs to (its variants,
seeds and baseline), so ``normlab report DIR`` can re-render the report from the database
alone. A folder holds one comparison: :meth:`RunStore.claim_meta` sets the plan in one
transaction and refuses a plan with other methods (see ``normlab.lab.cli.run_plan``).

A finished folder can be read without writing to it (``readonly=True``: read-only folders,
another user's results). Any file that is not a normlab run database (garbage, truncated,
another schema) is a one-line ``ValueError`` naming it.
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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
_COLUMNS = {"runs": {"config_hash", "seed", "config", "epochs", "chosen_epoch", "val_acc",
                     "test_acc", "wall_time", "device", "versions", "extra", "finished_at"},
            "meta": {"key", "value"}}
_CORRUPT = ("not a database", "malformed", "no such table", "no such column", "has no column")


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

    def __init__(self, out_dir: str | Path, *, timeout: float = 60.0, create: bool = True,
                 readonly: bool = False):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / DB_NAME
        self.readonly = bool(readonly)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"{str(self.out_dir)!r} is a file, not a run folder")
        if self.path.exists() and not self.path.is_file():
            raise ValueError(f"{str(self.path)!r} is not a file; normlab keeps its runs there")
        if (not create or readonly) and not self.path.is_file():
            raise FileNotFoundError(
                f"no run database at {str(self.path)!r}; run `normlab compare --out "
                f"{self.out_dir}` first")
        if not readonly:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.timeout = float(timeout)
        with self._connect() as conn:
            if not readonly:
                conn.executescript(_SCHEMA)
            self._check_schema(conn)

    def _error(self, error: Exception) -> ValueError:
        """A one-line error naming the database, for an sqlite3 or JSON error."""
        text = " ".join(str(error).split())
        hint = ""
        if any(word in text for word in _CORRUPT) or isinstance(error, ValueError):
            hint = ("; this file is not an intact normlab run database: move it away or use "
                    "another --out")
        return ValueError(f"run database {str(self.path)!r}: {text}{hint}")

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        for table, wanted in _COLUMNS.items():
            have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            if not wanted <= have:
                raise self._error(sqlite3.DatabaseError(
                    f"table {table} has no column(s) {sorted(wanted - have)}"))

    def _connect(self) -> "_Closing":
        try:
            if self.readonly:
                return _Closing(self._connect_readonly(), self)
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            # WAL lets readers work while one writer commits; set once per database
            # (persistent).
            for attempt in range(20):
                try:
                    conn.execute("PRAGMA journal_mode = WAL")
                    break
                except sqlite3.OperationalError as error:
                    if any(word in str(error) for word in _CORRUPT) or attempt == 19:
                        raise
                    time.sleep(0.05 * (attempt + 1))  # another process is switching it now
            conn.execute("PRAGMA synchronous = NORMAL")
            return _Closing(conn, self)
        except sqlite3.Error as error:
            raise self._error(error) from None

    def _connect_readonly(self) -> sqlite3.Connection:
        """Read without writing anything: ``mode=ro``. In a folder where SQLite cannot create
        its shared-memory file (read-only, another user's), ``immutable=1`` — but only when no
        write-ahead log holds runs not yet merged into the file, which it would not see."""
        uri = "file:" + urllib.parse.quote(str(self.path.resolve()))
        try:
            conn = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=self.timeout,
                                   isolation_level=None)
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError as error:
            if "unable to open" not in str(error) and "readonly" not in str(error):
                raise
        wal = self.path.with_name(self.path.name + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise ValueError(f"run database {str(self.path)!r}: {wal.name} holds changes not yet "
                             f"merged into it and the folder is read-only here; open it once "
                             f"with write access (any normlab command as its owner merges them) "
                             f"or copy the folder, both files, somewhere writable")
        conn = sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, isolation_level=None)
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return conn

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
        try:
            return [StoredRun(h, int(s), json.loads(c), json.loads(e), int(ch), v, t, w, d,
                              json.loads(ver), json.loads(x), f)
                    for h, s, c, e, ch, v, t, w, d, ver, x, f in rows]
        except (ValueError, TypeError) as error:
            raise self._error(ValueError(f"a run row is malformed ({error})")) from None

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
        if row is None:
            return default
        try:
            return json.loads(row[0])
        except ValueError as error:
            raise self._error(ValueError(f"meta {key!r} is malformed JSON ({error})")) from None

    def claim_meta(self, key: str, value: Any,
                   conflict: Callable[[Any], str | None] = lambda old: None) -> None:
        """Set meta ``key`` to ``value`` in one transaction, unless it holds a value for which
        ``conflict(old)`` returns a reason: then ``ValueError(reason)`` and nothing changes.
        Two processes claiming at once are serialized by SQLite's write lock."""
        text = json.dumps(value, sort_keys=True)
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
                reason = None
                if row is not None:
                    try:
                        old = json.loads(row[0])
                    except ValueError as error:
                        raise self._error(ValueError(
                            f"meta {key!r} is malformed JSON ({error})")) from None
                    reason = conflict(old)
                if reason is not None:
                    raise ValueError(reason)
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                             (key, text))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise


def _num(value: float | None) -> float | None:
    return None if value is None else float(value)


class _Closing:
    """A connection used as ``with`` block that *closes* it at the end (sqlite3's own context
    manager only commits) and turns sqlite3 errors into the store's one-line ``ValueError``."""

    def __init__(self, conn: sqlite3.Connection, store: RunStore):
        self.conn, self.store = conn, store

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        self.conn.close()
        if isinstance(error, sqlite3.Error):
            raise self.store._error(error) from None
