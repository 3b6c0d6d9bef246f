"""The fault campaign: a tiny real experiment run under kills, signals, a held write lock, load,
simultaneous starts, runs created while schedulers claim, kills inside transactions, a full
disk, read-only folders and damaged files, with the invariants of
`bench/fault_lab/invariants.py` checked after every trial.

    python bench/faults.py [--rounds 1] [--seed 0] [--only signal,lock,...] [--quick] [--keep DIR]

Faults (`--only` takes these names):
  signal   SIGKILL, SIGTERM, SIGHUP of a worker at a random moment of each stage, and of
           `engine run`, the scheduler and qtui (bench/fault_lab/signals.py)
  lock     another process holds BEGIN IMMEDIATE on the database for 30 s mid-run
  load     8 writers (progress, metrics, layers) for 60 s while qtui's reader polls and
           `engine export` reads
  starts   several `engine run`s started at once into a new runs folder
  claims   `engine run`s of a multi-variant experiment and `engine queue add`s while schedulers
           claim: no run fails to start (bench/fault_lab/claims.py)
  atomic   SIGKILL of a process inside a multi-statement write, or at a random moment: each
           operation is all or nothing (bench/fault_lab/atomic.py)
  disk     the runs folder's filesystem fills up while a worker writes
  readonly a runs folder and a database the user may not write
  corrupt  a truncated or altered checkpoint, calibration file or database
  fuzz     tests/test_config_fuzz.py with 2,000 examples and a new seed per round
`--quick` is the CI version: fewer, shorter trials of each (tests/test_faults.py).
The last line is `faults: N trials, N survived, lost metrics 0, integrity ok` or what failed.
Each trial's fault and verdict is printed as it ends; `--keep DIR` keeps the lab there.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fault_lab import campaigns  # noqa: E402
from bench.fault_lab.lab import Lab  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="repeat every trial this many times")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random timing of the faults")
    parser.add_argument("--only", help="comma-separated faults: " + ",".join(campaigns.FAULTS))
    parser.add_argument("--quick", action="store_true", help="the short CI version")
    parser.add_argument("--keep", help="lab folder to use and keep (models are reused from it)")
    args = parser.parse_args(argv)
    faults = args.only.split(",") if args.only else list(campaigns.FAULTS)
    unknown = [f for f in faults if f not in campaigns.FAULTS]
    if unknown:
        parser.error(f"unknown faults {unknown}; known: {', '.join(campaigns.FAULTS)}")

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qtui-faults-"))
    rng = random.Random(args.seed)
    lab = Lab(folder, samples=24 if args.quick else 48)
    start = time.time()
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    failures, lost, integrity = [], 0, True
    try:
        lab.prepare()
        campaigns.prepare(lab, args.quick)
        print(f"lab {folder}: baselines of {', '.join(lab.baselines)} in {time.time() - start:.0f} s", flush=True)
        for fault in faults:
            for outcome in campaigns.FAULTS[fault](lab, rng, args.rounds, args.quick):
                v = outcome.verdict
                tally[outcome.fault][0] += 1
                tally[outcome.fault][1] += not v.problems
                tally[outcome.fault][2] += outcome.missed
                lost += v.lost_metrics
                integrity = integrity and v.integrity
                mark = "ok " if not v.problems else "BAD"
                print(f"{mark} {outcome.fault:8s} {outcome.detail}" + "".join(f"\n      {p}" for p in v.problems),
                      flush=True)
                if v.problems:
                    failures.append(f"{outcome.fault}: {outcome.detail}")
    finally:
        lab.cleanup()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    for fault, (n, ok, missed) in tally.items():
        print(f"  {fault:8s} {n:3d} trials, {ok:3d} survived" + (f" ({missed} struck too late to count)" if missed else ""))
    trials = sum(n for n, _, _ in tally.values())
    survived = sum(ok for _, ok, _ in tally.values())
    print(f"({time.time() - start:.0f} s)")
    print(f"faults: {trials} trials, {survived} survived, lost metrics {lost}, "
          f"integrity {'ok' if integrity else 'FAILED'}" + (f"; failed: {'; '.join(failures[:5])}" if failures else ""))
    return 0 if survived == trials and lost == 0 and integrity else 1


if __name__ == "__main__":
    sys.exit(main())
