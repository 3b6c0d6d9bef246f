"""Prompt cancelling: a worker inside a long operation (its SIGTERM handler cannot run until the
operation returns; the stand-in blocks SIGTERM) is killed once the cancel grace of qtui.toml is
over, by `engine queue cancel` and by Ctrl-C of `engine run`, and its run is recorded
`cancelled`, whoever reaps it: the cancelling command, the scheduler, or a later scheduler
when the first one is gone. The setting's bad values are one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.executor import pid_alive
from engine.store import Store
from tests.conftest import engine
from tests.qtui_helpers import write_catalogue

HERE = Path(__file__).resolve().parent
WORKER = [sys.executable, "-u", str(HERE / "scheduler_test_worker.py")]
GRACE = 2.0


@pytest.fixture
def stuck_worker(monkeypatch, tmp_path):
    """Workers that ignore SIGTERM for a minute, and a 2 s cancel grace in qtui.toml."""
    monkeypatch.setenv("QTUI_WORKER_COMMAND", json.dumps(WORKER))
    monkeypatch.setenv("SCHED_HANG", "block")
    monkeypatch.setenv("SCHED_BLOCK_S", "60")
    (tmp_path / "qtui.toml").write_text(f"[engine]\ncancel_grace_s = {GRACE}\n")
    return tmp_path


def start_scheduler(runs_dir: Path, jobs: int = 1) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    return subprocess.Popen([sys.executable, "-m", "engine.scheduler", "--runs-dir", str(runs_dir), "--jobs",
                             str(jobs)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def running_pid(store: Store, run_id: int) -> int:
    run = wait_for(lambda: (r := store.get_run(run_id))["status"] == "running" and r, what=f"run {run_id} running")
    return run["pid"]


def test_queue_cancel_kills_a_worker_stuck_in_a_long_operation_after_the_grace(stuck_worker):
    runs = stuck_worker / "runs"
    store = Store.open(runs)
    run_id = store.create_run("exp", "v", {}, "h")
    scheduler = start_scheduler(runs)
    try:
        pid = running_pid(store, run_id)
        start = time.monotonic()
        cancel = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "queue", "cancel", str(run_id), "--runs-dir", str(runs),
             "--experiments", str(stuck_worker / "experiments.toml")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
        wait_for(lambda: not pid_alive(pid), timeout=GRACE + 10, what="the worker gone")
        gone = time.monotonic() - start
        out, err = cancel.communicate(timeout=30)
    finally:
        scheduler.kill() if scheduler.poll() is None else None
    # SIGTERM was not enough (the worker stayed for the whole grace); SIGKILL came right after it
    assert GRACE <= gone <= GRACE + 2, gone
    assert cancel.returncode == 0, err
    assert out.strip() == f"cancelled run {run_id} (killed: still running 2 s after SIGTERM)"
    run = store.get_run(run_id)
    assert run["status"] == "cancelled" and "killed" in run["error"], run
    log = scheduler.communicate(timeout=30)[0]
    assert store.get_run(run_id)["status"] == "cancelled", log  # the scheduler's reap changed nothing


def test_a_killed_worker_of_a_cancelled_run_is_cancelled_whoever_reaps_it(stuck_worker):
    """The cancelling process dies between its SIGKILL and recording the outcome: the scheduler
    that reaps the worker records `cancelled` (not failed); with no scheduler left either, the
    next scheduler's check for vanished workers does."""
    from engine.queue_store import fail_vanished_runs, request_cancel

    runs = stuck_worker / "runs"
    store = Store.open(runs)
    reaped, vanished = store.create_run("exp", "v", {}, "h"), store.create_run("exp", "w", {}, "h")
    scheduler = start_scheduler(runs)
    try:
        pid = running_pid(store, reaped)
        request_cancel(store, reaped)
        os.killpg(pid, signal.SIGKILL)
        wait_for(lambda: store.get_run(reaped)["status"] != "running", what="the reap")
        run = store.get_run(reaped)
        assert run["status"] == "cancelled" and "ignored SIGTERM and was killed" in run["error"], run
        pid = running_pid(store, vanished)
        scheduler.kill()  # the scheduler goes first, then the worker: nobody reaps it
        scheduler.wait(timeout=30)
        request_cancel(store, vanished)
        os.killpg(pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), what="the worker gone")
    finally:
        scheduler.kill() if scheduler.poll() is None else None
    store.db["runs"].update(vanished, {"heartbeat_at": time.time() - 60})
    assert fail_vanished_runs(store) == [vanished]
    run = store.get_run(vanished)
    assert run["status"] == "cancelled" and run["error"] == "cancelled by the user", run


def test_ctrl_c_of_engine_run_kills_its_stuck_workers_within_one_grace(stuck_worker):
    """Two runs side by side, both stuck: one grace for both, not one each."""
    write_catalogue(stuck_worker)
    runs = stuck_worker / "runs"
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "run", "digits-rtn", "--variant", "w8", "--variant", "w4", "--jobs", "2",
         "--experiments", str(stuck_worker / "experiments.toml"), "--runs-dir", str(runs)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=stuck_worker)
    try:
        store = wait_for(lambda: (runs / "qtui.db").exists() and Store.open(runs), what="the database")
        ids = wait_for(lambda: [r["id"] for r in store.runs()] if len(store.runs()) == 2 else None, what="queued")
        pids = [running_pid(store, i) for i in ids]
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=GRACE + 10, what="the workers gone")
        gone = time.monotonic() - start
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill() if proc.poll() is None else None
    assert GRACE <= gone <= GRACE + 2, gone
    assert proc.returncode == 130, err
    assert "Ctrl-C again kills them now" in out
    for run_id in ids:
        run = store.get_run(run_id)
        assert run["status"] == "cancelled" and "killed" in run["error"], run


def test_a_slurm_run_is_still_cancelled_by_scancel_without_waiting(stuck_worker):
    """Slurm escalates to SIGKILL itself (its KillWait): the cancel calls scancel and returns."""
    bin_dir = stuck_worker / "bin"
    bin_dir.mkdir()
    calls = stuck_worker / "scancel-calls"
    (bin_dir / "scancel").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scancel").chmod(0o755)
    store = Store.open(stuck_worker / "runs")
    run_id = store.create_run("exp", "v", {}, "h", executor="slurm")
    store.db["runs"].update(run_id, {"status": "running", "job_id": "4242_0", "host": "login-node", "pid": 1})
    start = time.monotonic()
    result = engine("queue", "cancel", str(run_id), "--runs-dir", str(stuck_worker / "runs"),
                    "--experiments", str(stuck_worker / "experiments.toml"),
                    env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert time.monotonic() - start < GRACE
    assert result.returncode == 0 and result.stdout.strip() == f"cancelled run {run_id} (scancel 4242_0)", result
    assert calls.read_text() == "4242_0\n"
    assert store.get_run(run_id)["status"] == "cancelled"


@pytest.mark.parametrize("value, shown", [("-1", "-1"), ('"10"', "'10'"), ("true", "True"), ("nan", "nan"),
                                          ("inf", "inf")])
def test_a_bad_cancel_grace_is_one_line_naming_the_file_and_key(tmp_path, value, shown):
    store = Store.open(tmp_path / "runs")
    run_id = store.create_run("exp", "v", {}, "h")
    (tmp_path / "qtui.toml").write_text(f"[engine]\njobs = 1\ncancel_grace_s = {value}\n")
    result = engine("queue", "cancel", str(run_id), "--runs-dir", str(tmp_path / "runs"),
                    "--experiments", str(tmp_path / "experiments.toml"))
    assert result.returncode == 2
    assert result.stderr == (f"error: {tmp_path / 'qtui.toml'}:3: engine.cancel_grace_s: must be a number of "
                             f"seconds (at least 0), got {shown}\n")
    assert store.get_run(run_id)["status"] == "queued"  # nothing cancelled


def test_the_cancel_grace_setting(tmp_path):
    from engine.settings import CANCEL_GRACE_S, load_settings

    assert load_settings(tmp_path / "experiments.toml").cancel_grace_s == CANCEL_GRACE_S == 10
    (tmp_path / "qtui.toml").write_text("[engine]\ncancel_grace_s = 0.5\n")
    assert load_settings(tmp_path / "experiments.toml").cancel_grace_s == 0.5
    (tmp_path / "qtui.toml").write_text("[engine]\ncancel_grace_s = 0\n")  # SIGKILL right after SIGTERM
    assert load_settings(tmp_path / "experiments.toml").cancel_grace_s == 0
