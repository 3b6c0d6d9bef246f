"""A full disk during a real tiny `engine run`: the run fails with "no space left ... writing
PATH", the database stays intact, and no file under its final name is half written.

Small filesystems are tmpfs mounts (root only; skipped with the reason otherwise): one over the
run's folder (the database elsewhere has room), or one holding the whole runs folder, filled
to the last byte just before the worker starts (then nobody can write the database until
space comes back, and the scheduler records the failure once it can)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, TINY_TOML, engine

PAGE = 4096
HERE = Path(__file__).resolve().parent


def pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


def mount_tmpfs(folder: Path, size: int) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    folder.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")


@pytest.fixture
def mounts():
    done: list[Path] = []
    yield done
    for folder in reversed(done):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture(scope="module")
def sizes(tmp_path_factory, tiny_models) -> dict[str, int]:
    """Bytes of each file of an undisturbed run of variant A (the budget of the small disks)."""
    root = tmp_path_factory.mktemp("reference-run")
    toml = write_toml(root, tiny_models)
    out = engine("run", "tiny", "--variant", "A", "--experiments", str(toml), "--runs-dir", str(root / "runs"))
    assert out.returncode == 0, out.stdout + out.stderr
    return {p.name: p.stat().st_size for p in (root / "runs" / "run-00001").iterdir()}


def write_toml(root: Path, tiny_models) -> Path:
    toml = root / "experiments.toml"
    toml.write_text(TINY_TOML.format(model=tiny_models["model"], classifier=tiny_models["classifier"]))
    return toml


def run_a(root: Path, toml: Path, **env) -> subprocess.CompletedProcess:
    return engine("run", "tiny", "--variant", "A", "--experiments", str(toml), "--runs-dir", "runs", cwd=root,
                  env={"PYTHONPATH": str(REPO), **env})


def integrity(db: Path) -> tuple[str, str]:
    with sqlite3.connect(db) as conn:
        check = conn.execute("pragma integrity_check").fetchone()[0]
        version = conn.execute("select value from meta where key = 'schema_version'").fetchone()[0]
    return check, version


def assert_files_whole(folder: Path) -> None:
    """Every file under a final name reads back completely; no temporary is left behind."""
    from PIL import Image
    from safetensors import safe_open

    names = [p.name for p in folder.iterdir()]
    assert not [n for n in names if ".tmp" in n], names
    for path in folder.iterdir():
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="np") as f:
                for key in f.keys():
                    f.get_tensor(key)
        elif path.suffix == ".npz":
            with np.load(path) as data:
                [data[k] for k in data.files]
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.load()


def the_run(runs: Path) -> dict:
    with sqlite3.connect(runs / "qtui.db") as conn:
        conn.row_factory = sqlite3.Row
        return dict(conn.execute("select * from runs where id = 1").fetchone())


def test_no_space_for_the_checkpoint(tmp_path, tiny_models, mounts):
    """The run folder has room for the worker's log but not for weights.safetensors."""
    toml = write_toml(tmp_path, tiny_models)
    folder = tmp_path / "runs" / "run-00001"
    mount_tmpfs(folder, 8 * PAGE)
    mounts.append(folder)
    out = run_a(tmp_path, toml)
    assert out.returncode == 1, out.stdout + out.stderr
    run = the_run(tmp_path / "runs")
    assert run["status"] == "failed"
    assert run["error"] == "no space left on device writing runs/run-00001/weights.safetensors"
    assert "no space left on device writing runs/run-00001/weights.safetensors" in out.stdout
    assert integrity(tmp_path / "runs" / "qtui.db") == ("ok", "2")
    assert not (folder / "weights.safetensors").exists()
    assert_files_whole(folder)


def test_no_space_for_the_samples(tmp_path, tiny_models, mounts, sizes):
    """Room for the log, the checkpoint and eval.npz, not for samples.safetensors: the files
    written before are whole, the samples are absent, no metric is claimed."""
    toml = write_toml(tmp_path, tiny_models)
    folder = tmp_path / "runs" / "run-00001"
    room = pages(sizes["worker.log"]) + pages(sizes["weights.safetensors"]) + pages(sizes["eval.npz"])
    assert pages(sizes["samples.safetensors"]) > PAGE  # else one spare page would hold them
    mount_tmpfs(folder, room + PAGE)
    mounts.append(folder)
    out = run_a(tmp_path, toml)
    assert out.returncode == 1, out.stdout + out.stderr
    run = the_run(tmp_path / "runs")
    assert run["status"] == "failed"
    assert run["error"] == "no space left on device writing runs/run-00001/samples.safetensors"
    assert integrity(tmp_path / "runs" / "qtui.db") == ("ok", "2")
    assert (folder / "weights.safetensors").stat().st_size == sizes["weights.safetensors"]
    assert (folder / "eval.npz").stat().st_size == sizes["eval.npz"]
    assert not (folder / "samples.safetensors").exists()
    assert_files_whole(folder)
    with sqlite3.connect(tmp_path / "runs" / "qtui.db") as conn:
        assert conn.execute("select count(*) from metrics where run_id = 1").fetchone()[0] == 0


def test_a_full_disk_under_the_database(tmp_path, tiny_models, mounts):
    """The whole runs folder is full when the worker starts: it can write neither the database
    nor its log, exits with code 28, and the scheduler keeps it until it can record the
    failure; once space is back the run is failed with "no space left" and the database is
    intact."""
    toml = write_toml(tmp_path, tiny_models)
    runs = tmp_path / "runs"
    mount_tmpfs(runs, 2 * 1024 * 1024)
    mounts.append(runs)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               QTUI_WORKER_COMMAND=json.dumps([sys.executable, str(HERE / "disk_filler_worker.py")]),
               FILLER_MARKER=str(tmp_path / "worker-exited"))
    command = [sys.executable, "-m", "engine.cli", "run", "tiny", "--variant", "A", "--experiments", str(toml),
               "--runs-dir", "runs"]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        log = runs / "scheduler.log"
        deadline = time.time() + 120
        while not (tmp_path / "worker-exited").exists():
            assert time.time() < deadline, read(log)
            assert process.poll() is None, process.communicate()
            time.sleep(0.2)
        assert (tmp_path / "worker-exited").read_text() == "28"
        time.sleep(2)  # the scheduler tries to record it, and cannot
        assert the_run(runs)["status"] in ("queued", "running")  # nobody could write it yet
        (runs / "filler").unlink()  # space comes back
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, stdout + stderr
    run = the_run(runs)
    assert run["status"] == "failed"
    assert run["error"].startswith("no space left on device"), run["error"]
    assert "worker exited with code 28" in run["error"]
    assert integrity(runs / "qtui.db") == ("ok", "2")
    assert "Traceback" not in read(log)
    assert_files_whole(runs / "run-00001")



@pytest.mark.parametrize("limit", [48 * 1024, 400 * 1024])
def test_a_file_size_limit_without_a_mount(tmp_path, tiny_models, limit):
    """Where no tmpfs can be mounted: RLIMIT_FSIZE on the worker makes every write past the
    limit fail (EFBIG), whichever file it is (the reference cache, the checkpoint, the
    database's write-ahead log): the run fails with "no space left (file size limit
    exceeded) writing PATH", and nothing is torn."""
    toml = write_toml(tmp_path, tiny_models)
    worker = json.dumps([sys.executable, str(HERE / "fsize_limit_worker.py")])
    out = run_a(tmp_path, toml, QTUI_WORKER_COMMAND=worker, FSIZE_LIMIT=str(limit))
    assert out.returncode == 1, out.stdout + out.stderr
    runs = tmp_path / "runs"
    run = the_run(runs)
    assert run["status"] == "failed"
    assert run["error"].startswith("no space left (file size limit exceeded) writing runs/"), run["error"]
    assert integrity(runs / "qtui.db") == ("ok", "2")
    for folder in (runs / "run-00001", runs / "cache"):
        if folder.exists():
            assert_files_whole(folder)


def read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# ---------------------------------------------------------------- the pieces, without a mount
class FlakyStore:
    """add_event fails with `error` `fails` times, then works."""

    def __init__(self, error: Exception, fails: int):
        self.error, self.fails, self.events = error, fails, []

    def add_event(self, run_id, stage, done, total, message):
        if self.fails:
            self.fails -= 1
            raise self.error
        self.events.append((stage, done, total))


def test_progress_survives_a_momentarily_unwritable_database(capsys):
    from engine.worker import Reporter

    store = FlakyStore(sqlite3.OperationalError("database or disk is full"), fails=2)
    reporter = Reporter(store, 1, db_interval=0.0)
    for i in range(4):
        reporter.progress("sampling", i, 4)
    assert store.events == [("sampling", 2, 4), ("sampling", 3, 4)]
    out = capsys.readouterr().out
    assert "progress not recorded (database or disk is full); retrying" in out
    assert "progress recorded again" in out


def test_progress_fails_the_run_when_the_database_stays_unwritable():
    from engine.worker import Reporter

    store = FlakyStore(sqlite3.OperationalError("database is locked"), fails=100)
    reporter = Reporter(store, 1, db_interval=0.0, grace=0.05)
    reporter.progress("sampling", 0, 4)
    time.sleep(0.1)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        reporter.progress("sampling", 1, 4)


def test_progress_does_not_hide_a_real_error():
    from engine.worker import Reporter

    reporter = Reporter(FlakyStore(sqlite3.OperationalError("no such table: events"), fails=1), 1)
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        reporter.progress("load", 0, 2)


def test_the_failure_text_of_a_full_disk():
    import errno

    from engine.atomic_files import DiskFull
    from engine.worker import failure_text

    assert failure_text(sqlite3.OperationalError("database or disk is full"), Path("runs/qtui.db")) == \
        "no space left on device writing runs/qtui.db"
    assert failure_text(DiskFull(Path("runs/run-00002/eval.npz"), errno.EFBIG)) == \
        "no space left (file size limit exceeded) writing runs/run-00002/eval.npz"
    assert failure_text(OSError(errno.ENOSPC, "No space left on device")) == \
        "no space left on device: OSError: [Errno 28] No space left on device"
    assert failure_text(ValueError("bad")) == "ValueError: bad"


def test_describe_exit_puts_a_full_disk_first():
    from engine.exit_reason import describe_exit

    tail = "\n".join([
        json.dumps({"event": "progress", "stage": "save", "done": 0, "total": 1}),
        "Traceback (most recent call last):",
        "engine.atomic_files.DiskFull: no space left on device writing runs/run-00003/samples.safetensors",
        json.dumps({"event": "log", "message": "could not record the failure in the database: no space left"}),
        json.dumps({"event": "failed", "error": "no space left on device writing runs/run-00003/samples.safetensors"}),
    ])
    assert describe_exit(28, tail) == ("no space left on device writing runs/run-00003/samples.safetensors "
                                       "(worker exited with code 28 during save 0/1)")
    assert describe_exit(28, "") == "no space left on device (worker exited with code 28; its log could not be written)"
    assert describe_exit(1, "RuntimeError: boom") == "worker exited with code 1: RuntimeError: boom"


def test_the_scheduler_keeps_a_child_it_cannot_record_yet(tmp_path, capsys):
    from engine.executor import RunHandle
    from engine.scheduler import Scheduler
    from engine.store import Store

    store = Store.open(tmp_path / "runs")
    run_id = store.create_run("tiny", "A", {"sampling": {}}, "hash")
    scheduler = Scheduler(store)
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(28)"])
    process.wait()
    scheduler.children[run_id] = RunHandle(run_id, tmp_path / "missing.log", process)
    real, calls = store.finish_if_unfinished, []

    def full_then_fine(*args):
        calls.append(args)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database or disk is full")
        return real(*args)

    store.finish_if_unfinished = full_then_fine
    scheduler.reap()
    assert run_id in scheduler.children and store.get_run(run_id)["status"] == "queued"
    assert "database write failed (database or disk is full); retrying" in capsys.readouterr().out
    scheduler.reap()
    assert run_id not in scheduler.children
    run = store.get_run(run_id)
    assert run["status"] == "failed" and run["error"].startswith("no space left on device")
    store.close()


def test_queueing_on_a_full_disk_says_so(tmp_path, tiny_models, mounts):
    """`engine queue add` when the database cannot grow: one line, exit 2, no run queued, the
    database intact."""
    toml = write_toml(tmp_path, tiny_models)
    runs = tmp_path / "runs"
    mount_tmpfs(runs, 1024 * 1024)
    mounts.append(runs)
    from engine.store import Store

    Store.open(runs).close()
    from tests.disk_filler_worker import fill

    fill(str(runs / "filler"))
    out = engine("queue", "add", "tiny", "--experiments", str(toml), "--runs-dir", "runs", cwd=tmp_path,
                 env={"PYTHONPATH": str(REPO)})
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip() == "error: no space left on device writing runs/qtui.db"
    (runs / "filler").unlink()
    assert integrity(runs / "qtui.db") == ("ok", "2")
    with sqlite3.connect(runs / "qtui.db") as conn:
        assert conn.execute("select count(*) from runs").fetchone()[0] == 0
