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
import json
import os
import signal
import sys
import threading
import time
import traceback

from engine.executor import HEARTBEAT_EVERY
from engine.store import Store


class Cancelled(BaseException):
    """Raised by the SIGTERM handler. A BaseException, as KeyboardInterrupt is: libraries wrap
    any Exception raised while they import (diffusers' lazy modules turn it into "RuntimeError:
    Failed to import ..."), which would record a cancelled run as failed."""


class Reporter:
    """Prints every progress update as a JSON line; writes events to SQLite at most every
    `db_interval` seconds (and always on a stage change), so a fast loop cannot flood it."""

    def __init__(self, store: Store, run_id: int, db_interval: float = 0.5):
        self.store, self.run_id, self.db_interval = store, run_id, db_interval
        self.stage, self.last_write, self.last_print = None, 0.0, 0.0

    def emit(self, **obj) -> None:
        print(json.dumps(obj), flush=True)

    def progress(self, stage: str, done: int = 0, total: int = 0, message: str = "") -> None:
        now = time.time()
        changed = stage != self.stage
        final = total and done >= total
        if changed or final or now - self.last_print >= 0.1:
            self.emit(event="progress", stage=stage, done=done, total=total, message=message)
            self.last_print = now
        if changed or final or now - self.last_write >= self.db_interval:
            self.store.add_event(self.run_id, stage, done, total, message)
            self.last_write = now
        self.stage = stage

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
        try:
            while not self.stopped.wait(self.every):
                try:
                    store.heartbeat(self.run_id)
                except Exception:  # a busy database: the next beat will do
                    pass
        finally:
            store.close()


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
    except Cancelled as exc:
        if remote:
            store.signalled(str(exc))
        else:
            store.finish_if_unfinished(run_id, "cancelled", str(exc))
        reporter.emit(event="cancelled")
        return 0
    except Exception as exc:  # a crashing run is recorded as failed; the others go on
        traceback.print_exc(file=sys.stdout)
        store.finish_if_unfinished(run_id, "failed", f"{type(exc).__name__}: {exc}")
        reporter.emit(event="failed", error=f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        if heartbeat is not None:
            heartbeat.stopped.set()
    store.finish(run_id, "done")
    reporter.emit(event="done")
    return 0


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
    store = open_store()
    try:
        return run_worker(store, args.run_id, open_store)
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
