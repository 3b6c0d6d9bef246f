"""Simultaneous starts: N `engine run`s of different variants started within a moment of each
other into a new, empty runs folder (the race once seen as `cannot open the database (database
is locked)`: switching a new database to WAL fails busy without waiting). Every command must
run its runs to the undisturbed numbers and exit 0; one scheduler or several, no run twice."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from bench.fault_lab.invariants import Verdict, check_database, numbers_problems
from bench.fault_lab.lab import Lab
from bench.fault_lab.signals import Outcome


def starts_trial(lab: Lab, runs: Path, rng: random.Random, engines: int, variants: list[str]) -> Outcome:
    shutil.rmtree(runs, ignore_errors=True)
    runs.parent.mkdir(parents=True, exist_ok=True)
    variants = [rng.choice(variants) for _ in range(engines)]
    detail = f"{engines} engine runs at once ({', '.join(variants)})"
    verdict = Verdict()
    try:
        processes = [lab.engine_run(runs, [v], jobs=rng.choice([1, 2])) for v in variants]
        for i, process in enumerate(processes):
            code = process.wait(600)
            if code != 0:
                verdict.problems.append(f"engine run {i} ({variants[i]}) exit {code}: {process.text()[-240:]!r}")
        lab.settle(runs, 120)
        verdict.add(check_database(lab, runs))
        rows = lab.runs(runs)
        if sorted(r["variant"] for r in rows) != sorted(variants):
            verdict.problems.append(f"runs in the database: {sorted(r['variant'] for r in rows)}, started {sorted(variants)}")
        for row in rows:
            verdict.problems += numbers_problems(lab, runs, row["id"], paired=False)
            log = runs / row["folder"] / "worker.log"
            starts = log.read_text(errors="replace").count('"event": "log", "message": "worker pid') if log.exists() else 0
            if starts != 1:
                verdict.problems.append(f"run {row['id']}: {starts} workers ran it")
        return Outcome("starts", detail, verdict)
    finally:
        lab.cleanup()


def starts_trials(lab: Lab, rng: random.Random, rounds: int, engines: int, variants: list[str]):
    for i in range(rounds):
        yield starts_trial(lab, lab.folder / "starts-runs", rng, engines, variants)
