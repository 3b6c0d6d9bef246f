"""The persistent queue and its scheduler: atomic claims with real racing processes, a queue
that survives the terminal's SIGHUP, the GPU pool, lost runs by heartbeat, remote workers that
never open the database, the queue commands, and the schema migration."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.store import QUEUE_COLUMNS, SCHEMA_VERSION, Store
from tests.conftest import engine
from tests.qtui_helpers import write_catalogue

HERE = Path(__file__).resolve().parent
WORKER = [sys.executable, "-u", str(HERE / "scheduler_test_worker.py")]


@pytest.fixture
def test_worker(monkeypatch, tmp_path):
    record = tmp_path / "record.txt"
    monkeypatch.setenv("QTUI_WORKER_COMMAND", json.dumps(WORKER))
    monkeypatch.setenv("SCHED_RECORD", str(record))
    monkeypatch.setenv("SCHED_SLEEP", "0.3")
    return record


def read_record(path: Path) -> tuple[list[int], list[dict]]:
    starts, done = [], []
    for line in path.read_text().splitlines():
        kind, *rest = line.split()
        if kind == "start":
            starts.append(int(rest[0]))
        else:
            done.append({"run": int(rest[0]), "pid": int(rest[1]), "gpu": rest[2],
                         "start": float(rest[3]), "end": float(rest[4])})
    return starts, done


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = now = 0
    for _, d in edges:
        now += d
        best = max(best, now)
    return best


def queue(store: Store, n: int, **kwargs) -> list[int]:
    return [store.create_run("exp", f"v{i}", {}, "h", **kwargs) for i in range(n)]


def scheduler(runs_dir: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    return subprocess.Popen([sys.executable, "-m", "engine.scheduler", "--runs-dir", str(runs_dir), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_racing_schedulers_never_start_a_run_twice(tmp_path, test_worker):
    runs_dir = tmp_path / "runs"
    store = Store.open(runs_dir)
    ids = queue(store, 12)
    procs = [scheduler(runs_dir, "--jobs", "3") for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    starts, done = read_record(test_worker)
    assert sorted(starts) == ids  # each run launched exactly once
    assert sorted(d["run"] for d in done) == ids
    assert all(store.get_run(i)["status"] == "done" for i in ids)
    # the limit holds across both schedulers: never more than 3 runs at once on this host
    assert max_overlap([(d["start"], d["end"]) for d in done]) <= 3
    # both took part, and both exited when the queue was empty
    assert all("queue empty: exiting" in out for out in outputs), outputs
    launched = [out.count("started worker") for out in outputs]
    assert sum(launched) == 12
    assert not store.db.execute("select count(*) from schedulers").fetchone()[0]


def test_queue_order_and_reorder(tmp_path, test_worker):
    from engine.queue_store import move, queued_runs

    store = Store.open(tmp_path / "runs")
    a, b, c = queue(store, 3)
    assert [r["id"] for r in queued_runs(store)] == [a, b, c]
    assert move(store, c, -2)  # to the front
    assert move(store, a, +5)  # to the back
    assert [r["id"] for r in queued_runs(store)] == [c, b, a]
    proc = scheduler(tmp_path / "runs", "--jobs", "1")
    proc.communicate(timeout=60)
    starts, _ = read_record(test_worker)
    assert starts == [c, b, a]


def test_the_queue_survives_the_terminal_closing(tmp_path, test_worker, monkeypatch):
    """`engine queue add` in a terminal session, then SIGHUP to that session (the SSH window
    closed): the three runs all run, one after the other."""
    write_catalogue(tmp_path)
    monkeypatch.setenv("SCHED_SLEEP", "1.0")
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    terminal = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "queue", "add", "digits-rtn", "--variant", "w8", "--variant", "w4",
         "--variant", "w2", "--experiments", str(tmp_path / "experiments.toml"), "--runs-dir", str(tmp_path / "runs")],
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    out, err = terminal.communicate(timeout=60)
    assert terminal.returncode == 0, out + err
    assert out.count("queued run") == 3
    store = Store.open(tmp_path / "runs")
    wait_for(lambda: any(r["status"] == "running" for r in store.runs()), what="the first run")
    try:
        os.killpg(terminal.pid, signal.SIGHUP)  # the session of the terminal is gone
    except ProcessLookupError:
        pass
    wait_for(lambda: all(r["status"] == "done" for r in store.runs()), what="all three done")
    _, done = read_record(test_worker)
    assert max_overlap([(d["start"], d["end"]) for d in done]) == 1  # one after the other
    listing = engine("queue", "--runs-dir", str(tmp_path / "runs"))
    assert listing.returncode == 0 and "schedulers:" in listing.stdout


def test_gpu_pool_gives_each_worker_its_own_gpu(tmp_path, test_worker):
    store = Store.open(tmp_path / "runs")
    ids = queue(store, 6)
    proc = scheduler(tmp_path / "runs", "--gpus", "0,1,3")
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    _, done = read_record(test_worker)
    assert {d["gpu"] for d in done} <= {"0", "1", "3"} and len({d["gpu"] for d in done}) >= 2
    for gpu in ("0", "1", "3"):  # never two runs on one GPU at a time
        assert max_overlap([(d["start"], d["end"]) for d in done if d["gpu"] == gpu] or [(0, 0)]) <= 1
    assert max_overlap([(d["start"], d["end"]) for d in done]) <= 3
    for d in done:  # the GPU recorded on the run is the one its worker was given
        assert store.get_run(d["run"])["gpu"] == d["gpu"]
    for run_id in ids:  # and the worker printed it in its log
        log = (store.runs_dir / store.get_run(run_id)["folder"] / "worker.log").read_text()
        assert f"CUDA_VISIBLE_DEVICES={store.get_run(run_id)['gpu']}" in log


def test_gpus_all_reads_the_device_list(tmp_path, monkeypatch):
    from engine.errors import ConfigError
    from engine.settings import load_settings

    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf '0\\n1\\n2\\n'\n")
    smi.chmod(0o755)
    (tmp_path / "qtui.toml").write_text('[engine]\ngpus = "all"\n')
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    assert load_settings(tmp_path / "experiments.toml").gpus == ["0", "1", "2"]
    monkeypatch.setenv("PATH", "/nonexistent")  # no GPU here: the concurrency limit as before
    assert load_settings(tmp_path / "experiments.toml").gpus is None
    (tmp_path / "qtui.toml").write_text('[engine]\njobs = 2\ngpus = "0,x"\n')
    with pytest.raises(ConfigError, match=r"qtui.toml:3: engine.gpus"):
        load_settings(tmp_path / "experiments.toml")


def test_settings_file(tmp_path):
    from engine.errors import ConfigError
    from engine.settings import load_settings

    (tmp_path / "qtui.toml").write_text(
        '[engine]\nexecutor = "slurm"\n\n[slurm]\npartition = "gpu"\ngpus_per_run = 1\ncpus_per_run = 8\n'
        'mem = "32G"\ntime = "02:30:00"\naccount = "proj"\nqos = "high"\narray_parallelism = 4\n'
        'extra = { constraint = "a100" }\n')
    s = load_settings(tmp_path / "experiments.toml")
    assert s.executor == "slurm" and s.slurm.time_min == 150 and s.slurm.extra == {"constraint": "a100"}
    from engine.slurm import executor_parameters

    params = executor_parameters(s.slurm.as_dict(), 5, "b1")
    assert params["partition"] == "gpu" and params["gpus_per_node"] == 1 and params["array_parallelism"] == 4
    assert params["additional_parameters"] == {"constraint": "a100"} and params["time"] == 150
    (tmp_path / "qtui.toml").write_text('[slurm]\npartition = "gpu"\ntime = "soon"\n')
    with pytest.raises(ConfigError, match=r"qtui.toml:3: slurm.time"):
        load_settings(tmp_path / "experiments.toml")
    (tmp_path / "qtui.toml").write_text('[slurm]\npartitoin = "gpu"\n')
    with pytest.raises(ConfigError, match="slurm.partitoin: unknown key"):
        load_settings(tmp_path / "experiments.toml")


def test_lost_by_heartbeat_whatever_the_host():
    from engine.executor import LOST_AFTER, is_lost

    now = time.time()
    elsewhere = {"status": "running", "host": "node-17", "pid": 1, "executor": "slurm"}
    assert not is_lost({**elsewhere, "heartbeat_at": now - 5}, now)
    assert is_lost({**elsewhere, "heartbeat_at": now - LOST_AFTER - 1}, now)
    here = {"status": "running", "host": socket.gethostname(), "heartbeat_at": now}
    assert is_lost({**here, "pid": 999_999_999}, now)  # this host: a dead pid is lost at once
    assert not is_lost({**here, "pid": os.getpid()}, now)
    assert not is_lost({**elsewhere, "status": "done", "heartbeat_at": 0}, now)


def test_cancel_a_queued_run_from_the_cli(tmp_path):
    store = Store.open(tmp_path / "runs")
    a, b = queue(store, 2)
    result = engine("queue", "cancel", str(b), "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 0 and f"cancelled run {b}" in result.stdout
    assert store.get_run(b)["status"] == "cancelled" and store.get_run(a)["status"] == "queued"
    listing = engine("queue", "--runs-dir", str(tmp_path / "runs"))
    assert f" {a} " in listing.stdout and f" {b} " not in listing.stdout and "waiting" in listing.stdout
    missing = engine("queue", "cancel", "999", "--runs-dir", str(tmp_path / "runs"))
    assert missing.returncode == 2 and "no run 999" in missing.stderr


def test_a_schema_1_database_is_migrated(tmp_path):
    store = Store.open(tmp_path)
    run_id = store.create_run("exp", "A", {"b": 1}, "h")
    store.put_metrics(run_id, {"fid": 2.0})
    conn = store.db.conn
    conn.execute("drop index runs_queue")
    for column in QUEUE_COLUMNS:
        conn.execute(f"alter table runs drop column {column}")
    conn.execute("drop table schedulers")
    conn.execute("update meta set value = '1' where key = 'schema_version'")
    conn.commit()
    store.close()
    store = Store.open(tmp_path)
    assert store.schema_version() == SCHEMA_VERSION == 2
    run = store.get_run(run_id)
    assert run["queue_pos"] == run_id and store.metrics(run_id) == {"fid": 2.0}
    assert set(QUEUE_COLUMNS) <= set(run)


def test_a_remote_worker_never_opens_the_database(tmp_path, tiny_experiments):
    """The real worker in remote mode on a tiny model, in a process where sqlite3 cannot
    connect at all: it writes its run folder, and ingestion fills the database as a local
    worker would have."""
    from engine.config import load_catalogue
    from engine.run_files import ingest, write_job_file

    runs_dir = tmp_path / "runs"
    store = Store.open(runs_dir)
    experiment = load_catalogue(tiny_experiments).get("tiny")
    config = experiment.run_config("A", 10)
    run_id = store.create_run("tiny", "A", config, "h", executor="slurm")
    write_job_file(store, run_id)
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(
        "import sqlite3\n"
        "def refuse(*a, **k):\n    raise RuntimeError('this worker may not open SQLite')\n"
        "sqlite3.connect = refuse\n")
    env = dict(os.environ, PYTHONPATH=f"{guard}{os.pathsep}{HERE.parent}", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "engine.worker", "--runs-dir", str(runs_dir), "--run-id",
                          str(run_id), "--remote"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert store.get_run(run_id)["status"] == "queued"  # nothing reached the database
    lines = ingest(store, run_id)
    ops = [line["op"] for line in lines]
    assert ops[0] == "running" and ops[-1] == "finish" and "metrics" in ops and "layers" in ops
    run = store.get_run(run_id)
    assert run["status"] == "done" and run["node"] == socket.gethostname()
    metrics = store.metrics(run_id)
    assert metrics["mean_bits"] == 4.0 and metrics["fid_ci_low"] <= metrics["fid"] <= metrics["fid_ci_high"]
    assert {l["role"] for l in store.layers(run_id)} == {"conv", "attention", "linear"}
    kinds = {a["kind"] for a in store.artifacts(run_id)}
    assert {"checkpoint", "samples", "grid"} <= kinds
    assert store.last_event(run_id)["stage"] == "save"
    assert ingest(store, run_id) == []  # ingestion resumes after what it applied
    # the same worker told to open the database in that process fails: the guard is real
    refused = subprocess.run([sys.executable, "-c", "import sqlite3; sqlite3.connect(':memory:')"],
                             capture_output=True, text=True, env=env)
    assert refused.returncode != 0 and "may not open SQLite" in refused.stderr


def test_ctrl_c_of_engine_run_cancels_only_its_own_runs(tmp_path, test_worker, monkeypatch):
    write_catalogue(tmp_path)
    monkeypatch.setenv("SCHED_HANG", "1")
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), PYTHONUNBUFFERED="1")
    common = ["--experiments", str(tmp_path / "experiments.toml"), "--runs-dir", str(tmp_path / "runs")]
    cli = [sys.executable, "-m", "engine.cli"]
    added = subprocess.run([*cli, "queue", "add", "digits-rtn", "--variant", "w2", *common],
                           capture_output=True, text=True, env=env, timeout=60)
    assert added.returncode == 0, added.stderr
    store = Store.open(tmp_path / "runs")
    other = wait_for(lambda: next(iter(store.runs(status="running")), None), what="the other run")
    proc = subprocess.Popen([*cli, "run", "digits-rtn", "--variant", "w8", "--variant", "w4", *common],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for(lambda: len(store.runs()) == 3, what="queued behind it")
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    statuses = {r["id"]: r["status"] for r in store.runs()}
    assert statuses.pop(other["id"]) == "running" and set(statuses.values()) == {"cancelled"}
    assert engine("queue", "cancel", str(other["id"]), "--runs-dir", str(tmp_path / "runs")).returncode == 0
    assert store.get_run(other["id"])["status"] == "cancelled"


def test_a_run_whose_worker_vanished_unwatched_is_failed(tmp_path):
    """Scheduler killed, then its worker: nobody reaped the worker. The next scheduler fails the
    run (two heartbeats late, pid gone) instead of leaving it `running` for ever; a live worker,
    a fresh heartbeat and the scheduler's own children are left alone."""
    import subprocess
    import sys
    import time

    from engine.queue_store import fail_vanished_runs
    from engine.store import Store

    store = Store.open(tmp_path / "runs")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ids = [store.create_run("e", "v", {"sampling": {}}, "h") for _ in range(4)]
    vanished, fresh, alive, child = ids
    for run_id in ids:
        store.mark_running(run_id, pid=gone.pid)
    store.db["runs"].update(alive, {"pid": __import__("os").getpid()})
    old = time.time() - 60
    for run_id in (vanished, alive, child):
        store.db["runs"].update(run_id, {"heartbeat_at": old})
    assert fail_vanished_runs(store, own={child}) == [vanished]
    run = store.get_run(vanished)
    assert run["status"] == "failed" and f"pid {gone.pid}" in run["error"] and "vanished" in run["error"]
    assert [store.get_run(i)["status"] for i in (fresh, alive, child)] == ["running"] * 3
    store.close()


def test_a_scheduler_waiting_out_a_lock_is_not_taken_for_dead(tmp_path):
    """A scheduler blocked 30 s on another process's write lock cannot beat; on its own host it
    is alive while its process is (its claims must not be released and launched again), and a
    second launch of a running run does not overwrite the pid of the worker that holds it."""
    import os
    import socket
    import time

    from engine.queue_store import SCHEDULER_DEAD_AFTER, scheduler_alive
    from engine.store import Store

    now = time.time()
    here = {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat_at": now - 2 * SCHEDULER_DEAD_AFTER}
    assert scheduler_alive(here, now)
    assert not scheduler_alive({**here, "heartbeat_at": now - 3600}, now)  # a reused pid of a long-dead row
    assert not scheduler_alive({**here, "host": "elsewhere"}, now)

    store = Store.open(tmp_path / "runs")
    run_id = store.create_run("e", "v", {"sampling": {}}, "h")
    store.set_pid(run_id, 111)
    assert store.get_run(run_id)["pid"] == 111  # queued: the launched worker's pid
    store.mark_running(run_id, pid=222)
    store.set_pid(run_id, 333)  # a second launch finds the run taken
    assert store.get_run(run_id)["pid"] == 222
    store.close()
