"""The campaign's faults by name: each a generator of Outcomes over one lab.

Trials of one fault share one runs folder (`lab/<fault>-runs`), so the invariants are checked
on a database that grows over the campaign, with the undisturbed baseline runs in it."""

from __future__ import annotations

import random
import shutil

from bench.fault_lab.lab import Lab
from bench.fault_lab.signals import SIGNALS, TARGETS, signal_trials

VARIANTS = ["fp", "rtn", "gptq"]


def prepare(lab: Lab) -> None:
    runs = lab.folder / "baseline-runs"
    shutil.rmtree(runs, ignore_errors=True)
    lab.record_baselines(runs, VARIANTS)


def fresh_runs(lab: Lab, name: str):
    """A runs folder for one fault, seeded with a copy of the baseline database and cache (so
    paired comparisons have their reference runs, and the reference statistics are cached)."""
    runs = lab.folder / f"{name}-runs"
    shutil.rmtree(runs, ignore_errors=True)
    shutil.copytree(lab.folder / "baseline-runs", runs)
    return runs


def signal_fault(lab: Lab, rng: random.Random, rounds: int, quick: bool):
    runs = fresh_runs(lab, "signal")
    if quick:
        plan = [("worker", "SIGKILL", rng.choice(["sampling", "quantize", "calibrate"])),
                ("worker", "SIGTERM", rng.choice(["load", "metrics"])), ("worker", "SIGHUP", "sampling"),
                ("scheduler", "SIGKILL", "quantize"), ("engine-run", "SIGHUP", "sampling")]
        from bench.fault_lab.signals import signal_trial

        for target, name, stage in plan:
            yield signal_trial(lab, runs, rng, target, name, stage)
        return
    yield from signal_trials(lab, runs, rng, rounds, TARGETS, tuple(SIGNALS))


FAULTS = {"signal": signal_fault}
