"""The process the atomic trial kills: repeats the store's multi-statement writes (a batch of
runs, a progress event, metrics, layers, a remote run's ingest, a Slurm submission's job ids)
through the engine's own code, in a seeded order. With --pause-at N it stops for good inside the
operation that makes its N-th write statement, after at least one of that operation's writes
(and says "paused" on stdout), so the campaign kills it in the middle of a transaction.

    python -m bench.fault_lab.atomic_victim --runs-dir D --seed S [--pause-at N]
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import time
from pathlib import Path

from engine.store import Store

WRITES = ("insert", "update", "delete", "replace", "alter", "create", "drop")
BATCH = 6  # runs per batch: 3 variants x 2 seeds
METRICS, LAYERS, SUBMITTED = 10, 12, 3


class PausingConnection:
    """A sqlite3 connection that blocks for good before a chosen write statement."""

    def __init__(self, conn: sqlite3.Connection, pause_at: int | None):
        self._conn, self.pause_at, self.writes, self.in_op = conn, pause_at, 0, 0

    def _count(self, sql: str) -> None:
        if sql.lstrip().split(None, 1)[0].lower() not in WRITES:
            return
        self.writes += 1
        if self.pause_at is not None and self.writes >= self.pause_at and self.in_op >= 1:
            print(f"paused before write {self.in_op + 1} of {self.op}", flush=True)
            while True:
                time.sleep(60)
        self.in_op += 1

    def begin(self, op: str) -> None:
        self.op, self.in_op = op, 0

    def execute(self, sql, *args):
        self._count(sql)
        return self._conn.execute(sql, *args)

    def executemany(self, sql, *args):
        self._count(sql)
        return self._conn.executemany(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def experiment():
    from engine.config import Experiment, Variant

    return Experiment(name="atomic", description="", model="m", model_path=Path("m"), feature_model="f",
                      feature_model_path=Path("f"), samples=4, steps=2, guidance=1.0, seed=0, batch_size=2,
                      bootstrap=2, variants={v: Variant(v, "", "none", {}) for v in "abc"}, seeds=(0, 1))


def setup(store: Store) -> dict:
    """The runs the operations write to (created before the fault, by the trial)."""
    ids = [store.create_run("atomic", "target", {}, "h", executor="slurm", batch="target") for _ in range(4)]
    folder = store.run_folder(ids[1])
    folder.mkdir(parents=True, exist_ok=True)
    return {"event": ids[0], "remote": ids[1], "results": ids[2], "submitted": ids[2:], "events": str(folder / "events.jsonl")}


def operations(store: Store, ctx: dict):
    from engine.queue_store import record_submission
    from engine.run_files import ingest
    from engine.runner import create_runs

    def remote(i):
        now = time.time()
        with open(ctx["events"], "a") as f:
            f.write(json.dumps({"op": "event", "time": now, "stage": "remote", "done": i, "total": 0}) + "\n")
            f.write(json.dumps({"op": "metrics", "time": now, "metrics": {"remote": i}}) + "\n")
        ingest(store, ctx["remote"])

    return {
        "create_runs": lambda i: create_runs(store, experiment(), ["a", "b", "c"], 4),
        "add_event": lambda i: store.add_event(ctx["event"], "sampling", i, 1000),
        "put_metrics": lambda i: store.put_metrics(ctx["results"], {f"m{k}": float(i) for k in range(METRICS)}),
        "put_layers": lambda i: store.put_layers(ctx["results"], [{"name": f"l{k}", "role": "conv", "params": i}
                                                                   for k in range(LAYERS)]),
        "ingest": remote,
        "record_submission": lambda i: record_submission(store, [{"id": r} for r in ctx["submitted"]],
                                                         [f"{i}_{k}" for k in range(len(ctx["submitted"]))]),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs-dir", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--pause-at", type=int)
    parser.add_argument("--ctx", required=True, help="JSON of `setup`")
    args = parser.parse_args()
    store = Store.open(args.runs_dir, create=False)
    ctx = json.loads(args.ctx)
    ops = operations(store, ctx)
    conn = PausingConnection(store.db.conn, args.pause_at)
    store.db.conn = conn
    rng = random.Random(args.seed)
    print("ready", flush=True)
    for i in range(1, 10**9):
        name = rng.choice(sorted(ops))
        conn.begin(name)
        ops[name](i)
    return 0


if __name__ == "__main__":
    sys.exit(main())
