"""A runs folder or database this user cannot write: commands that write stop with one line
naming the path (exit 2, nothing created); commands that read still read it.

Permission bits do not stop root, so the commands run as nobody (uid 65534) through setpriv,
keeping only CAP_DAC_READ_SEARCH (reading and path search, never writing) so that the Python
under /root stays reachable. Skipped with the reason where that is not possible."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from engine.store import Store
from tests.conftest import REPO, TINY_TOML

AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]


@pytest.fixture(scope="module")
def nobody():
    if os.geteuid() != 0:
        pytest.skip("needs root to run commands as another user")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    probe = subprocess.run([*AS_NOBODY, sys.executable, "-c", "import os; print(os.getuid())"],
                           capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != "65534":
        pytest.skip(f"cannot run as uid 65534 here: {probe.stderr.strip()[-200:]}")
    return AS_NOBODY


def as_nobody(nobody, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HOME="/tmp", PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    return subprocess.run([*nobody, sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=300)


def engine_as_nobody(nobody, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return as_nobody(nobody, cwd, "-m", "engine.cli", *args)


@pytest.fixture
def project(tiny_models):
    """experiments.toml and a runs folder owned by root with one finished run with metrics, in
    a folder every user can reach (pytest's own are 0700, and SQLite checks a read-only
    shared-memory file with access(2), which ignores CAP_DAC_READ_SEARCH)."""
    tmp_path = Path(tempfile.mkdtemp(prefix="qtui-perm-", dir="/tmp"))
    yield from _project(tmp_path, tiny_models)
    shutil.rmtree(tmp_path, ignore_errors=True)


def _project(tmp_path: Path, tiny_models):
    (tmp_path / "experiments.toml").write_text(
        TINY_TOML.format(model=tiny_models["model"], classifier=tiny_models["classifier"]))
    store = Store.open(tmp_path / "runs")
    run_id = store.create_run("tiny", "A", {"sampling": {"samples": 20, "seed": 0}}, "hash")
    store.put_metrics(run_id, {"fid": 12.5, "prompt_acc": 0.75})
    store.finish(run_id, "done")
    store.close()  # the last connection: the write-ahead log is merged and removed
    os.chmod(tmp_path, 0o755)
    yield tmp_path


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def one_error_line(out: subprocess.CompletedProcess) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


WRITING = [("run", "tiny", "--variant", "A"), ("queue", "add", "tiny"), ("queue", "cancel", "1")]


@pytest.mark.parametrize("command", WRITING, ids=lambda c: " ".join(c[:2]))
def test_writing_commands_on_a_database_without_write_permission(nobody, project, command):
    runs = project / "runs"
    before = snapshot(runs)
    out = engine_as_nobody(nobody, project, *command)
    assert out.returncode == 2, out.stdout + out.stderr
    line = one_error_line(out)
    assert line.startswith("error: runs/qtui.db: cannot write (permission denied); ask its owner"), line
    assert snapshot(runs) == before and sorted(p.name for p in runs.iterdir()) == sorted(before)


def test_a_read_only_runs_folder_with_a_writable_database(nobody, project):
    runs = project / "runs"
    os.chmod(runs / "qtui.db", 0o666)
    before = snapshot(runs)
    out = engine_as_nobody(nobody, project, "run", "tiny", "--variant", "A")
    assert out.returncode == 2, out.stdout + out.stderr
    assert one_error_line(out).startswith("error: runs: cannot write (permission denied): run folders and "
                                          "SQLite's qtui.db-wal are created there; ask its owner")
    assert snapshot(runs) == before


def test_a_runs_folder_that_cannot_be_created(nobody, project):
    out = engine_as_nobody(nobody, project, "run", "tiny", "--variant", "A", "--runs-dir", "new/runs")
    assert out.returncode == 2, out.stdout + out.stderr
    assert one_error_line(out).startswith("error: new/runs: cannot create (permission denied in .); ")
    assert not (project / "new").exists()


def test_a_writable_folder_but_a_read_only_database(nobody, project):
    runs = project / "runs"
    os.chmod(runs, 0o777)
    out = engine_as_nobody(nobody, project, "queue", "cancel", "1")
    assert out.returncode == 2
    assert one_error_line(out).startswith("error: runs/qtui.db: cannot write (permission denied)")
    assert sorted(p.name for p in runs.iterdir()) == ["qtui.db"]


def test_reading_commands_read_it_read_only(nobody, project):
    runs = project / "runs"
    before = snapshot(runs)
    out = engine_as_nobody(nobody, project, "export", "--format", "csv")
    assert out.returncode == 0, out.stderr
    assert "12.5" in out.stdout and "0.75" in out.stdout
    assert out.stderr.strip() == "note: runs/qtui.db: cannot write (permission denied): reading it read-only"
    out = engine_as_nobody(nobody, project, "list")
    assert out.returncode == 0, out.stderr
    assert "1 done" in out.stdout
    out = engine_as_nobody(nobody, project, "queue")
    assert out.returncode == 0, out.stderr
    assert "schedulers: none" in out.stdout
    assert snapshot(runs) == before  # nothing written, no -wal or -shm created


def test_reading_a_live_database_with_its_write_ahead_log(nobody, project):
    """A writer (root) holds the database open with changes still in qtui.db-wal: a reader
    without write permission sees them (SQLite's read-only shared memory)."""
    store = Store.open(project / "runs")
    store.put_metrics(1, {"fid": 99.25})
    try:
        assert (project / "runs" / "qtui.db-wal").stat().st_size > 0
        out = engine_as_nobody(nobody, project, "export", "--format", "csv")
        assert out.returncode == 0, out.stderr
        assert "99.25" in out.stdout
    finally:
        store.close()
    with sqlite3.connect(project / "runs" / "qtui.db") as conn:
        assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"


def test_qtui_on_a_database_it_cannot_write_exits_2(nobody, project):
    out = as_nobody(nobody, project, "-m", "qtui.app")
    assert out.returncode == 2, out.stdout + out.stderr
    line = one_error_line(out)
    assert line.startswith("qtui: runs/qtui.db: cannot write (permission denied); ask its owner"), line
    assert line.endswith("(`engine list`, `show` and `export` can read it)")
