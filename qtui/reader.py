"""Read-only queries on the engine's database (`runs_dir/qtui.db`).

qtui never writes from here: it opens SQLite read-only with the standard library (no
sqlite-utils, so no numpy at start-up) and turns rows into `qtui.model` records. Writes go
through the engine's `Store` in the launcher thread. Each thread opens its own `Reader`.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterable, Iterator

from qtui.model import Progress, RunRow

DB_NAME = "qtui.db"  # engine.store.DB_NAME; repeated to keep sqlite-utils out of start-up
KNOWN_SCHEMA = 2  # engine.store.SCHEMA_VERSION
RUN_COLUMNS = (  # in the order of RunRow's fields
    "id, coalesce(experiment, ''), coalesce(variant, ''), coalesce(status, 'queued'), created_at, "
    "started_at, finished_at, heartbeat_at, error, host, pid, folder, config_hash"
)
CHUNK = 500
ENGINE_TABLES = {"meta", "runs", "metrics", "layers", "artifacts", "events"}


class DatabaseMissing(Exception):
    """There is no database file yet (nothing has been run with this runs directory)."""


class DatabaseError(Exception):
    """The database cannot be read: locked, corrupt, or written by a newer engine."""


def chunks(ids: Iterable[int], size: int = CHUNK) -> Iterator[list[int]]:
    batch: list[int] = []
    for run_id in ids:
        batch.append(run_id)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def marks(n: int) -> str:
    return ",".join("?" * n)


class Reader:
    def __init__(self, runs_dir: str | Path, timeout: float = 2.0):
        self.path = Path(runs_dir) / DB_NAME
        if not self.path.is_file():
            raise DatabaseMissing(self.missing_message())
        try:
            self.conn = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro",
                uri=True,
                timeout=timeout,
                isolation_level=None,  # autocommit: never hold a read snapshot between polls
                check_same_thread=False,
            )
            self.conn.row_factory = sqlite3.Row
            self.check_schema()
        except sqlite3.Error as exc:
            raise DatabaseError(f"{self.path}: {exc}") from exc

    def missing_message(self) -> str:
        return f"no database at {self.path} yet; it appears with the first run"

    def close(self) -> None:
        self.conn.close()

    def query(self, sql: str, args: Iterable = (), plain: bool = False) -> list:
        """Rows as sqlite3.Row, or as plain tuples (faster for big results) when `plain`."""
        try:
            cursor = self.conn.cursor()
            if plain:
                cursor.row_factory = None
            return cursor.execute(sql, tuple(args)).fetchall()
        except sqlite3.Error as exc:
            raise DatabaseError(f"{self.path}: {exc}") from exc

    def check_schema(self) -> None:
        tables = {r[0] for r in self.conn.execute("select name from sqlite_master where type='table'")}
        if "runs" not in tables:
            self.conn.close()
            if tables <= ENGINE_TABLES:  # empty, or the engine is creating it right now
                raise DatabaseMissing(self.missing_message())
            raise DatabaseError(f"{self.path}: not a qtui database (no runs table)")
        if "meta" in tables:
            row = self.conn.execute("select value from meta where key='schema_version'").fetchone()
            if row is not None and int(row[0]) > KNOWN_SCHEMA:
                raise DatabaseError(
                    f"{self.path}: schema version {row[0]} is newer than this qtui knows "
                    f"({KNOWN_SCHEMA}); update qtui"
                )

    # ---------------------------------------------------------------- change detection
    def data_version(self) -> int:
        return self.query("pragma data_version")[0][0]

    def run_count(self) -> tuple[int, int]:
        count, max_id = self.query("select count(*), coalesce(max(id), 0) from runs")[0]
        return count, max_id

    def metrics_fingerprint(self) -> tuple:
        """Changes when metric rows are added, removed or rewritten with other values."""
        return tuple(self.query(
            "select count(*), coalesce(max(rowid), 0), total(value) from metrics", plain=True)[0])

    def metric_sums(self) -> dict[int, tuple[int, float]]:
        """Per run: the number of metrics and the total of their values."""
        rows = self.query("select run_id, count(*), total(value) from metrics group by run_id", plain=True)
        return {r[0]: (r[1], r[2]) for r in rows}

    # ---------------------------------------------------------------- runs
    def runs_after(self, max_id: int, metrics: bool = True) -> list[RunRow]:
        rows = self.query(f"select {RUN_COLUMNS} from runs where id > ? order by id", [max_id], plain=True)
        runs = [RunRow(*r) for r in rows]
        return self._with_metrics(runs, all_metrics=max_id == 0) if metrics else runs

    def all_metrics(self) -> dict[int, dict[str, float | None]]:
        out: dict[int, dict[str, float | None]] = {}
        for run_id, name, value in self.query("select run_id, name, value from metrics", plain=True):
            metrics = out.get(run_id)
            if metrics is None:
                metrics = out[run_id] = {}
            metrics[name] = value
        return out

    def runs_by_id(self, ids: Iterable[int]) -> list[RunRow]:
        out: list[RunRow] = []
        for batch in chunks(ids):
            sql = f"select {RUN_COLUMNS} from runs where id in ({marks(len(batch))})"
            out.extend(RunRow(*r) for r in self.query(sql, batch, plain=True))
        return self._with_metrics(out)

    def run_states(self, ids: Iterable[int]) -> dict[int, tuple]:
        """(status, finished_at, pid, error) of the given runs: what the UI shows of them.

        Heartbeats are left out: they change with every progress event and show nothing."""
        out = {}
        for batch in chunks(ids):
            sql = (
                "select id, status, finished_at, pid, error from runs "
                f"where id in ({marks(len(batch))})"
            )
            for r in self.query(sql, batch):
                out[r[0]] = tuple(r[1:])
        return out

    def heartbeats(self, ids: Iterable[int]) -> dict[int, float | None]:
        """Last heartbeat of the given runs (left out of run_states: it changes all the time)."""
        out = {}
        for batch in chunks(ids):
            sql = f"select id, heartbeat_at from runs where id in ({marks(len(batch))})"
            for r in self.query(sql, batch, plain=True):
                out[r[0]] = r[1]
        return out

    def _with_metrics(self, runs: list[RunRow], all_metrics: bool = False) -> list[RunRow]:
        by_id = {r.id: r for r in runs}
        if not by_id:
            return runs
        if all_metrics:
            rows: Iterable = self.query("select run_id, name, value from metrics", plain=True)
        else:
            rows = []
            for batch in chunks(by_id):
                rows += self.query(
                    f"select run_id, name, value from metrics where run_id in ({marks(len(batch))})",
                    batch, plain=True,
                )
        get = by_id.get
        for run_id, name, value in rows:
            run = get(run_id)
            if run is not None:
                run.metrics[name] = value
        return runs

    # ---------------------------------------------------------------- progress
    def last_events(self, ids: Iterable[int]) -> dict[int, Progress]:
        out: dict[int, Progress] = {}
        for batch in chunks(ids):
            sql = (
                "select e.run_id, e.stage, e.done, e.total, e.time, e.message from events e "
                "join (select run_id, max(id) as last from events "
                f"where run_id in ({marks(len(batch))}) group by run_id) m on e.id = m.last"
            )
            for r in self.query(sql, batch):
                out[r[0]] = Progress(
                    run_id=r[0], stage=r[1] or "", done=r[2] or 0, total=r[3] or 0,
                    time=r[4] or 0.0, message=r[5] or "",
                )
        return out

    def stage_start(self, run_id: int, stage: str) -> tuple[float, int] | None:
        rows = self.query(
            "select time, done from events where run_id = ? and stage = ? order by id limit 1",
            [run_id, stage],
        )
        return (rows[0][0], rows[0][1] or 0) if rows else None

    # ---------------------------------------------------------------- layers and artifacts
    def layer_runs(self, experiment: str) -> set[int]:
        """The runs of an experiment that have per-layer rows (one index lookup per run)."""
        rows = self.query(
            "select id from runs r where experiment = ? "
            "and exists (select 1 from layers l where l.run_id = r.id)",
            [experiment], plain=True,
        )
        return {r[0] for r in rows}

    def layers(self, run_id: int) -> list[dict]:
        return [dict(r) for r in self.query("select * from layers where run_id = ? order by idx", [run_id])]

    def artifacts(self, run_id: int) -> list[dict]:
        return [dict(r) for r in self.query("select * from artifacts where run_id = ? order by id", [run_id])]

    def comparison(self, experiment: str) -> dict | None:
        rows = self.query(
            "select a.* from artifacts a join runs r on r.id = a.run_id "
            "where r.experiment = ? and a.kind = 'comparison' order by a.id desc limit 1",
            [experiment],
        )
        return dict(rows[0]) if rows else None
