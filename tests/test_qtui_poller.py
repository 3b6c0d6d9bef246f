"""The poller: incremental snapshots of the engine's database, lost runs, database errors."""

from __future__ import annotations

import sqlite3
import subprocess
import time
import sys

from engine.executor import is_lost
from engine.store import Store
from qtui.poller import Poller
from qtui_helpers import add_run, fill_demo


def test_missing_database_is_reported_once_then_loaded(tmp_path):
    poller = Poller(tmp_path / "runs")
    snap = poller.poll()
    assert snap.error and "no database" in snap.error
    assert poller.poll() is None  # same problem: nothing new to say
    fill_demo(tmp_path / "runs", with_images=False)
    snap = poller.poll()
    assert snap.reset and snap.error == "" and len(snap.runs) == 7
    assert len(poller.poll().runs) == 5  # the metrics of the five runs that have some
    assert poller.poll() is None


def test_a_full_load_shows_runs_first_and_their_metrics_next(tmp_path):
    runs = tmp_path / "runs"
    ids = fill_demo(runs, with_images=False)
    poller = Poller(runs)
    first = poller.poll()
    assert first.reset and {r.id for r in first.runs} == set(ids.values())
    assert all(r.metrics == {} for r in first.runs)
    assert {r.id: r.status for r in first.runs}[ids["failed"]] == "failed"
    second = poller.poll()
    assert not second.reset
    by_id = {r.id: r for r in second.runs}
    assert set(by_id) == {ids[k] for k in ("fp32", "w8", "w4", "w2", "mixed-a")}
    assert by_id[ids["w4"]].metrics["fid"] == 4.85 and by_id[ids["w4"]].status == "done"
    assert poller.poll() is None


def test_incremental_changes(tmp_path):
    runs = tmp_path / "runs"
    ids = fill_demo(runs, with_images=False)
    poller = Poller(runs)
    poller.poll()
    poller.poll()

    store = Store.open(runs)
    new = add_run(store, "digits-rtn", "w4", status="queued")
    snap = poller.poll()
    assert not snap.reset and [r.id for r in snap.runs] == [new]

    store.mark_running(new, pid=999_999_999)
    store.add_event(new, "sampling", 10, 40)
    snap = poller.poll()
    assert [r.status for r in snap.runs] == ["running"]
    assert snap.progress[new].done == 10 and snap.progress[new].stage_start_done == 10

    store.add_event(new, "sampling", 30, 40)
    snap = poller.poll()
    assert snap.runs == [] and snap.progress[new].done == 30

    store.put_metrics(ids["fp32"], {"clip_score": 0.5})  # a finished run gains a metric
    snap = poller.poll()
    assert [r.id for r in snap.runs] == [ids["fp32"]] and snap.runs[0].metrics["clip_score"] == 0.5
    store.put_metrics(ids["w8"], {"fid_floor": 1.25})  # or has one rewritten
    snap = poller.poll()
    assert [r.id for r in snap.runs] == [ids["w8"]] and snap.runs[0].metrics["fid_floor"] == 1.25

    store.finish(new, "done")
    snap = poller.poll()
    assert [(r.id, r.status) for r in snap.runs] == [(new, "done")] and snap.progress == {}

    with store.db.conn:
        store.db.conn.execute("delete from runs where id = ?", [ids["mixed-b"]])
    snap = poller.poll()
    assert snap.reset and ids["mixed-b"] not in {r.id for r in snap.runs}
    assert len(poller.poll().runs) == 5  # metrics of the runs that have some
    add_run(store, "digits-rtn", "w8", status="queued")
    assert not poller.poll().reset  # the state was rebuilt: no spurious reload
    store.close()


def test_running_run_with_dead_process_is_lost(tmp_path):
    runs = tmp_path / "runs"
    store = Store.open(runs)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_id = add_run(store, "e", "v", status="running", pid=dead.pid)
    store.db["runs"].update(run_id, {"host": __import__("socket").gethostname()})
    store.db.conn.commit()
    poller = Poller(runs)
    assert poller.poll().runs[0].status == "running"  # lost check not loaded yet
    assert poller.poll().runs == []  # no metrics to fill in
    poller.is_lost = is_lost
    poller.lost_confirm = 0.3  # a run must look lost that long (its scheduler records a death first)
    assert poller.poll() is None  # looks lost: not shown yet
    time.sleep(0.35)
    snap = poller.poll()
    assert [(r.id, r.status) for r in snap.runs] == [(run_id, "lost")]
    assert poller.poll() is None
    store.close()


def test_locked_and_corrupt_databases_are_errors_not_crashes(tmp_path):
    runs = tmp_path / "runs"
    fill_demo(runs, with_images=False)
    locker = sqlite3.connect(runs / "qtui.db", isolation_level=None)
    locker.execute("pragma locking_mode = exclusive")
    locker.execute("begin exclusive")
    locker.execute("update runs set variant = variant")
    poller = Poller(runs, timeout=0.1)
    snap = poller.poll()
    assert snap.error and "locked" in snap.error
    locker.execute("commit")
    locker.close()
    snap = poller.poll()
    assert snap.reset and snap.error == "" and len(snap.runs) == 7

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "qtui.db").write_bytes(b"this is not sqlite" * 100)
    snap = Poller(bad).poll()
    assert snap.error and "not a database" in snap.error
