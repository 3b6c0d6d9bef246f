"""One run in its own process: `python -u -m engine.worker --runs-dir D --run-id N [--remote]`.

Reads the run's resolved config from the store, executes it (`engine.pipeline.execute`), and
records the outcome itself: status, progress events, metrics, layers and artifacts. Progress
also goes to stdout as JSON lines (one object per line) for whoever watches the log. A
heartbeat thread beats every few seconds, so a run whose worker vanished is seen as lost on
any host. SIGTERM cancels: the run is recorded as cancelled. SIGHUP is ignored.

With `--remote` (a Slurm job on another node) the worker never opens the database: the same
records go to files in its run folder, which the head-side scheduler ingests
(`engine.run_files`, where the reason is explained). A signal there is only reported: the
head decides between cancelled (the user asked) and failed (Slurm's time limit, ...).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sqlite3
import sys
import threading
import time
import traceback

from engine.atomic_files import REASONS, DiskFull, disk_full_errno, past_file_size_limit
from engine.executor import HEARTBEAT_EVERY
from engine.exit_reason import EXIT_NO_SPACE
from engine.store import Store, db_path

# How long progress events may fail to be recorded (database locked past its busy timeout, or
# momentarily full) before the run gives up: progress is a sample, the results are not.
EVENT_GRACE = 120.0


def momentary(exc: BaseException) -> bool:
    """A write that may succeed if tried again later: the database is busy, or the disk full."""
    text = str(exc)
    return disk_full_errno(exc) is not None or (
        isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text))


def full_errno(exc: BaseException, database=None) -> int | None:
    """`disk_full_errno`, and SQLite's "disk I/O error" of a database at the file size limit."""
    code = disk_full_errno(exc)
    if code is None and database is not None and isinstance(exc, sqlite3.OperationalError) \
            and "disk I/O error" in str(exc) and past_file_size_limit([database, f"{database}-wal"]):
        code = errno.EFBIG
    return code


def failure_text(exc: BaseException, database=None) -> str:
    """The run's error: a full disk as "no space left ... writing PATH" (the database's path
    for SQLite's "database or disk is full"), else type: message."""
    code = full_errno(exc, database)
    if isinstance(exc, DiskFull):
        return str(exc)
    if code is not None and isinstance(exc, sqlite3.Error) and database is not None:
        return str(DiskFull(database, code))
    if code is not None:
        return f"{REASONS[code]}: {type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc}"


class Cancelled(BaseException):
    """Raised by the SIGTERM handler. A BaseException, as KeyboardInterrupt is: libraries wrap
    any Exception raised while they import (diffusers' lazy modules turn it into "RuntimeError:
    Failed to import ..."), which would record a cancelled run as failed."""


class Reporter:
    """Prints every progress update as a JSON line; writes events to SQLite at most every
    `db_interval` seconds (and always on a stage change), so a fast loop cannot flood it."""

    def __init__(self, store: Store, run_id: int, db_interval: float = 0.5, grace: float = EVENT_GRACE):
        self.store, self.run_id, self.db_interval, self.grace = store, run_id, db_interval, grace
        self.stage, self.last_write, self.last_print = None, 0.0, 0.0
        self.failing_since: float | None = None  # when progress writes began to fail

    def emit(self, **obj) -> None:
        say(**obj)

    def progress(self, stage: str, done: int = 0, total: int = 0, message: str = "") -> None:
        now = time.time()
        changed = stage != self.stage
        final = total and done >= total
        if changed or final or now - self.last_print >= 0.1:
            self.emit(event="progress", stage=stage, done=done, total=total, message=message)
            self.last_print = now
        if changed or final or now - self.last_write >= self.db_interval:
            self.write_event(now, stage, done, total, message)
        self.stage = stage

    def write_event(self, now: float, stage: str, done: int, total: int, message: str) -> None:
        """Record a progress event; a momentary failure is retried with the next one, for up to
        `grace` seconds, then raised (a database that stays unwritable fails the run)."""
        try:
            self.store.add_event(self.run_id, stage, done, total, message)
        except Exception as exc:
            if not momentary(exc) or (self.failing_since is not None and now - self.failing_since > self.grace):
                raise
            if self.failing_since is None:
                self.failing_since = now
                self.log(f"progress not recorded ({exc}); retrying")
            self.last_write = now
            return
        if self.failing_since is not None:
            self.log(f"progress recorded again after {now - self.failing_since:.0f} s")
        self.failing_since = None
        self.last_write = now

    def log(self, message: str) -> None:
        self.emit(event="log", message=message)


def _cancel(signum, frame):
    raise Cancelled(f"stopped by signal {signum}")


class Heartbeat(threading.Thread):
    """Beats every `every` seconds through its own store handle (SQLite connections stay in
    their thread; a remote worker's FileStore is just an append)."""

    def __init__(self, open_store, run_id: int, every: float = HEARTBEAT_EVERY):
        super().__init__(name="heartbeat", daemon=True)
        self.open_store, self.run_id, self.every = open_store, run_id, every
        self.stopped = threading.Event()

    def run(self) -> None:
        store = self.open_store()
        failing = False
        try:
            while not self.stopped.wait(self.every):
                try:
                    store.heartbeat(self.run_id)
                    failing = False
                except Exception as exc:  # a busy or full database: the next beat will do
                    if not failing:
                        say(event="log", message=f"heartbeat not recorded ({exc}); retrying")
                    failing = True
        finally:
            store.close()


def say(**obj) -> None:
    """One JSON line on stdout (the run's log); a full disk under the log is not the run's end."""
    try:
        print(json.dumps(obj), flush=True)
    except OSError:
        pass


def run_worker(store: Store, run_id: int, open_store=None) -> int:
    run = store.get_run(run_id)
    if run["status"] != "queued":
        print(json.dumps({"event": "skipped", "status": run["status"]}), flush=True)
        return 0
    signal.signal(signal.SIGTERM, _cancel)
    signal.signal(signal.SIGINT, _cancel)
    # Workers run in their own session; a SIGHUP (a closed terminal, an SSH drop passed on by
    # a wrapper) is no reason to lose hours of work: the run goes on.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if not store.mark_running(run_id):  # cancelled meanwhile, or another worker has it
        print(json.dumps({"event": "skipped", "status": store.get_run(run_id)["status"]}), flush=True)
        return 0
    remote = hasattr(store, "signalled")
    reporter = Reporter(store, run_id)
    reporter.log(f"worker pid {os.getpid()}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}"
                 + (" (remote: no database)" if remote else ""))
    heartbeat = None
    if open_store is not None:
        heartbeat = Heartbeat(open_store, run_id)
        heartbeat.start()
    try:
        from engine.pipeline import execute

        execute(store, run_id, json.loads(run["config"]), reporter)
        store.finish(run_id, "done")
    except Cancelled as exc:
        if remote:
            store.signalled(str(exc))
        else:
            store.finish_if_unfinished(run_id, "cancelled", str(exc))
        reporter.emit(event="cancelled")
        return 0
    except Exception as exc:  # a crashing run is recorded as failed; the others go on
        try:
            traceback.print_exc(file=sys.stdout)
        except OSError:
            pass
        error = failure_text(exc, database_of(store))
        recorded = record_failure(store, run_id, error, reporter)
        reporter.emit(event="failed", error=error)  # the last word of the log: the scheduler reads it
        if not recorded and full_errno(exc, database_of(store)) is not None:
            return EXIT_NO_SPACE
        return 1
    finally:
        if heartbeat is not None:
            heartbeat.stopped.set()
    reporter.emit(event="done")
    return 0


def database_of(store):
    """The database file a store writes (None for a remote worker's FileStore)."""
    return db_path(store.runs_dir) if isinstance(store, Store) else None


def record_failure(store, run_id: int, error: str, reporter) -> bool:
    """Record the run as failed; False when the database cannot be written either (a full
    disk): the worker then exits non-zero with the error as its log's last line, and the
    scheduler records it when it can."""
    try:
        store.finish_if_unfinished(run_id, "failed", error)
        return True
    except Exception as exc:
        reporter.log(f"could not record the failure in the database: {failure_text(exc, database_of(store))}")
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="engine.worker")
    parser.add_argument("--runs-dir", required=True)
    parser.add_argument("--run-id", type=int, required=True)
    parser.add_argument("--remote", action="store_true",
                        help="write results to files in the run folder, never to the database")
    args = parser.parse_args(argv)
    if args.remote:
        from engine.run_files import FileStore
        from engine.store import forbid_database

        forbid_database("a remote worker writes its run folder; the scheduler ingests it")
        open_store = lambda: FileStore(args.runs_dir, args.run_id)
    else:
        open_store = lambda: Store.open(args.runs_dir, create=False)
    store = None
    try:
        store = open_store()
        return run_worker(store, args.run_id, open_store)
    except Exception as exc:  # before the run started, or while recording a cancel
        database = None if args.remote else db_path(args.runs_dir)
        if full_errno(exc, database) is None:
            raise
        say(event="failed", error=failure_text(exc, database))
        return EXIT_NO_SPACE
    finally:
        if store is not None:
            store.close()


if __name__ == "__main__":
    sys.exit(main())
