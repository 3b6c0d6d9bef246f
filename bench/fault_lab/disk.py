"""A full disk: the runs folder lives on a small tmpfs the campaign mounts (root only; the
trial is skipped with the reason otherwise), and at a random moment of a run a filler file
takes every free byte, for a few seconds or until the run has ended.

Expected: the run fails with a message that starts "no space left" (or finishes, if it wrote
nothing while the disk was full), the database passes its integrity check, every file left
under its final name in the run folder is complete (safetensors headers and sizes, .npz
archives, PNGs), and a re-run after the disk is freed gives the undisturbed numbers. A
variant fills the disk before `engine run` starts: it must exit 2 with one line."""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from pathlib import Path

from bench.fault_lab.invariants import Verdict, check_database, numbers_problems, rerun_problems
from bench.fault_lab.lab import Lab
from bench.fault_lab.lock import complaints
from bench.fault_lab.signals import Outcome, new_run_ids, wait_for_stage


class SmallDisk:
    """A tmpfs of `megabytes` at `where`, unmounted on exit."""

    def __init__(self, where: Path, megabytes: int):
        self.where, self.megabytes = where, megabytes

    def __enter__(self) -> Path:
        self.where.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.megabytes}m", "tmpfs", str(self.where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise PermissionError(f"cannot mount a tmpfs: {done.stderr.strip() or done.returncode}")
        return self.where

    def __exit__(self, *exc) -> None:
        for _ in range(20):
            if subprocess.run(["umount", str(self.where)], capture_output=True).returncode == 0:
                return
            time.sleep(0.5)  # a process of the trial still has a file open


def can_mount(folder: Path) -> str | None:
    """None if a tmpfs can be mounted here, else why not."""
    try:
        with SmallDisk(folder / "probe-mount", 1):
            return None
    except (PermissionError, FileNotFoundError) as exc:
        return str(exc)


def fill(disk: Path) -> Path:
    """Write a filler file until the filesystem is full."""
    filler = disk / "filler.bin"
    block = b"\0" * (1 << 16)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError:
            pass
        for size in (4096, 512, 1):  # the last scraps
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass
    return filler


def incomplete_files(folder: Path) -> list[str]:
    """Files under their final names that are not whole."""
    from engine.errors import DamagedFile
    from engine.file_checks import check_npz, check_safetensors

    bad = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        try:
            if path.suffix == ".safetensors":
                check_safetensors(path)
            elif path.suffix == ".npz":
                check_npz(path, ())
            elif path.suffix == ".png":
                from PIL import Image

                with Image.open(path) as image:
                    image.load()
        except (DamagedFile, OSError, SyntaxError, ValueError) as exc:
            bad.append(f"{path.relative_to(folder)}: {str(exc)[:120]}")
    return bad


def used_megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def disk_trial(lab: Lab, rng: random.Random, from_start: bool, hold: float = 3.0) -> Outcome:
    source = lab.folder / "baseline-runs"
    size = int(used_megabytes(source) + 24)  # the baseline folder, and room for a few runs
    mount = lab.folder / "disk-mnt"
    verdict = Verdict()
    with SmallDisk(mount, size) as disk:
        runs = disk / "runs"
        shutil.copytree(source, runs)
        snapshot = lab.metrics(runs)
        before = {r["id"] for r in lab.runs(runs)}
        filler = None
        try:
            if from_start:
                filler = fill(disk)
                detail = "disk full before engine run"
            engine_run = lab.engine_run(runs, ["rtn"], out=lab.folder / f"disk-engine-{time.time_ns()}.out")
            if not from_start:
                stage = rng.choice(["quantize", "calibrate", "sampling", "metrics", "save"])
                ids = lab.wait_for(lambda: new_run_ids(lab, runs, before), 60)
                at = bool(ids) and wait_for_stage(lab, runs, ids[0], stage)
                time.sleep(rng.uniform(0, 0.9 * lab.baselines["rtn"]["stages"].get(stage, 0.0)))
                where = (lab.last_stage(runs, ids[0]) if at else f"after {stage}") if ids else "no run"
                filler = fill(disk)
                detail = f"disk full during {where}"
                time.sleep(hold)
                filler.unlink()
                filler = None
            code = engine_run.wait(300)
            if filler is not None:
                filler.unlink()
                filler = None
            lab.settle(runs, 120)
            text = engine_run.text()
            new = new_run_ids(lab, runs, before)
            if from_start:
                if code != 2 or "no space left" not in text:
                    verdict.problems.append(f"engine run on a full disk: exit {code}, expected 2 with 'no space left': "
                                            f"{text[-300:]!r}")
                verdict.problems += [f"engine run: {c}" for c in complaints(text) if "Traceback" in c]
            for run_id in new:
                row = lab.query(runs, "select * from runs where id = ?", (run_id,))[0]
                if row["status"] == "failed" and not (row["error"] or "").startswith("no space left"):
                    verdict.problems.append(f"run {run_id} failed with {row['error']!r}, expected 'no space left ...'")
                elif row["status"] == "done":
                    verdict.problems += numbers_problems(lab, runs, run_id)
                elif row["status"] != "failed":
                    verdict.problems.append(f"run {run_id}: {row['status']} after the disk was freed")
                verdict.problems += [f"run {run_id}: half-written file {b}"
                                     for b in incomplete_files(runs / row["folder"])]
            outcomes = [lab.query(runs, "select status, error from runs where id = ?", (i,))[0] for i in new]
            detail += ": " + (", ".join(o["status"] + (f" ({o['error'][:70]})" if o["error"] else "")
                                        for o in outcomes) or "no run queued")
            verdict.add(check_database(lab, runs, snapshot))
            failed = [i for i in new if lab.query(runs, "select status from runs where id = ?", (i,))[0]["status"] == "failed"]
            verdict.problems += rerun_problems(lab, runs, failed)
        finally:
            if filler is not None:
                filler.unlink(missing_ok=True)
            lab.cleanup()
    return Outcome("disk", detail, verdict)


def disk_trials(lab: Lab, rng: random.Random, rounds: int, quick: bool):
    reason = can_mount(lab.folder)
    if reason:
        print(f"disk: skipped: {reason}", flush=True)
        return
    yield disk_trial(lab, rng, from_start=True)
    for _ in range(1 if quick else 4 * rounds):
        yield disk_trial(lab, rng, from_start=False)
