"""One run in its own process: `python -u -m engine.worker --runs-dir D --run-id N`.

Reads the run's resolved config from the store, executes it (`engine.pipeline.execute`), and
records the outcome itself: status, progress events, metrics, layers and artifacts. Progress
also goes to stdout as JSON lines (one object per line) for whoever watches the log.
SIGTERM cancels: the run is recorded as cancelled.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import traceback

from engine.store import Store


class Cancelled(Exception):
    pass


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


def run_worker(store: Store, run_id: int) -> int:
    run = store.get_run(run_id)
    if run["status"] != "queued":
        print(json.dumps({"event": "skipped", "status": run["status"]}), flush=True)
        return 0
    signal.signal(signal.SIGTERM, _cancel)
    signal.signal(signal.SIGINT, _cancel)
    store.mark_running(run_id)
    reporter = Reporter(store, run_id)
    try:
        from engine.pipeline import execute

        execute(store, run_id, json.loads(run["config"]), reporter)
    except Cancelled as exc:
        store.finish_if_unfinished(run_id, "cancelled", str(exc))
        reporter.emit(event="cancelled")
        return 0
    except Exception as exc:  # a crashing run is recorded as failed; the others go on
        traceback.print_exc(file=sys.stdout)
        store.finish_if_unfinished(run_id, "failed", f"{type(exc).__name__}: {exc}")
        reporter.emit(event="failed", error=f"{type(exc).__name__}: {exc}")
        return 1
    store.finish(run_id, "done")
    reporter.emit(event="done")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="engine.worker")
    parser.add_argument("--runs-dir", required=True)
    parser.add_argument("--run-id", type=int, required=True)
    args = parser.parse_args(argv)
    store = Store.open(args.runs_dir, create=False)
    try:
        return run_worker(store, args.run_id)
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
