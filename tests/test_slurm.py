"""The Slurm executor against a real cluster (`.ci/slurm-up.sh` brings one up on this machine).

In CI (CI=true) these tests must run: a missing cluster fails them. Elsewhere they skip with
the reason when no Slurm controller answers."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.slurm import finished_state, slurm_available, squeue_states
from engine.store import Store
from tests.conftest import engine

HERE = Path(__file__).resolve().parent
TEST_WORKER = [sys.executable, "-u", str(HERE / "scheduler_test_worker.py")]
REASON = slurm_available()
if REASON and os.environ.get("CI") == "true":
    raise RuntimeError(f"CI needs the Slurm cluster of .ci/slurm-up.sh: {REASON}")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no Slurm cluster: {REASON} (run .ci/slurm-up.sh as root)")


def settings(folder: Path, time_limit: str = "5", parallelism: int = 2) -> None:
    (folder / "qtui.toml").write_text(
        f'[slurm]\npartition = "debug"\ncpus_per_run = 1\nmem = "1G"\ntime = "{time_limit}"\n'
        f"array_parallelism = {parallelism}\nsignal_delay_s = 10\n")


def start_engine(*args, env=None) -> subprocess.Popen:
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(HERE.parent))
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def runs_of(runs_dir: Path) -> list[dict]:
    if not (runs_dir / "qtui.db").exists():
        return []
    store = Store.open(runs_dir)
    try:
        return store.runs()
    finally:
        store.close()


def gone_from_squeue(job_id: str) -> bool:
    return job_id not in squeue_states([job_id])


def test_a_tiny_experiment_on_slurm_ends_done(tiny_experiments, tmp_path):
    settings(tiny_experiments.parent)
    runs_dir = tmp_path / "runs"
    result = engine("run", "tiny", "--executor", "slurm", "--samples", "10", "--variant", "fp", "--variant", "A",
                    "--variant", "B", "--experiments", str(tiny_experiments), "--runs-dir", str(runs_dir), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    store = Store.open(runs_dir)
    runs = store.runs()
    assert [r["status"] for r in runs] == ["done"] * 3, [(r["status"], r["error"]) for r in runs]
    arrays = {r["job_id"].split("_")[0] for r in runs}
    assert len(arrays) == 1  # one job array for one `engine run`
    assert sorted(r["job_id"].split("_")[1] for r in runs) == ["0", "1", "2"]
    for run in runs:
        assert run["executor"] == "slurm" and run["node"] == socket.gethostname().split(".")[0]
        metrics = store.metrics(run["id"])
        assert metrics["fid_ci_low"] <= metrics["fid"] <= metrics["fid_ci_high"]
        assert store.layers(run["id"]) and {"grid", "samples"} <= {a["kind"] for a in store.artifacts(run["id"])}
        log = (runs_dir / run["folder"] / "worker.log").read_text()
        assert "remote: no database" in log
    # the scheduler stays until Slurm's final state is recorded on each run
    wait_for(lambda: [r["slurm_state"] for r in runs_of(runs_dir)] == ["COMPLETED"] * 3, timeout=30,
             what="Slurm's final state")
    state = finished_state(runs[0]["job_id"])
    assert state is not None and state.state == "COMPLETED" and state.name.startswith("qtui-")
    assert "prompt acc" in result.stdout  # the results table, as with local runs


def test_cancel_and_ctrl_c_reach_scancel(tmp_path, tiny_experiments):
    settings(tiny_experiments.parent)
    runs_dir = tmp_path / "runs"
    env = dict(os.environ, QTUI_WORKER_COMMAND=json.dumps(TEST_WORKER), SCHED_HANG="1")
    proc = start_engine("run", "tiny", "--executor", "slurm", "--variant", "fp", "--variant", "A",
                        "--experiments", str(tiny_experiments), "--runs-dir", str(runs_dir), env=env)
    runs = wait_for(lambda: [r for r in runs_of(runs_dir) if r["status"] == "running"] if len(
        [r for r in runs_of(runs_dir) if r["status"] == "running"]) == 2 else None, what="both jobs running")
    first, second = runs
    # from the CLI
    out = engine("queue", "cancel", str(first["id"]), "--runs-dir", str(runs_dir))
    assert out.returncode == 0 and f"scancel {first['job_id']}" in out.stdout, out.stdout + out.stderr
    wait_for(lambda: gone_from_squeue(first["job_id"]), timeout=60, what="the job leaves Slurm's queue")
    assert finished_state(first["job_id"]).state == "CANCELLED"
    # Ctrl-C of `engine run` cancels the other
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    wait_for(lambda: gone_from_squeue(second["job_id"]), timeout=60, what="the second job leaves the queue")
    assert finished_state(second["job_id"]).state == "CANCELLED"
    assert [r["status"] for r in runs_of(runs_dir)] == ["cancelled", "cancelled"]
    wait_for(lambda: [r["slurm_state"] for r in runs_of(runs_dir)] == ["CANCELLED"] * 2, timeout=30,
             what="Slurm's final state recorded")


def test_a_job_killed_at_its_time_limit_fails_with_slurms_reason(tmp_path, tiny_experiments):
    settings(tiny_experiments.parent, time_limit="1")
    runs_dir = tmp_path / "runs"
    env = dict(os.environ, QTUI_WORKER_COMMAND=json.dumps(TEST_WORKER), SCHED_HANG="1", PYTHONPATH=str(HERE.parent))
    out = subprocess.run([sys.executable, "-m", "engine.cli", "queue", "add", "tiny", "--executor", "slurm",
                          "--variant", "fp", "--experiments", str(tiny_experiments), "--runs-dir", str(runs_dir)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    run = wait_for(lambda: next((r for r in runs_of(runs_dir) if r["status"] == "running"), None), what="running")
    started = time.time()
    run = wait_for(lambda: next((r for r in runs_of(runs_dir) if r["status"] not in ("queued", "running")), None),
                   timeout=240, what="the time limit")
    assert run["status"] == "failed", run
    assert "TIMEOUT" in run["error"] and run["job_id"] in run["error"], run["error"]
    assert run["slurm_state"] == "TIMEOUT"
    assert re.search(r"TimeLimit|TIMEOUT", run["error"])
    assert time.time() - started < 200


def test_a_new_scheduler_adopts_slurm_runs_of_a_dead_one(tmp_path, tiny_experiments):
    settings(tiny_experiments.parent)
    runs_dir = tmp_path / "runs"
    env = dict(os.environ, QTUI_WORKER_COMMAND=json.dumps(TEST_WORKER), SCHED_HANG="1", PYTHONPATH=str(HERE.parent))
    cli = [sys.executable, "-m", "engine.cli"]
    out = subprocess.run([*cli, "queue", "add", "tiny", "--executor", "slurm", "--variant", "fp",
                          "--experiments", str(tiny_experiments), "--runs-dir", str(runs_dir)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    run = wait_for(lambda: next((r for r in runs_of(runs_dir) if r["status"] == "running"), None), what="running")
    store = Store.open(runs_dir)
    [old] = [r["pid"] for r in store.db.query("select pid from schedulers")]
    os.kill(old, signal.SIGKILL)
    beat = store.get_run(run["id"])["heartbeat_at"]
    time.sleep(3)
    assert store.get_run(run["id"])["heartbeat_at"] == beat  # nobody ingests any more
    listing = subprocess.run([*cli, "queue", "--experiments", str(tiny_experiments), "--runs-dir", str(runs_dir)],
                             capture_output=True, text=True, env=env, timeout=60)
    assert "started one" in listing.stdout, listing.stdout + listing.stderr
    wait_for(lambda: store.get_run(run["id"])["heartbeat_at"] > beat + 2, timeout=60, what="ingestion resumed")
    assert "Slurm run adopted" in (runs_dir / "scheduler.log").read_text()
    out = engine("queue", "cancel", str(run["id"]), "--runs-dir", str(runs_dir))
    assert out.returncode == 0 and "scancel" in out.stdout
    wait_for(lambda: gone_from_squeue(run["job_id"]), timeout=60, what="the job leaves the queue")
    wait_for(lambda: not store.db.execute("select count(*) from schedulers").fetchone()[0], timeout=60,
             what="the new scheduler exits")
    assert store.get_run(run["id"])["status"] == "cancelled"
