"""SIGKILL in the middle of a multi-statement write: a process repeating the store's
multi-statement operations (bench/fault_lab/atomic_victim.py) is killed either inside one of
them (it stops before a seeded write statement, after at least one write of that operation) or
at a seeded random moment.

Invariant: each operation is all or nothing. Every batch of runs is whole; no run is queued
without its folder; a run's heartbeat is its last event's time; a run's metrics and layers are
all from one call; a remote run's ingested offset covers exactly the lines applied, and its
last event and metric come from the same pair of lines; a submission's job ids are all from one
submission. And the database is intact, and the next writer gets the lock at once.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from bench.fault_lab.atomic_victim import BATCH, LAYERS, METRICS, setup
from bench.fault_lab.invariants import Verdict, check_database
from bench.fault_lab.lab import Lab, environment
from bench.fault_lab.signals import Outcome
from engine.store import Store


def problems_after(runs: Path, ctx: dict) -> list[str]:
    conn = sqlite3.connect(f"{(runs / 'qtui.db').resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    one = lambda sql, *args: conn.execute(sql, args).fetchone()  # noqa: E731
    out = []
    try:
        for batch, n in conn.execute("select batch, count(*) from runs where experiment = 'atomic' and "
                                     "variant != 'target' group by batch"):
            if n != BATCH:
                out.append(f"create_runs: batch {batch} has {n} of its {BATCH} runs")
        half = one("select count(*) from runs where folder is null or queue_pos is null")[0]
        if half:
            out.append(f"create_run: {half} runs without their folder or queue position")
        beat, last = one("select heartbeat_at, (select time from events where run_id = runs.id order by id desc "
                         "limit 1) from runs where id = ?", ctx["event"])
        if beat != last:
            out.append(f"add_event: heartbeat {beat} but last event at {last}")
        n, distinct = one("select count(*), count(distinct value) from metrics where run_id = ?", ctx["results"])
        if n not in (0, METRICS) or distinct > 1:
            out.append(f"put_metrics: {n} metrics with {distinct} values")
        n, distinct = one("select count(*), count(distinct params) from layers where run_id = ?", ctx["results"])
        if n not in (0, LAYERS) or distinct > 1:
            out.append(f"put_layers: {n} layers with {distinct} values")
        out += ingest_problems(conn, ctx)
        ids = ",".join(map(str, ctx["submitted"]))
        n, distinct = one(f"select count(job_id), count(distinct substr(job_id, 1, instr(job_id, '_') - 1)) "
                          f"from runs where id in ({ids})")
        if n not in (0, len(ctx["submitted"])) or distinct > 1:
            out.append(f"record_submission: {n} job ids from {distinct} submissions")
    finally:
        conn.close()
    return out


def ingest_problems(conn, ctx: dict) -> list[str]:
    offset = conn.execute("select coalesce(ingested, 0) from runs where id = ?", (ctx["remote"],)).fetchone()[0]
    path = Path(ctx["events"])
    data = path.read_bytes()[:offset] if path.exists() else b""
    lines = [json.loads(line) for line in data.splitlines()]
    expected = [line["done"] for line in lines if line["op"] == "event"]
    applied = [r[0] for r in conn.execute("select done from events where run_id = ? order by id", (ctx["remote"],))]
    metric = conn.execute("select value from metrics where run_id = ? and name = 'remote'", (ctx["remote"],)).fetchone()
    out = []
    if applied != expected:
        out.append(f"ingest: offset {offset} covers events {expected[-3:]}, applied {applied[-3:]} "
                   f"({len(expected)} vs {len(applied)})")
    if (metric[0] if metric else None) != (float(expected[-1]) if expected else None):
        out.append(f"ingest: last event {expected[-1:] } but metric {metric}")
    return out


def atomic_trial(lab: Lab, rng: random.Random, mode: str) -> Outcome:
    runs = lab.folder / "atomic-runs"
    shutil.rmtree(runs, ignore_errors=True)
    store = Store.open(runs)
    ctx = setup(store)
    store.close()
    seed = rng.randrange(2**31)
    command = [sys.executable, "-m", "bench.fault_lab.atomic_victim", "--runs-dir", str(runs), "--seed", str(seed),
               "--ctx", json.dumps(ctx)]
    if mode == "inside":
        command += ["--pause-at", str(rng.randint(1, 150))]
    verdict = Verdict()
    victim = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=lab.folder, env=environment(), start_new_session=True)
    try:
        if victim.stdout.readline().strip() != "ready":
            victim.kill()
            verdict.problems.append(f"the victim did not start: {victim.communicate()[0][-300:]!r}")
            return Outcome("atomic", f"SIGKILL {mode} an operation", verdict)
        if mode == "inside":
            where = victim.stdout.readline().strip()  # "paused before write K of OP"
        else:
            time.sleep(rng.uniform(0.2, 2.0))
            where = "at a random moment"
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait(10)
    detail = f"SIGKILL {where}, victim seed {seed}"
    verdict.add(check_database(lab, runs, settled=False))
    verdict.problems += problems_after(runs, ctx)
    store = Store.open(runs)  # the dead writer's transaction is gone: the next one writes at once
    store.db.conn.execute("PRAGMA busy_timeout = 2000")
    try:
        store.add_event(ctx["event"], "after", 1, 1)
    except sqlite3.OperationalError as exc:
        verdict.problems.append(f"a write after the kill failed: {exc}")
    finally:
        store.close()
    return Outcome("atomic", detail, verdict)


def atomic_trials(lab: Lab, rng: random.Random, rounds: int, quick: bool):
    modes = ["inside", "random"] if quick else ["inside", "inside", "random"] * 3 * rounds
    for mode in modes:
        yield atomic_trial(lab, rng, mode)
