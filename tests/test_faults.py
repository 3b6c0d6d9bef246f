"""The fault campaign (bench/faults.py): its invariant checks catch what they are for, and the
short campaign passes end to end (kills, a held lock, load, simultaneous starts, a full disk,
read-only folders and damaged files on a tiny real experiment)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.fault_lab.invariants import check_database  # noqa: E402
from bench.fault_lab.lab import Lab  # noqa: E402


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def small_db(tmp_path):
    from engine.store import Store

    runs = tmp_path / "runs"
    store = Store.open(runs)
    done = store.create_run("e", "v", {"sampling": {}}, "h")
    store.mark_running(done)
    store.put_metrics(done, {"fid": 1.5, "kid": 0.25})
    store.finish(done, "done")
    return store, runs, done


def test_the_checks_pass_on_an_intact_database(small_db):
    store, runs, _ = small_db
    lab = Lab(runs.parent)
    verdict = check_database(lab, runs, lab.metrics(runs))
    assert verdict.problems == [] and verdict.integrity and verdict.lost_metrics == 0


def test_a_lost_metric_and_a_changed_one_are_counted(small_db):
    store, runs, done = small_db
    lab = Lab(runs.parent)
    before = lab.metrics(runs)
    with store.db.conn:
        store.db.conn.execute("delete from metrics where run_id = ? and name = 'fid'", (done,))
        store.db.conn.execute("update metrics set value = 0.5 where run_id = ? and name = 'kid'", (done,))
    verdict = check_database(lab, runs, before)
    assert verdict.lost_metrics == 2
    assert any("fid committed before the fault is gone" in p for p in verdict.problems)
    assert any("kid changed from 0.25 to 0.5" in p for p in verdict.problems)


def test_a_run_left_running_with_no_process_is_a_problem(small_db):
    store, runs, _ = small_db
    lab = Lab(runs.parent)
    stuck = store.create_run("e", "v", {"sampling": {}}, "h")
    store.mark_running(stuck, pid=dead_pid())
    problems = check_database(lab, runs).problems
    assert any(f"run {stuck}" in p and "lost" in p for p in problems)


def test_a_damaged_database_fails_the_integrity_check(small_db):
    store, runs, done = small_db
    store.put_metrics(done, {f"m{i}": float(i) for i in range(3000)})  # several pages of b-tree
    store.close()  # the last connection checkpoints the WAL into the file
    path = runs / "qtui.db"
    data = bytearray(path.read_bytes())
    third = len(data) // 3
    data[third: 2 * third] = os.urandom(third)
    path.write_bytes(bytes(data))
    verdict = check_database(Lab(runs.parent), runs)
    assert not verdict.integrity and verdict.problems[0].startswith("integrity_check")


def test_the_short_campaign_survives_every_fault(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(REPO / "bench" / "faults.py"), "--quick", "--seed", "1",
                           "--keep", str(tmp_path / "lab")], capture_output=True, text=True, timeout=900, env=env)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    match = re.fullmatch(r"faults: (\d+) trials, (\d+) survived, lost metrics 0, integrity ok", last)
    assert match and match.group(1) == match.group(2) and int(match.group(1)) >= 6, last


def test_engine_rerun_refuses_unknown_and_unfinished_runs(small_db, capsys):
    from engine.cli import main as engine_main

    store, runs, done = small_db
    waiting = store.create_run("e", "v", {"sampling": {}}, "h")
    store.close()
    args = ["--runs-dir", str(runs), "--experiments", str(runs / "none.toml")]
    assert engine_main(["rerun", "999", *args]) == 2
    assert "no run 999" in capsys.readouterr().err
    assert engine_main(["rerun", str(waiting), *args]) == 2
    assert f"run {waiting} is queued: nothing to re-run yet" in capsys.readouterr().err
