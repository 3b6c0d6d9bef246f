"""Executors start a run's worker process and can stop it; the run itself is in the database.

The local executor starts `python -u -m engine.worker --runs-dir D --run-id N` in its own
session (so Ctrl-C in a terminal or quitting qtui does not reach it), with its output (JSON
lines) going to `runs_dir/run-NNNNN/worker.log`, and `CUDA_VISIBLE_DEVICES` set to its GPU
when the scheduler has a GPU pool. The worker records its own status, progress and results in
SQLite, so whoever started it may go away. The Slurm executor is `engine.slurm`. Cancelling
a local run sends SIGTERM to its worker's process group and SIGKILL once the cancel grace
(`cancel_grace_s` of qtui.toml) is over: inside a long torch operation the worker's SIGTERM
handler runs only when the operation returns. Torch-free.

`QTUI_WORKER_COMMAND` (a JSON list) replaces `python -u -m engine.worker` in front of
`--runs-dir D --run-id N`: a hook for wrappers (profilers, `nice`) and for tests' stand-in
workers, which must reach the scheduler process too.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine.settings import CANCEL_GRACE_S

if TYPE_CHECKING:  # the store pulls in sqlite-utils; lost-run checks must stay cheap for qtui
    from engine.store import Store

LOG_NAME = "worker.log"
LOST_AFTER = 120.0  # seconds without a heartbeat: the run is lost, whatever host it ran on
HEARTBEAT_EVERY = 10.0  # how often a worker beats, even inside a long stage


@dataclass
class RunHandle:
    run_id: int
    log_path: Path
    process: subprocess.Popen | None = None
    started: float = field(default_factory=time.time)

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()


def worker_prefix() -> list[str]:
    custom = os.environ.get("QTUI_WORKER_COMMAND")
    if custom:
        return [str(x) for x in json.loads(custom)]
    return [sys.executable, "-u", "-m", "engine.worker"]


def worker_command(runs_dir: Path, run_id: int) -> list[str]:
    return [*worker_prefix(), "--runs-dir", str(runs_dir), "--run-id", str(run_id)]


def log_path(store: Store, run_id: int) -> Path:
    return store.run_folder(run_id) / LOG_NAME


class LocalExecutor:
    name = "local"

    def launch(self, store: Store, run_id: int, gpu: str | None = None) -> RunHandle:
        path = log_path(store, run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        with open(path, "ab") as log:
            process = subprocess.Popen(
                worker_command(store.runs_dir, run_id),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        try:
            store.set_pid(run_id, process.pid)
        except sqlite3.OperationalError:  # locked or full: the worker records its pid when it starts
            pass
        return RunHandle(run_id=run_id, log_path=path, process=process)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (finished, not yet reaped by its parent) counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


def is_lost(run: dict, now: float | None = None, lost_after: float = LOST_AFTER) -> bool:
    """A run recorded as running whose worker is gone: its process no longer exists (on this
    host, where that can be checked), or its heartbeat is older than `lost_after` seconds
    (on any host: workers beat every HEARTBEAT_EVERY seconds, remote ones through their run
    folder)."""
    if run.get("status") != "running":
        return False
    if run.get("host") == socket.gethostname() and (run.get("executor") or "local") == "local" \
            and run.get("pid") and not pid_alive(run.get("pid")):
        return True
    beat = run.get("heartbeat_at")
    if beat is None:
        return False
    return (time.time() if now is None else now) - beat > lost_after


def display_status(run: dict) -> str:
    return "lost" if is_lost(run) else run.get("status") or "queued"


@dataclass
class Stop:
    """A local worker told to stop: SIGTERM to its process group was sent; SIGKILL follows at
    `deadline` if the worker is still there (inside a long torch operation, a Python signal
    handler runs only once the operation returns)."""
    run_id: int
    pid: int
    deadline: float
    grace: float
    killed: bool = False


def signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def begin_cancel(store: Store, run_id: int, grace: float = CANCEL_GRACE_S) -> Stop | None:
    """Mark a run for cancellation and start stopping it: a waiting run leaves the queue, a
    Slurm job gets scancel (Slurm escalates to SIGKILL itself), a local worker of this host gets
    SIGTERM and is returned as a Stop for `settle`. A local worker of another host cannot be
    stopped from here: its run stays running."""
    from engine.queue_store import request_cancel

    run = request_cancel(store, run_id)
    if run["status"] not in ("queued", "running"):
        return None
    if (run.get("executor") or "local") == "slurm":
        if run.get("job_id"):
            from engine.slurm import scancel

            scancel(run["job_id"])
    elif run.get("host") == socket.gethostname() and pid_alive(run.get("pid")):
        signal_group(run["pid"], signal.SIGTERM)
        return Stop(run_id, run["pid"], time.time() + grace, grace)
    elif run["status"] == "running" and run.get("host") != socket.gethostname():
        return None
    store.finish_if_unfinished(run_id, "cancelled", "cancelled by the user")
    return None


def settle(store: Store, stop: Stop, now: float | None = None) -> bool:
    """Whether a stop is over: its worker has exited, or its grace is over and it is killed now
    (its whole process group). The run is then recorded cancelled, unless its worker recorded
    an outcome first (its own SIGTERM handler, or a result just before the signal)."""
    if pid_alive(stop.pid):
        if (time.time() if now is None else now) < stop.deadline:
            return False
        signal_group(stop.pid, signal.SIGKILL)
        stop.killed = True
    error = "cancelled by the user"
    if stop.killed:
        error += f" (its worker ignored SIGTERM for {stop.grace:g} s and was killed)"
    store.finish_if_unfinished(stop.run_id, "cancelled", error)
    return True


def cancel_runs(store: Store, run_ids: list[int], grace: float = CANCEL_GRACE_S) -> list[Stop]:
    """Cancel runs (`begin_cancel`), then wait for their local workers together: each one gets
    SIGKILL once `grace` seconds have passed since its SIGTERM, so no cancel takes longer than
    the grace (whatever the number of runs). A Ctrl-C during the wait kills them at once.
    Returns the stops (`killed`: the worker needed SIGKILL)."""
    stops = [s for s in (begin_cancel(store, run_id, grace) for run_id in run_ids) if s is not None]
    pending = list(stops)
    try:
        while pending:
            pending = [s for s in pending if not settle(store, s)]
            if pending:
                time.sleep(0.05)
    except KeyboardInterrupt:  # asked again: no more waiting
        for stop in pending:
            settle(store, stop, now=stop.deadline)
    return stops


def cancel_run(store: Store, run_id: int, grace: float = CANCEL_GRACE_S) -> bool:
    """Cancel one run, waiting at most `grace` seconds for its worker. Returns whether the run
    ended up cancelled (by us, or by its worker's own SIGTERM handler)."""
    cancel_runs(store, [run_id], grace)
    return store.get_run(run_id)["status"] == "cancelled"
