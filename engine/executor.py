"""Executors start a run's worker process and can stop it; the run itself is in the database.

The local executor starts `python -u -m engine.worker --runs-dir D --run-id N` in its own
session (so Ctrl-C in a terminal or quitting qtui does not reach it), with its output (JSON
lines) going to `runs_dir/run-NNNNN/worker.log`, and `CUDA_VISIBLE_DEVICES` set to its GPU
when the scheduler has a GPU pool. The worker records its own status, progress and results in
SQLite, so whoever started it may go away. The Slurm executor is `engine.slurm`. Torch-free.

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


def stop_process(pid: int, grace: float = 5.0) -> None:
    """SIGTERM the worker's process group, then SIGKILL it if it is still there after grace."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.time() + grace
    while time.time() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def cancel_run(store: Store, run_id: int, grace: float = 5.0) -> bool:
    """Cancel a queued or running run: a waiting one leaves the queue, a local worker of this
    host gets SIGTERM (then SIGKILL), a Slurm job gets scancel. Returns whether the run ended up
    cancelled (by us, or by its worker's own SIGTERM handler)."""
    from engine.queue_store import request_cancel

    run = request_cancel(store, run_id)
    if run["status"] not in ("queued", "running"):
        return run["status"] == "cancelled"
    if (run.get("executor") or "local") == "slurm":
        if run.get("job_id"):
            from engine.slurm import scancel

            scancel(run["job_id"])
    elif run.get("host") == socket.gethostname() and pid_alive(run.get("pid")):
        stop_process(run["pid"], grace)
    elif run["status"] == "running" and run.get("host") != socket.gethostname():
        return False  # a local worker of another host: only its own host can stop it
    store.finish_if_unfinished(run_id, "cancelled", "cancelled by the user")
    return store.get_run(run_id)["status"] == "cancelled"
