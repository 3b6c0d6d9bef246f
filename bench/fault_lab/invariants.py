"""What must hold after every trial of the fault campaign, checked on the database itself.

- `PRAGMA integrity_check` is ok and the schema version is the engine's;
- every run is in a known state, and once the fault is over (the trial has settled) none is
  queued or running with nothing behind it: a run still `running` must have a live worker, or
  be what qtui shows as lost;
- every metric committed before the fault is still there with the same value (the campaign
  snapshots the metrics table just before it strikes);
- a `done` run has every metric, layer and artifact kind of an undisturbed run of its variant,
  and its artifact files exist;
- (`rerun_problems`) re-running the failed and cancelled runs gives the undisturbed numbers.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from bench.fault_lab.lab import Lab, stable
from engine.executor import display_status, pid_alive
from engine.store import SCHEMA_VERSION, STATUSES


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    lost_metrics: int = 0
    integrity: bool = True

    def add(self, other: "Verdict") -> None:
        self.problems += other.problems
        self.lost_metrics += other.lost_metrics
        self.integrity = self.integrity and other.integrity


def same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or (math.isnan(a) and math.isnan(b))


def check_database(lab: Lab, runs: Path, before: dict[tuple[int, str], float] | None = None,
                   settled: bool = True) -> Verdict:
    verdict = Verdict()
    path = runs / "qtui.db"
    if not path.exists():
        return verdict
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
    try:
        try:
            result = [r[0] for r in conn.execute("pragma integrity_check").fetchall()]
        except sqlite3.DatabaseError as exc:  # too damaged to even check
            result = [str(exc)]
        if result != ["ok"]:
            verdict.integrity = False
            verdict.problems.append(f"integrity_check: {'; '.join(result[:3])}")
            return verdict
        version = conn.execute("select value from meta where key = 'schema_version'").fetchone()
        if version is None or int(version[0]) != SCHEMA_VERSION:
            verdict.integrity = False
            verdict.problems.append(f"schema version {version and version[0]}, expected {SCHEMA_VERSION}")
    finally:
        conn.close()

    for run in lab.runs(runs):
        name = f"run {run['id']} ({run['variant']})"
        status = run["status"]
        if status not in STATUSES:
            verdict.problems.append(f"{name}: unknown status {status!r}")
        if settled and status == "queued":
            verdict.problems.append(f"{name}: still queued after the fault")
        if settled and status == "running" and pid_alive(run.get("pid")):
            verdict.problems.append(f"{name}: still running after the fault (pid {run['pid']})")
        if status == "running" and not pid_alive(run.get("pid")) and display_status(run) != "lost":
            verdict.problems.append(f"{name}: running with no process and not shown as lost")
        if settled and status == "running" and display_status(run) == "lost":
            verdict.problems.append(f"{name}: left running (shown as lost) while a scheduler was there to reap it")
        if status == "done":
            verdict.problems += done_run_problems(lab, runs, run)

    now = lab.metrics(runs)
    for key, value in (before or {}).items():
        if key not in now:
            verdict.lost_metrics += 1
            verdict.problems.append(f"run {key[0]}: metric {key[1]} committed before the fault is gone")
        elif not same(now[key], value):
            verdict.lost_metrics += 1
            verdict.problems.append(f"run {key[0]}: metric {key[1]} changed from {value} to {now[key]}")
    return verdict


def done_run_problems(lab: Lab, runs: Path, run: dict) -> list[str]:
    baseline = lab.baselines.get(run["variant"])
    if baseline is None:
        return []
    have = lab.describe_run(runs, run["id"])
    name = f"run {run['id']} ({run['variant']}, done)"
    problems = []
    missing = sorted(set(baseline["metrics"]) - set(have["metrics"]))
    if not any(r["variant"] == "fp" and r["status"] == "done" for r in lab.runs(runs)):
        missing = [m for m in missing if not m.startswith("d_")]  # paired: no reference run here
    if missing:
        problems.append(f"{name}: metrics missing: {', '.join(missing[:5])}")
    if have["layers"] != baseline["layers"]:
        problems.append(f"{name}: {have['layers']} layers, an undisturbed run has {baseline['layers']}")
    kinds = sorted(set(baseline["kinds"]) - set(have["kinds"]))
    if kinds:
        problems.append(f"{name}: artifacts missing: {', '.join(kinds)}")
    for row in lab.query(runs, "select path from artifacts where run_id = ?", (run["id"],)):
        file = Path(row["path"]) if Path(row["path"]).is_absolute() else runs / row["path"]
        if not file.exists():
            problems.append(f"{name}: artifact file {row['path']} does not exist")
    return problems


def numbers_problems(lab: Lab, runs: Path, run_id: int, paired: bool = True) -> list[str]:
    """A finished run's stable metrics against the undisturbed run of its variant (without the
    paired differences `d_*` unless `paired`: they need the reference run in the same folder)."""
    run = lab.query(runs, "select * from runs where id = ?", (run_id,))[0]
    name = f"run {run_id} ({run['variant']})"
    if run["status"] != "done":
        return [f"{name}: {run['status']}: {run['error']}"]
    baseline = stable(lab.baselines[run["variant"]]["metrics"])
    have = stable(lab.describe_run(runs, run_id)["metrics"])
    differ = [k for k in baseline if (paired or not k.startswith("d_")) and not same(have.get(k), baseline[k])]
    if differ:
        k = differ[0]
        return [f"{name}: {len(differ)} metrics differ from an undisturbed run, e.g. {k}: "
                f"{have.get(k)} vs {baseline[k]}"]
    return []


def rerun_problems(lab: Lab, runs: Path, run_ids: list[int], timeout: float = 300) -> list[str]:
    """`engine rerun` the runs; each re-run must give the numbers of an undisturbed run."""
    if not run_ids:
        return []
    before = {r["id"] for r in lab.runs(runs)}
    process = lab.engine(runs, "rerun", *map(str, run_ids))
    code = process.wait(timeout)
    if code is None:
        process.kill_group()
        return [f"engine rerun {run_ids} did not finish in {timeout:.0f} s"]
    new = [r["id"] for r in lab.runs(runs) if r["id"] not in before]
    problems = [] if code == 0 else [f"engine rerun exited {code}: {process.text()[-300:]!r}"]
    for run_id in new:
        problems += numbers_problems(lab, runs, run_id)
    if len(new) != len(run_ids):
        problems.append(f"engine rerun of {len(run_ids)} runs created {len(new)}")
    return problems
