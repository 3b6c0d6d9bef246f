"""The SQLite store: every run, metric, layer, artifact and progress event.

The database is the source of truth shared by `engine run`, its worker subprocesses and the
`qtui` app. Writers are the workers (one per run) and the launching process; readers poll.
This module imports no torch so that the TUI can use it cheaply.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import sqlite_utils

from engine.db_check import check_database
from engine.file_checks import fingerprint
from engine.protocol import protocol_hash

SCHEMA_VERSION = 2
DB_NAME = "qtui.db"

# Schema 2 (the persistent queue, GPU pool and Slurm; see engine/queue_store.py): columns added
# to `runs` by the migration, so that databases of schema 1 keep working.
QUEUE_COLUMNS = {
    "queue_pos": "REAL",  # order in the queue (lower starts first); reordering rewrites it
    "batch": "TEXT",  # the runs queued together (one `engine run`): one Slurm job array
    "launch": "TEXT",  # JSON: how to start it (executor options: jobs, gpus, slurm settings)
    "claimed_by": "TEXT",  # the scheduler that claimed it (queued and claimed = starting)
    "claimed_at": "REAL",
    "cancel_requested": "INTEGER",
    "gpu": "TEXT",  # the CUDA_VISIBLE_DEVICES its worker was given
    "job_id": "TEXT",  # Slurm: array job id and task, "1234_0"; never a key on its own
    "node": "TEXT",
    "slurm_state": "TEXT",  # Slurm's own state: PENDING (reason), RUNNING, TIMEOUT, ...
    "slurm_reason": "TEXT",
    "ingested": "INTEGER",  # remote runs: bytes of the run's events file already applied
}

STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")

# Per-layer quantities that methods may fill in; NULL where a method does not produce them.
LAYER_QUANTITIES = ("bits", "weight_err", "fisher", "sensitivity", "out_err", "start_share")


# How long a write waits for another process's write lock before giving up. Workers and the
# scheduler are unattended: they must outlast a user holding a transaction open in another tool
# (sqlite3's BEGIN IMMEDIATE, a DB browser) for minutes, not fail after seconds.
BUSY_TIMEOUT_MS = 300_000


def retry_busy(step, deadline_s: float = BUSY_TIMEOUT_MS / 1000):
    """Run `step()`, retrying while SQLite says the database is locked or busy.

    The busy timeout does not cover every lock: switching a new database to WAL while another
    process holds a write lock on it fails at once with "database is locked" (SQLite refuses
    to wait where waiting could deadlock). Two `engine run`s started together into a new runs
    folder hit exactly that; retrying with a short backoff until the deadline fixes it."""
    start, pause = time.monotonic(), 0.01
    while True:
        try:
            return step()
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if "locked" not in text and "busy" not in text or time.monotonic() - start > deadline_s:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.25)


@contextmanager
def transaction(conn: sqlite3.Connection):
    """One write transaction: the statements of the block commit together or not at all.

    Needed because sqlite-utils (4.2) commits each of its write methods by itself when no
    transaction is open, so `with conn:` around several of them is not one transaction: a
    reader in another process saw a run `queued` before its folder was set. `BEGIN IMMEDIATE`
    takes the write lock at the start, waiting out another writer for up to the busy timeout
    and then raising "database is locked" (the CLI's one-line error, exit 2); reads inside the
    block are then consistent with its writes. sqlite-utils' writes inside it join it (they
    take a savepoint when a transaction is open). An exception, or a process killed before
    COMMIT, leaves nothing of the block. Nested blocks are savepoints of the outer one."""
    if conn.in_transaction:
        name = f"nested_{os.urandom(4).hex()}"
        conn.execute(f"SAVEPOINT {name}")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:  # an error such as a full disk may have ended it already
                conn.execute(f"ROLLBACK TO SAVEPOINT {name}")
                conn.execute(f"RELEASE SAVEPOINT {name}")
            raise
        conn.execute(f"RELEASE SAVEPOINT {name}")
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:  # the original error says more; SQLite rolls back on close
                pass
        raise


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def db_path(runs_dir: str | Path) -> Path:
    return Path(runs_dir) / DB_NAME


_FORBIDDEN: str | None = None


def forbid_database(reason: str) -> None:
    """From now on `Store.open` raises in this process (a remote worker: see engine/run_files.py)."""
    global _FORBIDDEN
    _FORBIDDEN = reason


@dataclass
class Store:
    """A handle on `runs_dir/qtui.db`. Create with `Store.open(runs_dir)`."""

    db: sqlite_utils.Database
    runs_dir: Path

    @classmethod
    def open(cls, runs_dir: str | Path, create: bool = True) -> "Store":
        if _FORBIDDEN:
            raise RuntimeError(f"{db_path(runs_dir)}: this process may not open the database: {_FORBIDDEN}")
        runs_dir = Path(runs_dir).resolve()  # artifact paths must not depend on a worker's cwd
        path = db_path(runs_dir)
        if not create and not path.exists():
            raise FileNotFoundError(f"{path}: no database here")
        runs_dir.mkdir(parents=True, exist_ok=True)
        check_database(path)  # DamagedDatabase before anything writes to a damaged file
        db = sqlite_utils.Database(path)
        db.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        store = cls(db=db, runs_dir=runs_dir)
        try:
            retry_busy(db.enable_wal)
            retry_busy(store._migrate)
            retry_busy(store._add_protocol_column)
            retry_busy(store._add_fingerprint_columns)
        except BaseException:
            db.conn.close()
            raise
        return store

    def close(self) -> None:
        self.db.conn.close()

    def transaction(self):
        """`with store.transaction():` the writes inside are one transaction (see `transaction`)."""
        return transaction(self.db.conn)

    # ---------------------------------------------------------------- schema
    def _migrate(self) -> None:
        db = self.db
        if "meta" in db.table_names():
            self._check_version()
            if self.schema_version() >= SCHEMA_VERSION:
                return
        # Two processes may open (or upgrade) a database at once: do it under a write lock.
        with transaction(db.conn):
            if "meta" not in db.table_names():
                self._create_schema()
            self._upgrade()
        self._check_version()

    def _check_version(self) -> None:
        current = self.db.execute("select value from meta where key = 'schema_version'").fetchone()
        if current is not None and int(current[0]) > SCHEMA_VERSION:
            raise RuntimeError(
                f"{db_path(self.runs_dir)}: schema version {current[0]} is newer than this qtui "
                f"understands ({SCHEMA_VERSION}); upgrade qtui"
            )

    def _create_schema(self) -> None:
        db = self.db
        if "meta" not in db.table_names():
            db["meta"].create({"key": str, "value": str}, pk="key")
        if "runs" not in db.table_names():
            db["runs"].create(
                {
                    "id": int,
                    "experiment": str,
                    "variant": str,
                    "status": str,
                    "config": str,
                    "config_hash": str,
                    "created_at": str,
                    "started_at": str,
                    "finished_at": str,
                    "heartbeat_at": float,
                    "error": str,
                    "git_commit": str,
                    "host": str,
                    "pid": int,
                    "executor": str,
                    "versions": str,
                    "folder": str,
                },
                pk="id",
            )
            db["runs"].create_index(["experiment", "variant"])
            db["runs"].create_index(["status"])
        if "metrics" not in db.table_names():
            db["metrics"].create(
                {"run_id": int, "name": str, "value": float},
                pk=("run_id", "name"),
                foreign_keys=[("run_id", "runs", "id")],
            )
        if "layers" not in db.table_names():
            cols = {"run_id": int, "idx": int, "name": str, "role": str, "params": int}
            cols.update({q: float for q in LAYER_QUANTITIES})
            cols["bits"] = int
            cols["extra"] = str
            db["layers"].create(
                cols, pk=("run_id", "idx"), foreign_keys=[("run_id", "runs", "id")]
            )
        if "artifacts" not in db.table_names():
            db["artifacts"].create(
                {"id": int, "run_id": int, "kind": str, "path": str},
                pk="id",
                foreign_keys=[("run_id", "runs", "id")],
            )
            db["artifacts"].create_index(["run_id"])
        if "events" not in db.table_names():
            db["events"].create(
                {
                    "id": int,
                    "run_id": int,
                    "time": float,
                    "stage": str,
                    "done": int,
                    "total": int,
                    "message": str,
                },
                pk="id",
                foreign_keys=[("run_id", "runs", "id")],
            )
            db["events"].create_index(["run_id", "id"])
        db["meta"].insert({"key": "schema_version", "value": str(SCHEMA_VERSION)})

    def _upgrade(self) -> None:
        """Schema 1 -> 2: queue columns on runs and the schedulers table (idempotent)."""
        db = self.db
        have = {c.name for c in db["runs"].columns}
        for name, kind in QUEUE_COLUMNS.items():
            if name not in have:
                db.conn.execute(f"alter table runs add column {name} {kind}")
        if "queue_pos" not in have:
            db.conn.execute("update runs set queue_pos = id where queue_pos is null")
        if "schedulers" not in db.table_names():
            db.conn.execute(
                "create table schedulers (token text primary key, host text, pid integer, "
                "started_at real, heartbeat_at real, jobs integer, gpus text)"
            )
        db.conn.execute("create index if not exists runs_queue on runs (status, queue_pos)")
        db.conn.execute(
            "insert or replace into meta (key, value) values ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )

    def _add_protocol_column(self) -> None:
        """`runs.protocol` (engine/protocol.py), added in place and filled in for old runs.
        Idempotent and safe when two processes open an old database at once."""
        if "protocol" not in self.db["runs"].columns_dict:
            try:
                with self.transaction():
                    self.db.conn.execute("alter table runs add column protocol text")
            except sqlite3.OperationalError as exc:
                if "duplicate column" not in str(exc):
                    raise
        missing = self.db.execute("select id, config from runs where protocol is null").fetchall()
        if missing:
            with self.transaction():
                self.db.conn.executemany(
                    "update runs set protocol = ? where id = ?",
                    [(protocol_hash(config or "{}"), run_id) for run_id, config in missing],
                )

    def _add_fingerprint_columns(self) -> None:
        """`artifacts.size` and `artifacts.sha256` (what `engine verify` checks a file against),
        added in place; older rows keep NULL (checked for existence only). Idempotent."""
        have = self.db["artifacts"].columns_dict
        for name, kind in (("size", "integer"), ("sha256", "text")):
            if name not in have:
                try:
                    with self.transaction():
                        self.db.conn.execute(f"alter table artifacts add column {name} {kind}")
                except sqlite3.OperationalError as exc:
                    if "duplicate column" not in str(exc):
                        raise

    def schema_version(self) -> int:
        return int(self.db["meta"].get("schema_version")["value"])

    # ---------------------------------------------------------------- runs
    def create_run(
        self,
        experiment: str,
        variant: str,
        config: dict,
        config_hash: str,
        git_commit: str | None = None,
        versions: dict | None = None,
        executor: str = "local",
        launch: dict | None = None,
        batch: str | None = None,
    ) -> int:
        # Inserted complete, in one statement: a queued row is claimable at once, so it must
        # never be seen without its folder (its id, and so its folder, is chosen under the lock).
        with self.transaction() as conn:
            run_id = conn.execute("select coalesce(max(id), 0) + 1 from runs").fetchone()[0]
            self.db["runs"].insert(
                {
                    "id": run_id,
                    "experiment": experiment,
                    "variant": variant,
                    "status": "queued",
                    "config": json.dumps(config, sort_keys=True),
                    "config_hash": config_hash,
                    "protocol": protocol_hash(config),
                    "created_at": utc_now(),
                    "git_commit": git_commit,
                    "host": socket.gethostname(),
                    "executor": executor,
                    "versions": json.dumps(versions or {}, sort_keys=True),
                    "launch": json.dumps(launch or {}, sort_keys=True),
                    "batch": batch,
                    "folder": f"run-{run_id:05d}",
                    "queue_pos": float(run_id),  # queued runs start in queue_pos order: at the end
                }
            )
        return run_id

    def run_folder(self, run_id: int) -> Path:
        return self.runs_dir / self.get_run(run_id)["folder"]

    def get_run(self, run_id: int) -> dict:
        return self.db["runs"].get(run_id)

    def runs(self, experiment: str | None = None, status: str | None = None) -> list[dict]:
        where, args = [], []
        if experiment is not None:
            where.append("experiment = ?")
            args.append(experiment)
        if status is not None:
            where.append("status = ?")
            args.append(status)
        return list(
            self.db["runs"].rows_where(" and ".join(where) or None, args, order_by="id")
        )

    def mark_running(self, run_id: int, pid: int | None = None) -> bool:
        """queued -> running, atomically: False when the run is no longer queued (cancelled
        meanwhile, or another worker of the same run got there first)."""
        with self.transaction():
            cur = self.db.conn.execute(
                "update runs set status = 'running', started_at = ?, heartbeat_at = ?, pid = ?, host = ? "
                "where id = ? and status = 'queued'",
                (utc_now(), time.time(), pid if pid is not None else os.getpid(), socket.gethostname(), run_id),
            )
        return cur.rowcount > 0

    def set_pid(self, run_id: int, pid: int) -> None:
        """The launched worker's pid, while the run waits for it: a run already running keeps
        the pid of the worker that holds it (a second launch only finds it taken)."""
        with self.transaction():
            self.db.conn.execute("update runs set pid = ?, host = ? where id = ? and status = 'queued'",
                                 (pid, socket.gethostname(), run_id))

    def finish(self, run_id: int, status: str, error: str | None = None) -> None:
        if status not in FINISHED:
            raise ValueError(f"not a finished status: {status}")
        with self.transaction():
            self.db["runs"].update(
                run_id, {"status": status, "error": error, "finished_at": utc_now()}
            )

    def finish_if_unfinished(self, run_id: int, status: str, error: str | None = None) -> bool:
        """Finish a run unless its worker already did; returns whether it changed it."""
        with self.transaction():
            cur = self.db.conn.execute(
                "update runs set status = ?, error = ?, finished_at = ? "
                "where id = ? and status in ('queued', 'running')",
                (status, error, utc_now(), run_id),
            )
        return cur.rowcount > 0

    def heartbeat(self, run_id: int) -> None:
        with self.transaction():
            self.db["runs"].update(run_id, {"heartbeat_at": time.time()})

    # ---------------------------------------------------------------- results
    def add_event(
        self, run_id: int, stage: str, done: int = 0, total: int = 0, message: str = ""
    ) -> None:
        now = time.time()
        with self.transaction():
            self.db["events"].insert(
                {
                    "run_id": run_id,
                    "time": now,
                    "stage": stage,
                    "done": done,
                    "total": total,
                    "message": message,
                }
            )
            self.db["runs"].update(run_id, {"heartbeat_at": now})

    def put_metrics(self, run_id: int, metrics: dict[str, float]) -> None:
        rows = [
            {"run_id": run_id, "name": k, "value": None if v is None else float(v)}
            for k, v in metrics.items()
        ]
        with self.transaction():
            self.db["metrics"].upsert_all(rows, pk=("run_id", "name"))

    def put_layers(self, run_id: int, layers: list[dict]) -> None:
        """Rows with at least name, role, params; idx is their position (model order)."""
        rows = []
        for idx, layer in enumerate(layers):
            row = {"run_id": run_id, "idx": idx}
            row.update(layer)
            rows.append(row)
        with self.transaction():
            self.db["layers"].upsert_all(rows, pk=("run_id", "idx"), alter=True)

    def add_artifact(self, run_id: int, kind: str, path: str | Path, size: int | None = None,
                     sha256: str | None = None) -> None:
        """Paths inside the runs folder are stored relative to it, so that a moved or copied
        runs folder still finds its files; others are stored as given. The file's size and
        sha256 are recorded (computed here unless given) for `engine verify`."""
        if sha256 is None and Path(path).is_file():
            size, sha256 = fingerprint(path)
        row = {"run_id": run_id, "kind": kind, "path": self.relative(path), "size": size, "sha256": sha256}
        with self.transaction():
            self.db["artifacts"].insert(row)

    def relative(self, path: str | Path) -> str:
        path = Path(path)
        if path.is_absolute():
            try:
                return path.resolve().relative_to(self.runs_dir).as_posix()
            except ValueError:
                return str(path)
        return path.as_posix()

    def resolve(self, stored: str) -> Path:
        """A stored artifact path as a usable one: relative paths are below the runs folder
        (rows written before paths were relative are absolute and stay as they are)."""
        path = Path(stored)
        return path if path.is_absolute() else self.runs_dir / path

    # ---------------------------------------------------------------- queries
    def metrics(self, run_id: int) -> dict[str, float]:
        return {
            r["name"]: r["value"] for r in self.db["metrics"].rows_where("run_id = ?", [run_id])
        }

    def layers(self, run_id: int) -> list[dict]:
        return list(self.db["layers"].rows_where("run_id = ?", [run_id], order_by="idx"))

    def artifacts(self, run_id: int) -> list[dict]:
        """The run's artifacts with `path` resolved (see `resolve`); `stored` is the row's text."""
        rows = list(self.db["artifacts"].rows_where("run_id = ?", [run_id], order_by="id"))
        return [{**row, "stored": row["path"], "path": str(self.resolve(row["path"]))} for row in rows]

    def last_event(self, run_id: int) -> dict | None:
        rows = list(
            self.db["events"].rows_where("run_id = ?", [run_id], order_by="id desc", limit=1)
        )
        return rows[0] if rows else None

    def results(self, experiment: str | None = None) -> list[dict]:
        """One row per run: the run's columns plus its metrics flattened in."""
        runs = self.runs(experiment=experiment)
        if not runs:
            return []
        by_id = {r["id"]: dict(r) for r in runs}
        marks = ",".join("?" * len(by_id))
        for row in self.db.query(
            f"select run_id, name, value from metrics where run_id in ({marks})", list(by_id)
        ):
            by_id[row["run_id"]][row["name"]] = row["value"]
        return list(by_id.values())
