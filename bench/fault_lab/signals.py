"""Signal faults: SIGKILL, SIGTERM and SIGHUP of a worker at a random moment of a chosen stage,
and of `engine run`, the queue scheduler and qtui while a run is going.

What each should do (and the trial checks):
- worker: SIGKILL -> the run is failed, "killed by SIGKILL"; SIGTERM -> cancelled; SIGHUP ->
  ignored, the run finishes with the undisturbed numbers. A run queued behind it goes on.
- `engine run`: only the display goes (SIGHUP goes to its whole session, as when an SSH
  connection drops); the scheduler and workers finish every run.
- scheduler: its workers go on and record their own results; SIGKILL or SIGTERM -> `engine run`
  (still watching) starts another scheduler for the queued runs; SIGHUP is ignored.
- scheduler, then its worker (SIGKILL both): no one reaps the worker; the next scheduler
  (started by `engine run` for the queued run) fails the run: its worker vanished.
- qtui: it only reads (and its launcher thread writes whole transactions); nothing is lost.
Failed and cancelled runs are then re-run (`engine rerun`) and must give the undisturbed numbers.
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from bench.fault_lab.invariants import Verdict, check_database, numbers_problems, rerun_problems
from bench.fault_lab.lab import STAGES, Lab
from engine.executor import pid_alive

SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGHUP": signal.SIGHUP}
TARGETS = ("worker", "engine-run", "scheduler", "qtui", "scheduler+worker")


@dataclass
class Outcome:
    fault: str
    detail: str
    verdict: Verdict
    missed: bool = False  # the fault came too late (the process had already ended)


def new_run_ids(lab: Lab, runs: Path, before: set[int]) -> list[int]:
    return [r["id"] for r in lab.runs(runs) if r["id"] not in before]


def wait_for_stage(lab: Lab, runs: Path, run_id: int, stage: str, timeout: float = 120) -> bool:
    """Until the run's worker reports `stage`; False when it has gone past it unseen."""
    def reached():
        stages = [r["stage"] for r in lab.query(runs, "select stage from events where run_id = ? order by id",
                                                (run_id,))]
        if stages and stages[-1] == stage:
            return "at"
        status = lab.query(runs, "select status from runs where id = ?", (run_id,))[0]["status"]
        if stage in stages or status in ("done", "failed", "cancelled"):
            return "past"
        return None

    return lab.wait_for(reached, timeout, every=0.02) == "at"


def signal_trial(lab: Lab, runs: Path, rng: random.Random, target: str, name: str, stage: str) -> Outcome:
    sig = SIGNALS[name]
    variant = lab.stage_variant(stage) if target == "worker" else "rtn"
    before = {r["id"] for r in lab.runs(runs)}
    engine_run = lab.engine_run(runs, [variant, "fp"])
    qtui = lab.start_qtui(runs, runs.parent / f"qtui-{time.time_ns()}.out") if target == "qtui" else None
    detail = f"{target} {name}"
    verdict = Verdict()
    try:
        ids = lab.wait_for(lambda: new_run_ids(lab, runs, before) if len(new_run_ids(lab, runs, before)) == 2 else None, 60)
        if not ids:
            verdict.problems.append(f"{detail}: engine run queued no runs: {engine_run.text()[-300:]!r}")
            return Outcome("signal", detail, verdict)
        victim = ids[0]
        at = wait_for_stage(lab, runs, victim, stage)
        span = lab.baselines[variant]["stages"].get(stage, 0.0)
        time.sleep(rng.uniform(0, 0.9 * span))
        snapshot = lab.metrics(runs)
        struck = lab.last_stage(runs, victim) if at else "after " + stage
        pid = target_pid(lab, runs, target, victim, engine_run, qtui)
        detail = f"{target} {name} during {struck}"
        if pid is None:
            verdict.problems.append(f"{detail}: no {target} process to signal")
            return Outcome("signal", detail, verdict)
        missed = not pid_alive(pid)
        if missed:
            detail += " (missed: the process had ended)"
        if target in ("engine-run", "qtui") and sig == signal.SIGHUP:
            os.killpg(pid, sig)  # the terminal's session is gone: every process in it hears it
        else:
            os.kill(pid, sig)
        if target == "scheduler+worker":  # then its worker, with nobody left to reap it
            time.sleep(0.05)
            worker = lab.query(runs, "select pid from runs where id = ?", (victim,))[0]["pid"]
            if not pid_alive(worker):
                missed = True
                detail += " (missed: the worker had ended)"
            else:
                os.kill(worker, signal.SIGKILL)
        if target == "engine-run":
            engine_run.wait(10)
        else:
            engine_run.wait(240)
        if not lab.settle(runs, 240):
            verdict.problems.append(f"{detail}: runs still unfinished 240 s after the fault")
        verdict.add(check_database(lab, runs, snapshot))
        verdict.problems += expected_outcome(lab, runs, target, name, victim, ids[1])
        end = lab.query(runs, "select status, error from runs where id = ?", (victim,))[0]
        detail += f": {end['status']}" + (f" ({end['error'][:60]})" if end["error"] else "")
        rerun = [i for i in ids if lab.query(runs, "select status from runs where id = ?", (i,))[0]["status"]
                 in ("failed", "cancelled")]
        verdict.problems += rerun_problems(lab, runs, rerun)
        if qtui is not None and name != "SIGKILL" and qtui.wait(15) is None:
            verdict.problems.append(f"{detail}: qtui still running 15 s after {name}")
        return Outcome("signal", detail, verdict, missed)
    finally:
        lab.cleanup()


def target_pid(lab: Lab, runs: Path, target: str, victim: int, engine_run, qtui) -> int | None:
    if target == "worker":
        return lab.query(runs, "select pid from runs where id = ?", (victim,))[0]["pid"]
    if target == "scheduler+worker":
        target = "scheduler"
    if target == "engine-run":
        return engine_run.pid
    if target == "qtui":
        return qtui.pid
    pids = lab.scheduler_pids(runs)
    return pids[0] if pids else None


def expected_outcome(lab: Lab, runs: Path, target: str, name: str, victim: int, behind: int) -> list[str]:
    """The victim's recorded outcome for the signal, and the run queued behind it: done."""
    problems = []
    row = lab.query(runs, "select * from runs where id = ?", (victim,))[0]
    status, error = row["status"], row["error"] or ""
    if target == "scheduler+worker":
        if status != "done" and not (status == "failed" and ("vanished" in error or "killed by" in error)):
            problems.append(f"victim run {victim}: {status} ({error!r}), expected failed: its worker vanished")
    elif target == "worker" and name == "SIGKILL":
        if status != "done" and not (status == "failed" and error.startswith("killed by SIGKILL")):
            problems.append(f"victim run {victim}: {status} ({error!r}), expected failed: killed by SIGKILL")
    elif target == "worker" and name == "SIGTERM":
        if status != "done" and status != "cancelled":
            problems.append(f"victim run {victim}: {status} ({error!r}), expected cancelled")
    elif status != "done":
        problems.append(f"victim run {victim}: {status} ({error!r}), expected done: a {name} of the {target} "
                        "must not stop a run")
    if status == "done":
        problems += numbers_problems(lab, runs, victim)
    other = lab.query(runs, "select * from runs where id = ?", (behind,))[0]
    if other["status"] != "done":
        problems.append(f"run {behind} queued behind: {other['status']} ({other['error']!r}), expected done")
    else:
        problems += numbers_problems(lab, runs, behind)
    return problems


def signal_trials(lab: Lab, runs: Path, rng: random.Random, rounds: int, targets=TARGETS,
                  signals=tuple(SIGNALS), stages=None):
    """Every signal to every target; the worker at every stage its variants go through."""
    worker_stages = [s for s in (stages or STAGES) if any(s in b["stages"] for b in lab.baselines.values())]
    plan = []
    for _ in range(rounds):
        for name in signals:
            for target in targets:
                if target == "scheduler+worker" and name != "SIGKILL":
                    continue  # the scheduler must be gone, not just asked to stop
                for stage in (worker_stages if target == "worker" else [rng.choice(["quantize", "sampling", "metrics"])]):
                    plan.append((target, name, stage))
    for target, name, stage in plan:
        yield signal_trial(lab, runs, rng, target, name, stage)
