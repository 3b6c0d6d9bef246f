"""The SQLite store: schema, WAL, run life cycle, results, and concurrent writers."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest

from engine.store import SCHEMA_VERSION, Store


def test_schema_and_wal(tmp_path):
    store = Store.open(tmp_path)
    assert store.schema_version() == SCHEMA_VERSION
    assert store.db.execute("pragma journal_mode").fetchone()[0] == "wal"
    assert {"runs", "metrics", "layers", "artifacts", "events", "meta"} <= set(store.db.table_names())


def test_refuses_a_newer_schema(tmp_path):
    Store.open(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "qtui.db")
    conn.execute("update meta set value = ? where key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    conn.commit()
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        Store.open(tmp_path)


def test_run_life_cycle_and_results(tmp_path):
    store = Store.open(tmp_path)
    run_id = store.create_run("exp", "A", {"b": 1}, "hash1", git_commit="abc", versions={"torch": "x"})
    run = store.get_run(run_id)
    assert run["status"] == "queued" and run["folder"] == f"run-{run_id:05d}" and run["config_hash"] == "hash1"
    store.mark_running(run_id, pid=123)
    assert store.get_run(run_id)["status"] == "running"
    store.add_event(run_id, "sampling", 5, 10)
    assert store.last_event(run_id)["done"] == 5
    store.put_metrics(run_id, {"fid": 3.5, "prompt_acc": 0.9})
    store.put_metrics(run_id, {"fid": 3.0})  # upsert replaces
    store.put_layers(run_id, [{"name": "a", "role": "conv", "params": 10, "bits": 4, "weight_err": 0.1},
                              {"name": "b", "role": "attention", "params": 5, "bits": None, "weight_err": None}])
    store.finish(run_id, "done")
    assert not store.finish_if_unfinished(run_id, "failed", "late")  # a finished run stays finished
    [row] = store.results("exp")
    assert row["fid"] == 3.0 and row["prompt_acc"] == 0.9 and row["status"] == "done"
    assert [l["name"] for l in store.layers(run_id)] == ["a", "b"]
    with pytest.raises(ValueError):
        store.finish(run_id, "running")


def _writer(path, n):
    store = Store.open(path)
    for i in range(n):
        run_id = store.create_run("exp", f"v{i}", {}, "h")
        store.add_event(run_id, "sampling", i, n)
        store.put_metrics(run_id, {"fid": float(i)})


def test_two_writer_processes(tmp_path):
    Store.open(tmp_path).close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(tmp_path, 50)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = Store.open(tmp_path)
    assert len(store.runs()) == 100 and len(store.results()) == 100


def test_open_waits_for_a_writer_while_switching_to_wal(tmp_path):
    """A new database held by another process's write transaction (rollback journal, as a
    database is before it is switched to WAL): `PRAGMA journal_mode=wal` fails at once with
    "database is locked" whatever the busy timeout; Store.open must wait and succeed."""
    import subprocess
    import sys

    path = tmp_path / "qtui.db"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys, time\n"
         "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
         "c.execute('create table x(a)'); c.execute('BEGIN IMMEDIATE'); c.execute('insert into x values (1)')\n"
         "print('held', flush=True); time.sleep(1.5); c.execute('COMMIT')\n",
         str(path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        store = Store.open(tmp_path)
        assert store.schema_version() == SCHEMA_VERSION
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        store.close()
    finally:
        holder.wait(timeout=10)


def test_engines_started_together_all_open_a_new_database(tmp_path):
    import subprocess
    import sys
    import time

    start = time.time() + 1.0
    code = ("import sys, time\n"
            "while time.time() < float(sys.argv[2]): pass\n"
            "from engine.store import Store\n"
            "s = Store.open(sys.argv[1]); s.create_run('e', 'v', {}, 'h'); s.close()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(start)], stderr=subprocess.PIPE,
                              text=True) for _ in range(6)]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, errors
    store = Store.open(tmp_path)
    assert len(store.runs()) == 6
    store.close()
