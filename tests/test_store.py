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
