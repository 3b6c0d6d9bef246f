"""Polls the database for changed runs and posts snapshots to the UI.

`Poller.poll()` is synchronous and cheap when nothing changed: it asks SQLite for
`PRAGMA data_version` and only then looks at new run ids, the runs it last saw queued or
running, and the metrics table's fingerprint. A full reload happens at start and when runs
disappear; it comes in two snapshots, every run with its status first and their metrics
right after, so that ten thousand runs appear without waiting for their metric rows.
`PollerThread` calls it every half second and waits until the UI has applied a snapshot
before polling again, so snapshots never pile up however fast workers write.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from qtui.model import ACTIVE, Progress, RunRow
from qtui.reader import DatabaseError, DatabaseMissing, Reader

LostCheck = Callable[[dict], bool]


@dataclass
class Snapshot:
    runs: list[RunRow] = field(default_factory=list)  # new or changed runs (all when reset)
    removed: list[int] = field(default_factory=list)
    progress: dict[int, Progress] | None = None  # every running run's progress; None: unchanged
    reset: bool = False  # `runs` is the whole table
    error: str | None = None  # a database problem to show; "" once it is resolved
    prepared: Any = None  # whatever the thread's `prepare` computed from `runs` (cell texts)
    partial: bool = False  # runs shown before their metrics: another snapshot follows at once


class Poller:
    def __init__(self, runs_dir: str | Path, is_lost: LostCheck | None = None, timeout: float = 2.0):
        self.runs_dir = Path(runs_dir)
        self.timeout = timeout
        self.is_lost = is_lost  # engine.executor.is_lost once it is imported
        self.reader: Reader | None = None
        self.error: str | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        self.version: int | None = None
        self.ids: set[int] = set()
        self.max_id = 0
        self.states: dict[int, tuple] = {}  # stored state of runs last seen queued/running
        self.running: dict[int, RunRow] = {}  # runs stored as running (lost or not)
        self.lost: set[int] = set()
        self.metric_fp: tuple | None = None
        self.metric_sums: dict[int, tuple[int, float]] = {}  # per run: (count, total of values)
        self.progress: dict[int, Progress] = {}
        self.stage_starts: dict[tuple[int, str], tuple[float, int]] = {}
        self.unfilled: dict[int, RunRow] = {}  # runs of the first snapshot, still without metrics

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    # ---------------------------------------------------------------- polling
    def poll(self) -> Snapshot | None:
        """A snapshot of what changed since the last call, or None when nothing did."""
        try:
            full = self.reader is None
            if full:
                self.reader = Reader(self.runs_dir, timeout=self.timeout)
                self._reset_state()
            snapshot = self._poll(self.reader, full)
        except (DatabaseMissing, DatabaseError) as exc:
            self.close()
            message = str(exc)
            if message == self.error:
                return None
            self.error = message
            return Snapshot(error=message)
        if self.error:
            snapshot = snapshot or Snapshot()
            snapshot.error = ""
            self.error = None
        return snapshot

    def _poll(self, reader: Reader, full: bool) -> Snapshot | None:
        if self.unfilled and not full:
            return self._fill_metrics(reader)
        version = reader.data_version()
        snap = Snapshot(reset=full)
        changed: dict[int, RunRow] = {}
        db_changed = full or version != self.version
        if db_changed:
            self.version = version
            count, _ = reader.run_count()
            new = reader.runs_after(self.max_id, metrics=not full)
            if not full and count != len(self.ids) + len(new):
                self._reset_state()  # runs were deleted: start over
                return self._poll(reader, full=True)
            for run in new:
                changed[run.id] = run
            if full:  # show every run and its status first; their metrics come next poll
                self.unfilled = dict(changed)
                snap.partial = bool(changed)
            stale = [
                run_id
                for run_id, state in reader.run_states(self.states).items()
                if state != self.states[run_id]
            ]
            if not full:
                stale += self._metric_changes(reader)
            stale = [i for i in dict.fromkeys(stale) if i not in changed]
            for run in reader.runs_by_id(stale):
                changed[run.id] = run
            for run in changed.values():
                self._remember(run)
            if self.running:  # lost-run detection needs fresh heartbeats (any host)
                for run_id, beat in reader.heartbeats(list(self.running)).items():
                    if self.running[run_id].heartbeat_at != beat:
                        self.running[run_id] = replace(self.running[run_id], heartbeat_at=beat)
        lost_changed = self._check_lost(changed)
        snap.runs = list(changed.values())
        progress = self._progress(reader) if (db_changed or lost_changed) else self.progress
        if progress != self.progress or full:
            self.progress = progress
            snap.progress = progress
        if full or snap.runs or snap.progress is not None:
            return snap
        return None

    def _remember(self, run: RunRow) -> None:
        self.ids.add(run.id)
        self.max_id = max(self.max_id, run.id)
        if run.status in ACTIVE:
            self.states[run.id] = (run.status, run.finished_at, run.pid, run.error)
        else:
            self.states.pop(run.id, None)
        if run.status == "running":
            self.running[run.id] = run
        else:
            self.running.pop(run.id, None)
            self.lost.discard(run.id)
            for key in [k for k in self.stage_starts if k[0] == run.id]:
                del self.stage_starts[key]

    def _fill_metrics(self, reader: Reader) -> Snapshot:
        """The second half of a full load: the metrics of every run of the first snapshot."""
        fingerprint = reader.metrics_fingerprint()  # before reading: later writes show up next
        metrics = reader.all_metrics()
        self.metric_fp = fingerprint
        self.metric_sums = {
            run_id: (len(m), sum(v for v in m.values() if v is not None)) for run_id, m in metrics.items()
        }
        changed = {
            run_id: run.with_metrics(metrics[run_id])
            for run_id, run in self.unfilled.items()
            if run_id in metrics
        }
        self.unfilled = {}
        for run in changed.values():
            if run.id in self.running:
                self.running[run.id] = run
        self._check_lost(changed)
        return Snapshot(runs=list(changed.values()))

    def _metric_changes(self, reader: Reader) -> list[int]:
        """Runs whose metrics changed: added, or rewritten with other values (a finished run
        can gain metrics later, such as the experiment's FID floor)."""
        fingerprint = reader.metrics_fingerprint()
        if fingerprint == self.metric_fp:
            return []
        self.metric_fp = fingerprint
        sums = reader.metric_sums()
        previous, self.metric_sums = self.metric_sums, sums
        return [
            i for i, (n, total) in sums.items()
            if i in self.ids and (i not in previous or previous[i][0] != n
                                  or abs(previous[i][1] - total) > 1e-9 * max(1.0, abs(total)))
        ]

    def _check_lost(self, changed: dict[int, RunRow]) -> bool:
        """Show a running run whose worker process is gone (on this host) as lost.

        Returns whether any run became lost (or came back)."""
        flipped = False
        if self.is_lost is not None:
            for run_id, run in self.running.items():
                lost = self.is_lost({"status": "running", "host": run.host, "pid": run.pid,
                                     "heartbeat_at": run.heartbeat_at})
                if lost != (run_id in self.lost):
                    (self.lost.add if lost else self.lost.discard)(run_id)
                    changed.setdefault(run_id, run)
                    flipped = True
        for run_id, run in changed.items():
            if run.status in ("running", "lost"):
                status = "lost" if run_id in self.lost else "running"
                if status != run.status:
                    changed[run_id] = replace(run, status=status)
        return flipped

    def _progress(self, reader: Reader) -> dict[int, Progress]:
        ids = [i for i in self.running if i not in self.lost]
        if not ids:
            return {}
        progress = reader.last_events(ids)
        for run_id, p in progress.items():
            key = (run_id, p.stage)
            if key not in self.stage_starts:
                start = reader.stage_start(run_id, p.stage)
                if start is None:
                    continue
                self.stage_starts[key] = start
            p.stage_start_time, p.stage_start_done = self.stage_starts[key]
        return progress


def load_lost_check() -> LostCheck | None:
    """The engine's `is_lost`, imported lazily (it pulls in sqlite-utils and numpy)."""
    try:
        from engine.executor import is_lost
    except Exception:  # the engine is broken or absent: never show runs as lost
        return None
    return is_lost


class PollerThread(threading.Thread):
    """Polls every `interval` seconds and hands snapshots to `post` (thread-safe).

    The thread may start before the UI is up: it reads the first snapshot at once but posts
    it only after `attach(post)`. `prepare(runs)`, if given, runs here too (formatting cells
    off the UI thread) and its result travels in `Snapshot.prepared`.
    """

    def __init__(self, runs_dir: str | Path, interval: float = 0.5,
                 prepare: Callable[[list[RunRow]], Any] | None = None):
        super().__init__(name="qtui-poller", daemon=True)
        self.runs_dir, self.interval, self.prepare = Path(runs_dir), interval, prepare
        self.post: Callable[[Snapshot], None] | None = None
        self.applied = threading.Event()  # set by the UI when it has applied a snapshot
        self._attached = threading.Event()
        self._wake = threading.Event()
        self._stopping = threading.Event()

    def attach(self, post: Callable[[Snapshot], None]) -> None:
        self.post = post
        self._attached.set()

    def poke(self) -> None:
        """Poll now instead of at the next tick (after a launch or a cancel)."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self.applied.set()
        self._attached.set()

    def run(self) -> None:
        poller = Poller(self.runs_dir)
        lost_check_loaded = False
        try:
            while not self._stopping.is_set():
                try:
                    snapshot = poller.poll()
                    if snapshot is not None and snapshot.runs and self.prepare is not None:
                        snapshot.prepared = self.prepare(snapshot.runs)
                except Exception as exc:  # never let the poller die: report and go on
                    snapshot = Snapshot(error=f"reading the database failed: {exc!r}")
                self._attached.wait()
                if snapshot is not None and not self._stopping.is_set():
                    self.applied.clear()
                    self.post(snapshot)
                    self.applied.wait(10)
                if poller.unfilled:
                    continue  # the metrics of the runs just shown, at once
                if not lost_check_loaded and poller.reader is not None:
                    lost_check_loaded = True
                    poller.is_lost = load_lost_check()
                    continue  # check for lost runs straight after the first paint
                self._wake.wait(self.interval)
                self._wake.clear()
        finally:
            poller.close()
