"""The campaign's faults by name: each a generator of Outcomes over one lab.

Trials of one fault share one runs folder (`lab/<fault>-runs`), so the invariants are checked
on a database that grows over the campaign, with the undisturbed baseline runs in it."""

from __future__ import annotations

import random
import shutil

from bench.fault_lab.lab import Lab
from bench.fault_lab.signals import SIGNALS, TARGETS, signal_trials

VARIANTS = ["fp", "rtn", "gptq"]


def prepare(lab: Lab, quick: bool = False) -> None:
    """Undisturbed runs of the variants (the quick campaign does without GPTQ)."""
    runs = lab.folder / "baseline-runs"
    shutil.rmtree(runs, ignore_errors=True)
    lab.record_baselines(runs, VARIANTS[:2] if quick else VARIANTS)


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
        from bench.fault_lab.signals import signal_trial

        plan = [("worker", "SIGKILL", rng.choice(["quantize", "sampling", "metrics"])),
                ("worker", "SIGTERM", rng.choice(["load", "sampling"])), ("scheduler+worker", "SIGKILL", "sampling")]
        for target, name, stage in plan:
            yield signal_trial(lab, runs, rng, target, name, stage)
        return
    yield from signal_trials(lab, runs, rng, rounds, TARGETS, tuple(SIGNALS))


def lock_fault(lab: Lab, rng: random.Random, rounds: int, quick: bool):
    from bench.fault_lab.lock import lock_trial, lock_trials

    # 12 s is beyond SQLite's usual few seconds and this store's old 10 s busy timeout
    runs = fresh_runs(lab, "lock")
    if quick:
        yield lock_trial(lab, runs, rng, 12.0, before_start=False)
        return
    yield from lock_trials(lab, runs, rng, rounds, 30.0)


def load_fault(lab: Lab, rng: random.Random, rounds: int, quick: bool):
    from bench.fault_lab.load import load_trial

    runs = fresh_runs(lab, "load")
    for _ in range(1 if quick else rounds):
        yield load_trial(lab, runs, rng, 8, 6.0 if quick else 60.0)


def starts_fault(lab: Lab, rng: random.Random, rounds: int, quick: bool):
    from bench.fault_lab.starts import starts_trials

    yield from starts_trials(lab, rng, 1 if quick else 3 * rounds, 3 if quick else 4, list(lab.baselines))


def corrupt_fault(lab: Lab, rng: random.Random, rounds: int, quick: bool):
    from bench.fault_lab.corrupt import corrupt_trials

    yield from corrupt_trials(lab, fresh_runs(lab, "corrupt"), rng, rounds, quick)


def disk_fault(lab: Lab, rng: random.Random, rounds: int, quick: bool):
    from bench.fault_lab.disk import disk_trials

    yield from disk_trials(lab, rng, rounds, quick)


def readonly_fault(lab: Lab, rng: random.Random, rounds: int, quick: bool):
    from bench.fault_lab.readonly import readonly_trials

    yield from readonly_trials(lab, lab.folder / "baseline-runs", 1 if quick else rounds)


def fuzz_fault(lab: Lab, rng: random.Random, rounds: int, quick: bool):
    """tests/test_config_fuzz.py with more examples and new seeds (the suite runs 500 with
    hypothesis' own seed; `--quick` leaves it to the suite)."""
    import subprocess
    import sys

    from bench.fault_lab.invariants import Verdict
    from bench.fault_lab.lab import ROOT, environment
    from bench.fault_lab.signals import Outcome

    if quick:
        return
    for _ in range(rounds):
        seed, examples = rng.randrange(2**31), 2000
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                               str(ROOT / "tests" / "test_config_fuzz.py"), f"--hypothesis-seed={seed}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=3600,
                              env=environment(QTUI_FUZZ_EXAMPLES=str(examples)))
        verdict = Verdict()
        if done.returncode != 0:
            verdict.problems.append(done.stdout[-1500:])
        yield Outcome("fuzz", f"{examples} random catalogues, hypothesis seed {seed}", verdict)


def claims_fault(lab: Lab, rng: random.Random, rounds: int, quick: bool):
    from bench.fault_lab.claims import claims_trial

    for _ in range(1 if quick else 3 * rounds):
        yield claims_trial(lab, rng, waves=2 if quick else 3, per_wave=2 if quick else 3)


def atomic_fault(lab: Lab, rng: random.Random, rounds: int, quick: bool):
    from bench.fault_lab.atomic import atomic_trials

    yield from atomic_trials(lab, rng, rounds, quick)


FAULTS = {"signal": signal_fault, "lock": lock_fault, "load": load_fault, "starts": starts_fault,
          "claims": claims_fault, "atomic": atomic_fault, "disk": disk_fault, "readonly": readonly_fault,
          "corrupt": corrupt_fault, "fuzz": fuzz_fault}
