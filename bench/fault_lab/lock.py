"""A write lock held by another process: `BEGIN IMMEDIATE` in sqlite3 for `hold` seconds, from a
random moment of a run (or from before `engine run` starts, so that queueing itself waits).

Workers, the scheduler and `engine run` wait for the lock (the store's busy timeout is minutes)
and go on; qtui only reads, which WAL allows under a writer's lock. The trial checks the runs
finish with the undisturbed numbers, that no "database is locked" and no traceback reaches
the user (the output of `engine run`, the workers' logs, the scheduler's log, qtui's screen),
that qtui's poller reported no database error, and the usual invariants.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.fault_lab.invariants import Verdict, check_database, numbers_problems
from bench.fault_lab.lab import Lab, environment
from bench.fault_lab.signals import Outcome, new_run_ids

HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
print("released", flush=True)
"""

COMPLAINTS = ("database is locked", "Traceback", "OperationalError")


def hold_lock(runs: Path, seconds: float) -> subprocess.Popen:
    """Start a process that holds the write lock for `seconds`; returns once it holds it."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(runs / "qtui.db"), str(seconds)],
                              stdout=subprocess.PIPE, text=True, env=environment())
    line = holder.stdout.readline()
    if line.strip() != "locked":
        raise RuntimeError(f"the lock holder did not get the lock: {line!r}")
    return holder


class PollWatcher(threading.Thread):
    """qtui's poller, polling as the app does, counting the database errors it reports."""

    def __init__(self, runs: Path, every: float = 0.1):
        super().__init__(daemon=True)
        from qtui.poller import Poller, load_lost_check

        self.poller = Poller(runs, load_lost_check())
        self.every, self.errors, self.polls = every, [], 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            try:
                snapshot = self.poller.poll()
                self.polls += 1
                if snapshot is not None and snapshot.error:
                    self.errors.append(snapshot.error)
            except Exception as exc:  # the app would crash: count it
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def stop(self) -> list[str]:
        self.stopped.set()
        self.join(10)
        self.poller.close()
        return self.errors


def complaints(text: str) -> list[str]:
    return [line.strip()[:160] for line in text.splitlines() if any(c in line for c in COMPLAINTS)]


def lock_trial(lab: Lab, runs: Path, rng: random.Random, hold: float, before_start: bool) -> Outcome:
    detail = f"BEGIN IMMEDIATE held {hold:.0f} s " + ("from before engine run" if before_start else "mid-run")
    verdict = Verdict()
    ids_before = {r["id"] for r in lab.runs(runs)}
    sched_log = runs / "scheduler.log"
    sched_offset = sched_log.stat().st_size if sched_log.exists() else 0
    watcher = PollWatcher(runs)
    watcher.start()
    qtui = lab.start_qtui(runs, runs.parent / f"qtui-lock-{time.time_ns()}.out")
    holder = None
    try:
        snapshot = lab.metrics(runs)
        if before_start:
            holder = hold_lock(runs, hold)
        engine_run = lab.engine_run(runs, ["rtn", "fp"])
        if not before_start:
            span = sum(lab.baselines["rtn"]["stages"].values())
            time.sleep(rng.uniform(1.0, 1.0 + span))
            holder = hold_lock(runs, hold)
        export = lab.engine(runs, "export", "--format", "json", "--out", str(runs.parent / "lock-export.json"))
        if export.wait(hold + 120) != 0:
            verdict.problems.append(f"engine export under the lock: exit {export.popen.returncode}: {export.text()[-200:]!r}")
        holder.wait(hold + 30)
        code = engine_run.wait(hold + 300)
        if code != 0:
            verdict.problems.append(f"engine run exit {code}: {engine_run.text()[-300:]!r}")
        lab.settle(runs, 120)
        verdict.add(check_database(lab, runs, snapshot))
        for run_id in new_run_ids(lab, runs, ids_before):
            verdict.problems += numbers_problems(lab, runs, run_id)
            log = runs / f"run-{run_id:05d}" / "worker.log"
            verdict.problems += [f"run {run_id} worker.log: {c}" for c in complaints(log.read_text(errors="replace"))]
        verdict.problems += [f"engine run: {c}" for c in complaints(engine_run.text())]
        if sched_log.exists():
            with open(sched_log, errors="replace") as f:
                f.seek(sched_offset)
                verdict.problems += [f"scheduler.log: {c}" for c in complaints(f.read())]
        if qtui.popen.poll() is not None:
            verdict.problems.append(f"qtui exited ({qtui.popen.returncode}) during the lock")
        verdict.problems += [f"qtui screen: {c}" for c in complaints(qtui.text())]
        verdict.problems += [f"qtui poller: {e}" for e in watcher.stop()]
        return Outcome("lock", detail, verdict)
    finally:
        watcher.stopped.set()
        if holder is not None and holder.poll() is None:
            holder.kill()
        lab.cleanup()


def lock_trials(lab: Lab, runs: Path, rng: random.Random, rounds: int, hold: float):
    for _ in range(rounds):
        yield lock_trial(lab, runs, rng, hold, before_start=False)
        yield lock_trial(lab, runs, rng, hold, before_start=True)
