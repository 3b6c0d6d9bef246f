"""The scheduler: a process that drains the queue of runs in the database, then exits.

`python -m engine.scheduler --runs-dir D [--jobs N] [--gpus 0,1,3]`, started on demand by
`engine run`, `engine queue add` and qtui (`ensure_scheduler`) in its own session, so neither a
closed terminal (SIGHUP) nor quitting qtui stops it; its output goes to `D/scheduler.log`.

Each step it claims queued runs atomically (`engine.queue_store`) and starts them: local runs
as worker processes up to `--jobs` at once on this host, or one per GPU of `--gpus` with
`CUDA_VISIBLE_DEVICES` set (recorded on the run as `gpu`); Slurm runs of one batch as one job
array (`engine.slurm`). It reaps its local workers (one that exits without recording an outcome
is failed with the tail of its log), ingests the files of its Slurm runs, follows Slurm's state
of each (shown as `slurm_state`, with Slurm's reason), and ends a run whose job ended without
its worker's word as failed with Slurm's state and reason (time limit, out of memory, node
failure), or cancelled if the user asked. It exits when nothing is queued and nothing it
started is still going; several schedulers may run at once without ever starting a run twice.
Torch-free.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from engine.executor import LocalExecutor, RunHandle, pid_alive
from engine.exit_reason import describe_exit, read_tail
from engine.queue_store import (adopt_slurm_runs, beat, claim_local, claim_slurm_batch, fail_vanished_runs,
                                finish_and_release, live_schedulers, new_token, record_submission,
                                register_scheduler, release_dead_claims, retire_if_idle, rows, set_fields,
                                unregister)
from engine.worker import momentary
from engine.store import Store

LOG_NAME = "scheduler.log"
FINISH_GRACE = 5.0  # seconds a finished Slurm job may take to show its worker's last lines


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def say(message: str) -> None:
    try:
        print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)
    except OSError:  # its log's disk is full: the scheduler goes on without it
        pass


def database_trouble(exc: BaseException) -> bool:
    """A database write that failed for now (locked, busy, full disk, I/O): retried on a later
    step. Anything else (a missing table, a bug) is raised."""
    return momentary(exc) or (isinstance(exc, sqlite3.OperationalError) and "disk I/O error" in str(exc))


class Scheduler:
    def __init__(self, store: Store, jobs: int = 1, gpus: list[str] | None = None, interval: float = 0.5,
                 slurm_poll: float = 2.0):
        self.store, self.jobs, self.gpus, self.interval = store, jobs, gpus, interval
        self.slurm_poll = slurm_poll
        self.token = new_token()
        self.executor = LocalExecutor()
        self.children: dict[int, RunHandle] = {}
        self.slurm_ended: dict[int, float] = {}  # run id -> when Slurm first said it ended
        self.last_beat = self.last_slurm = self.last_release = 0.0
        self.stopping = False
        self.trouble: str | None = None  # the last failing database write, and when it was said
        self.trouble_said = 0.0

    # ---------------------------------------------------------------- the loop
    def run(self) -> int:
        register_scheduler(self.store, self.token, self.jobs, self.gpus)
        say(f"scheduler {self.token} on {self.store.runs_dir}: jobs {self.jobs}, gpus {self.gpus or '-'}")
        try:
            while not self.stopping:
                if not (self.store.runs_dir / "qtui.db").exists():
                    say("the database is gone: exiting")
                    return 0
                try:
                    self.step()
                    busy = bool(self.children) or self.watching_orphans()
                    idle = not self.slurm_runs() and retire_if_idle(self.store, self.token, busy=busy)
                except Exception as exc:
                    if not database_trouble(exc):
                        raise
                    self.troubled(exc)
                    idle = False
                if idle:
                    say("queue empty: exiting")
                    return 0
                time.sleep(self.interval)
        finally:
            try:
                unregister(self.store, self.token)
            except Exception as exc:  # its row goes stale: others see it as dead
                if not database_trouble(exc):
                    raise
        return 0

    def watching_orphans(self) -> bool:
        """Local runs of this host running with no live scheduler (theirs was killed): stay until
        they end, or until `fail_vanished_runs` finds their worker gone."""
        running = rows(self.store.db.conn, "select id, claimed_by from runs where status = 'running' and "
                                           "host = ? and coalesce(executor, 'local') = 'local'", [socket.gethostname()])
        orphans = [r for r in running if r["id"] not in self.children]
        if not orphans:
            return False
        watched = {r["token"] for r in live_schedulers(self.store)}
        return any(r["claimed_by"] not in watched for r in orphans)

    def troubled(self, exc: BaseException) -> None:
        """Say a failing database write once a minute (not every step)."""
        text = f"database write failed ({exc}); retrying on the next steps"
        if text != self.trouble or time.time() - self.trouble_said > 60:
            say(text)
            self.trouble_said = time.time()
        self.trouble = text

    def step(self) -> None:
        now = time.time()
        if now - self.last_beat > 5:
            beat(self.store, self.token)
            self.last_beat = now
        if now - self.last_release > 10:
            for run_id in release_dead_claims(self.store):
                say(f"run {run_id}: its scheduler is gone; claim released")
            for run_id in adopt_slurm_runs(self.store, self.token):
                say(f"run {run_id}: Slurm run adopted")
            for run_id in fail_vanished_runs(self.store, set(self.children)):
                say(f"run {run_id}: its worker vanished while no scheduler watched it: "
                    f"{self.store.get_run(run_id)['status']}")
            self.last_release = now
        self.reap()
        self.start_local()
        self.submit_slurm()
        self.watch_slurm()

    # ---------------------------------------------------------------- local workers
    def reap(self) -> None:
        for run_id, handle in list(self.children.items()):
            code = handle.poll()
            if code is None:
                continue
            status = "failed"
            run = self.store.get_run(run_id)
            holder = run.get("pid")
            if run["status"] == "running" and holder and holder != handle.process.pid and pid_alive(holder):
                # this worker found the run taken (a second launch after a claim was released)
                # and left it alone; the run belongs to the live worker that holds it
                del self.children[run_id]
                say(f"run {run_id}: worker {handle.process.pid} exited ({code}); the run is held by pid {holder}")
                continue
            if run.get("cancel_requested"):
                # stopped by a cancel whose caller has not recorded it yet (SIGKILL included:
                # a worker inside a long operation is killed after the cancel's grace)
                status, error = "cancelled", "cancelled by the user"
                if code == -signal.SIGKILL:
                    error += " (its worker ignored SIGTERM and was killed)"
            elif code != 0:
                error = describe_exit(code, read_tail(handle.log_path))
            else:
                error = "worker exited without recording a result"
            try:
                changed = self.store.finish_if_unfinished(run_id, status, error)
            except Exception as exc:  # kept: recorded on a later step, once the database takes it
                if not database_trouble(exc):
                    raise
                self.troubled(exc)
                continue
            del self.children[run_id]
            if changed:
                say(f"run {run_id}: {error}")
            else:
                say(f"run {run_id}: worker exited ({code})")

    def start_local(self) -> None:
        while True:
            claimed = claim_local(self.store, self.token, self.jobs, self.gpus)
            if claimed is None:
                return
            run_id, gpu = claimed
            try:
                self.children[run_id] = self.executor.launch(self.store, run_id, gpu=gpu)
            except Exception as exc:  # cannot start a process: this run fails, the others go on
                self.store.finish_if_unfinished(run_id, "failed", f"could not start its worker: {exc}")
                continue
            say(f"run {run_id}: started worker pid {self.children[run_id].process.pid}"
                + (f" on GPU {gpu}" if gpu is not None else ""))

    # ---------------------------------------------------------------- Slurm
    def slurm_runs(self) -> list[dict]:
        """The Slurm runs this scheduler watches: unfinished ones, and finished ones whose job
        Slurm still shows as active (so that the run records Slurm's final state)."""
        from engine.slurm import ACTIVE_STATES

        marks = ",".join("?" * len(ACTIVE_STATES))
        return rows(self.store.db.conn, "select * from runs where executor = 'slurm' and claimed_by = ? and "
                                        f"(status in ('queued', 'running') or slurm_state in ({marks}))",
                    [self.token, *sorted(ACTIVE_STATES)])

    def submit_slurm(self) -> None:
        batch = claim_slurm_batch(self.store, self.token)
        if not batch:
            return
        from engine import slurm
        from engine.run_files import write_job_file

        launch = json.loads(batch[0].get("launch") or "{}")
        settings = launch.get("slurm", {})
        try:
            reason = slurm.slurm_available()
            if reason:
                raise RuntimeError(reason)
            for run in batch:
                write_job_file(self.store, run["id"])
            job_ids = slurm.submit_array(self.store.runs_dir, batch, settings, batch[0].get("batch") or str(batch[0]["id"]))
        except Exception as exc:
            for run in batch:
                self.store.finish_if_unfinished(run["id"], "failed", f"Slurm submission failed: {exc}")
            say(f"runs {[r['id'] for r in batch]}: Slurm submission failed: {exc}")
            return
        for _, job_id in record_submission(self.store, batch, job_ids):
            slurm.scancel(job_id)  # cancelled while it was being submitted
        say(f"runs {[r['id'] for r in batch]}: submitted as Slurm jobs {', '.join(job_ids)}")

    def watch_slurm(self) -> None:
        from engine import slurm
        from engine.run_files import ingest

        runs = self.slurm_runs()
        if not runs:
            return
        for run in runs:
            for line in ingest(self.store, run["id"]):
                if line.get("op") == "finish" and line.get("status") == "done":
                    self.comparison(run["id"])
        now = time.time()
        if now - self.last_slurm < self.slurm_poll:
            return
        self.last_slurm = now
        runs = [r for r in self.slurm_runs() if r.get("job_id")]
        states = slurm.job_states([r["job_id"] for r in runs])
        for run in runs:
            state = states.get(run["job_id"])
            expected = f"qtui-{run.get('batch') or run['id']}"
            if state is not None and state.name and state.name != expected:
                state = None  # the id now belongs to another job: ours is gone
            if state is not None:
                fields = {"slurm_state": state.state, "slurm_reason": state.reason}
                if state.node and state.node not in ("(null)", "None"):
                    fields["node"] = state.node
                if any(run.get(k) != v for k, v in fields.items()):
                    set_fields(self.store, run["id"], **fields)
            if state is not None and state.active:
                continue
            first = self.slurm_ended.setdefault(run["id"], now)
            if now - first < FINISH_GRACE:
                continue  # let the worker's last lines arrive
            self.slurm_ended.pop(run["id"], None)
            self.end_slurm_run(run, state)

    def end_slurm_run(self, run: dict, state) -> None:
        from engine import slurm
        from engine.run_files import ingest

        ingest(self.store, run["id"])
        current = self.store.get_run(run["id"])
        if current["status"] not in ("queued", "running"):
            set_fields(self.store, run["id"], claimed_by=None)
            return
        described = slurm.describe(state) if state is not None else "vanished from Slurm"
        if current.get("cancel_requested"):
            status, error = "cancelled", f"cancelled by the user (Slurm job {run['job_id']}: {described})"
        else:
            tail = log_tail(self.store.runs_dir / run["folder"] / "worker.log", 3)
            if state is not None and state.state == "COMPLETED":
                status, error = "failed", f"Slurm job {run['job_id']} COMPLETED without a result from the worker: {tail}"
            else:
                status, error = "failed", f"Slurm job {run['job_id']} ended {described}" + (f": {tail}" if tail else "")
        finish_and_release(self.store, run["id"], status, error)
        say(f"run {run['id']}: {status}: {error}")

    def comparison(self, run_id: int) -> None:
        """A remote run could not see the others' samples: rebuild the comparison grid here."""
        try:
            from engine.pipeline import update_comparison

            run = self.store.get_run(run_id)
            update_comparison(self.store, run["experiment"], run_id)
        except Exception as exc:  # a missing grid must not stop the scheduler
            say(f"run {run_id}: comparison grid not rebuilt: {exc}")

    def stop(self, *_):
        self.stopping = True


# ---------------------------------------------------------------- starting one
def ensure_scheduler(runs_dir: str | Path, jobs: int = 1, gpus: list[str] | None = None,
                     store: Store | None = None) -> int | None:
    """Start a scheduler for this runs folder unless one with the same limits is alive on this
    host. Returns the pid of the one started (None if one was there already)."""
    runs_dir = Path(runs_dir).resolve()
    own = store is None
    store = store or Store.open(runs_dir)
    try:
        host = socket.gethostname()
        for row in live_schedulers(store):
            if row["host"] == host and row["jobs"] == jobs and json.loads(row["gpus"] or "null") == gpus:
                return None
    finally:
        if own:
            store.close()
    command = [sys.executable, "-m", "engine.scheduler", "--runs-dir", str(runs_dir), "--jobs", str(jobs)]
    if gpus:
        command += ["--gpus", ",".join(gpus)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    here = str(Path(__file__).resolve().parents[1])  # this engine, whatever the caller's cwd
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(runs_dir / LOG_NAME, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env=env)
    return process.pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="engine.scheduler", description="drain the queue of runs, then exit")
    parser.add_argument("--runs-dir", required=True)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--gpus", default=None, help="GPU indices, one run per GPU: 0,1,3")
    args = parser.parse_args(argv)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    store = Store.open(args.runs_dir)
    scheduler = Scheduler(store, jobs=max(1, args.jobs), gpus=gpus)
    signal.signal(signal.SIGTERM, scheduler.stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        return scheduler.run()
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
