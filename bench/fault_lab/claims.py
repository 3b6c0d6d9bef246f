"""Runs created while schedulers claim: `engine run` of a multi-variant, multi-seed experiment
and `engine queue add`, several started at once and again while the first ones' schedulers are
claiming (different --jobs, so several schedulers claim side by side). The runs' workers are
stand-ins (bench/fault_lab/standin_worker.py): what is tried is the start, not the numbers.

Invariant: no run fails to start. Every run created ends done, started by exactly one worker;
every command exits 0. (Once, a run was claimed between its INSERT and the UPDATE that set its
folder, and failed with "could not start its worker: unsupported operand type(s) for /".)
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from bench.fault_lab.invariants import Verdict, check_database
from bench.fault_lab.lab import Lab, environment
from bench.fault_lab.signals import Outcome

TOML = """
[experiments.claims]
description = "the claims trial's experiment: three variants, three seeds"
model = "{mmdit}"
feature_model = "{classifier}"
samples = 4
steps = 2
seeds = [0, 1, 2]

[experiments.claims.variants.a]
method = "none"

[experiments.claims.variants.b]
method = "none"

[experiments.claims.variants.c]
method = "none"
"""
WORKER = Path(__file__).resolve().parent / "standin_worker.py"


def start(lab: Lab, runs: Path, toml: Path, record: Path, rng: random.Random, n: int):
    processes = []
    for i in range(n):
        jobs = rng.choice([2, 3, 4])
        if rng.random() < 0.5:
            args = ["run", "claims", "--variant", "a", "--variant", "b", "--variant", "c"]
        else:
            args = ["queue", "add", "claims", "--variant", rng.choice("abc"), "--variant", rng.choice("abc")]
        command = [sys.executable, "-m", "engine.cli", *args, "--jobs", str(jobs), "--experiments", str(toml),
                   "--runs-dir", str(runs)]
        env = environment(QTUI_WORKER_COMMAND=json.dumps([sys.executable, str(WORKER)]),
                          CLAIMS_RECORD=str(record))
        processes.append((" ".join(args[:2]), lab.start(command, runs.parent / f"claims-{time.time_ns()}.out", env)))
    return processes


def claims_trial(lab: Lab, rng: random.Random, waves: int, per_wave: int) -> Outcome:
    runs = lab.folder / "claims-runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.parent.mkdir(parents=True, exist_ok=True)
    toml = lab.folder / "claims.toml"
    toml.write_text(TOML.format(mmdit=lab.models["mmdit"], classifier=lab.models["classifier"]))
    record = lab.folder / "claims-starts.txt"
    record.write_text("")
    verdict = Verdict()
    detail = f"{waves} waves of {per_wave} engine run / queue add while schedulers claim"
    try:
        started = []
        for wave in range(waves):
            started += start(lab, runs, toml, record, rng, per_wave)
            # the next wave comes while this one's schedulers are claiming
            lab.wait_for(lambda: any(r["status"] != "queued" or r["claimed_by"] for r in lab.runs(runs)), 60, 0.01)
        for what, process in started:
            code = process.wait(300)
            if code != 0:
                verdict.problems.append(f"{what} exit {code}: {process.text()[-300:]!r}")
        if not lab.settle(runs, 120):
            verdict.problems.append("runs still unfinished 120 s after the last command")
        verdict.add(check_database(lab, runs))
        rows = lab.runs(runs)
        starts = Counter(int(line.split()[0]) for line in record.read_text().splitlines() if line.strip())
        for row in rows:
            if row["status"] != "done":
                verdict.problems.append(f"run {row['id']} ({row['variant']}): {row['status']}: {row['error']}")
            elif starts[row["id"]] != 1:
                verdict.problems.append(f"run {row['id']}: {starts[row['id']]} workers started it")
        detail += f": {len(rows)} runs, {sum(r['status'] == 'done' for r in rows)} done"
        return Outcome("claims", detail, verdict)
    finally:
        lab.cleanup()
