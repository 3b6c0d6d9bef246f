"""Damaged inputs: a run folder's packed checkpoint, calibration file or per-sample evaluation
data truncated or altered at a random place, and the database truncated or overwritten.

Each trial damages a fresh copy of the campaign's runs folder and asks what a user would:
`engine verify` (with `--requantize` for a calibration file), `engine compare` for the
evaluation data, and `engine list` / `engine run` / `engine export` / qtui for the database.
Expected: exit 2, one line that names the damaged file, no traceback, and the damaged file's
bytes exactly as the fault left them (nothing overwritten, no -wal created beside a damaged
database). The undamaged original folder still passes every invariant."""

from __future__ import annotations

import hashlib
import random
import shutil
import sqlite3
import time
from pathlib import Path

from bench.fault_lab.invariants import Verdict, check_database
from bench.fault_lab.lab import EXPERIMENT, Lab
from bench.fault_lab.lock import complaints
from bench.fault_lab.signals import Outcome

FILE_FAULTS = ("truncate", "flip")


def damage(path: Path, how: str, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        keep = rng.randrange(0, len(data))
        path.write_bytes(bytes(data[:keep]))
        return f"truncated to {keep} of {len(data)} bytes"
    at = rng.randrange(len(data))
    data[at] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return f"bit flipped at byte {at} of {len(data)}"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_of(lab: Lab, runs: Path, variant: str) -> dict:
    return [r for r in lab.runs(runs) if r["variant"] == variant and r["status"] == "done"][0]


def one_line_error(process, file_name: str, code: int | None) -> list[str]:
    """Exit 2, a line naming the file, no traceback."""
    text = process.text()
    problems = []
    if code != 2:
        problems.append(f"exit {code}, expected 2: {text[-300:]!r}")
    if file_name not in text:
        problems.append(f"no line names {file_name}: {text[-300:]!r}")
    problems += [f"output: {c}" for c in complaints(text) if "Traceback" in c]
    return problems


def file_trial(lab: Lab, source: Path, rng: random.Random, kind: str, how: str) -> Outcome:
    """kind: checkpoint (weights.safetensors), calibration, eval (eval.npz)."""
    runs = source.parent / "corrupt-copy"
    shutil.rmtree(runs, ignore_errors=True)
    shutil.copytree(source, runs)
    variant = "gptq" if "gptq" in lab.baselines else "rtn"
    run = run_of(lab, runs, variant)
    name = {"checkpoint": "weights.safetensors", "calibration": "calibration.safetensors", "eval": "eval.npz"}[kind]
    target = runs / run["folder"] / name
    what = damage(target, how, rng)
    after = digest(target)
    verdict = Verdict()
    args = ["verify", str(run["id"])] + (["--requantize"] if kind == "calibration" else [])
    process = lab.engine(runs, *args)
    verdict.problems += one_line_error(process, name, process.wait(300))
    if kind == "eval":
        ref = run_of(lab, runs, "fp")
        compare = lab.engine(runs, "compare", str(ref["id"]), str(run["id"]))
        verdict.problems += [f"engine compare: {p}" for p in one_line_error(compare, name, compare.wait(300))]
    if digest(target) != after:
        verdict.problems.append(f"{name} was changed by the commands that read it")
    lab.cleanup()
    return Outcome("corrupt", f"{name} of run {run['id']} {what}", verdict)


def database_trial(lab: Lab, source: Path, rng: random.Random, how: str) -> Outcome:
    runs = source.parent / "corrupt-db"
    shutil.rmtree(runs, ignore_errors=True)
    shutil.copytree(source, runs)
    path = runs / "qtui.db"
    conn = sqlite3.connect(path)
    conn.execute("pragma wal_checkpoint(truncate)")
    conn.close()
    for extra in ("-wal", "-shm"):
        (runs / f"qtui.db{extra}").unlink(missing_ok=True)
    data = path.read_bytes()
    if how == "truncate":
        keep = rng.randrange(1, len(data) - 1)  # 0 bytes is a new, empty database
        path.write_bytes(data[:keep])
        what = f"truncated to {keep} of {len(data)} bytes"
    else:
        what = "its header overwritten"
        path.write_bytes(bytes(rng.randrange(256) for _ in range(100)) + data[100:])
    after = digest(path)
    verdict = Verdict()
    commands = [["list"], ["export", "--format", "csv"], ["run", EXPERIMENT, "--variant", "fp"]]
    for args in commands:
        process = lab.engine(runs, *args)
        verdict.problems += [f"engine {args[0]}: {p}" for p in one_line_error(process, "qtui.db", process.wait(120))]
    qtui = lab.start_qtui(runs, runs.parent / f"qtui-corrupt-{time.time_ns()}.out")
    code = qtui.wait(60)
    if code != 2:
        verdict.problems.append(f"qtui exit {code} on a damaged database, expected 2")
    if "damaged database" not in qtui.text():
        verdict.problems.append(f"qtui did not say the database is damaged: {qtui.text()[-200:]!r}")
    if digest(path) != after:
        verdict.problems.append("the damaged database was written to")
    if (runs / "qtui.db-wal").exists():
        verdict.problems.append("a -wal file was created beside the damaged database")
    lab.cleanup()
    return Outcome("corrupt", f"database {what}", verdict)


def corrupt_trials(lab: Lab, source: Path, rng: random.Random, rounds: int, quick: bool):
    if quick:
        plan = [("file", "checkpoint", "truncate"), ("file", "calibration", "flip"), ("db", None, "truncate")]
    else:
        plan = [("file", kind, how) for kind in ("checkpoint", "calibration", "eval") for how in FILE_FAULTS]
        plan += [("db", None, "truncate"), ("db", None, "header")]
        plan = plan * rounds
    for what, kind, how in plan:
        if what == "file":
            yield file_trial(lab, source, rng, kind, how)
        else:
            yield database_trial(lab, source, rng, how)
    verdict = check_database(lab, source)  # the undamaged original
    yield Outcome("corrupt", "the undamaged original folder afterwards", verdict)
