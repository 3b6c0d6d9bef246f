"""Executors start a run's worker process and can stop it; the run itself is in the database.

The local executor starts `python -u -m engine.worker --runs-dir D --run-id N` in its own
session (so Ctrl-C in a terminal or quitting qtui does not reach it), with its output (JSON
lines) going to `runs_dir/run-NNNNN/worker.log`. The worker records its own status, progress
and results in SQLite, so whoever started it may go away. Torch-free.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the store pulls in sqlite-utils; lost-run checks must stay cheap for qtui
    from engine.store import Store

LOG_NAME = "worker.log"


@dataclass
class RunHandle:
    run_id: int
    log_path: Path
    process: subprocess.Popen | None = None
    started: float = field(default_factory=time.time)

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()


def worker_command(runs_dir: Path, run_id: int) -> list[str]:
    return [sys.executable, "-u", "-m", "engine.worker", "--runs-dir", str(runs_dir), "--run-id", str(run_id)]


def log_path(store: Store, run_id: int) -> Path:
    return store.run_folder(run_id) / LOG_NAME


class LocalExecutor:
    name = "local"

    def launch(self, store: Store, run_id: int) -> RunHandle:
        path = log_path(store, run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(path, "ab") as log:
            process = subprocess.Popen(
                worker_command(store.runs_dir, run_id),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        store.set_pid(run_id, process.pid)
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


def is_lost(run: dict) -> bool:
    """A run recorded as running on this host whose worker process no longer exists."""
    return (
        run.get("status") == "running"
        and run.get("host") == socket.gethostname()
        and not pid_alive(run.get("pid"))
    )


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
    """Cancel a queued or running run of this host; returns whether it ended up cancelled
    (by us, or by its worker's own SIGTERM handler)."""
    run = store.get_run(run_id)
    if run["status"] in ("queued", "running") and run.get("host") == socket.gethostname():
        if pid_alive(run.get("pid")):
            stop_process(run["pid"], grace)
    store.finish_if_unfinished(run_id, "cancelled", "cancelled by the user")
    return store.get_run(run_id)["status"] == "cancelled"
