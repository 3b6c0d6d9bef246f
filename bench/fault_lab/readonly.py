"""A runs folder the user may not write, and a database file without write permission.

Root ignores permission bits, so as root the commands run as uid 65534 through setpriv, keeping
only CAP_DAC_READ_SEARCH (read and search anything, write nothing of others'); as any other user
they run as that user. Expected: `engine run`, `engine queue add` and qtui exit 2 with one line
naming the path and saying it cannot be written, and create nothing; `engine export` still
reads the results; the folder's files are byte for byte as before."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.fault_lab.invariants import Verdict, check_database
from bench.fault_lab.lab import EXPERIMENT, Lab, environment
from bench.fault_lab.lock import complaints
from bench.fault_lab.signals import Outcome

AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]


def user_prefix() -> tuple[list[str] | None, str]:
    """(the command prefix that runs as a user permission bits stop, why not)."""
    if os.geteuid() != 0:
        return [], ""
    if shutil.which("setpriv") is None:
        return None, "running as root and setpriv is not installed"
    probe = subprocess.run([*AS_NOBODY, sys.executable, "-c", "import os; print(os.getuid())"],
                           capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != "65534":
        return None, f"cannot run as uid 65534: {probe.stderr.strip()[-160:]}"
    return AS_NOBODY, ""


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def set_writable(folder: Path, writable: bool) -> None:
    for path in [folder, *folder.rglob("*")]:
        mode = path.stat().st_mode
        bits = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
        os.chmod(path, (mode | stat.S_IWUSR) if writable else (mode & ~bits))


def run_as(prefix: list[str], lab: Lab, runs: Path, *args: str, module: str = "engine.cli") -> subprocess.CompletedProcess:
    command = [*prefix, sys.executable, "-m", module, *args, "--experiments", str(lab.experiments), "--runs-dir", str(runs)]
    env = environment(HOME="/tmp", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(command, cwd=lab.folder, capture_output=True, text=True, env=env, timeout=300,
                          stdin=subprocess.DEVNULL)


def refused(done: subprocess.CompletedProcess, what: str, path_part: str) -> list[str]:
    text = done.stdout + done.stderr
    problems = []
    if done.returncode != 2:
        problems.append(f"{what}: exit {done.returncode}, expected 2: {text[-240:]!r}")
    line = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    if "cannot write" not in line or path_part not in line:
        problems.append(f"{what}: the error line does not say {path_part} cannot be written: {line!r}")
    problems += [f"{what}: {c}" for c in complaints(text) if "Traceback" in c]
    return problems


def readonly_trial(lab: Lab, source: Path, prefix: list[str], which: str, home: Path) -> Outcome:
    runs = home / f"readonly-{which}-runs"
    if runs.exists():
        set_writable(runs, True)
        shutil.rmtree(runs)
    shutil.copytree(source, runs)
    verdict = Verdict()
    try:
        if which == "folder":
            set_writable(runs, False)
            detail, path_part = "runs folder without write permission", str(runs)
        else:
            os.chmod(runs, 0o777)  # the folder may be written, the database may not
            for name in ("qtui.db", "qtui.db-wal", "qtui.db-shm"):
                if (runs / name).exists():
                    os.chmod(runs / name, 0o444)
            detail, path_part = "qtui.db without write permission", "qtui.db"
        before = tree(runs)
        verdict.problems += refused(run_as(prefix, lab, runs, "run", EXPERIMENT, "--variant", "fp"), "engine run", path_part)
        verdict.problems += refused(run_as(prefix, lab, runs, "queue", "add", EXPERIMENT, "--variant", "fp"),
                                    "engine queue add", path_part)
        export = run_as(prefix, lab, runs, "export", "--format", "csv")
        if export.returncode != 0 or EXPERIMENT not in export.stdout:
            verdict.problems.append(f"engine export could not read: exit {export.returncode}: {export.stderr[-200:]!r}")
        qtui = [*prefix, sys.executable, "-m", "qtui.app", "--runs-dir", str(runs), "--experiments", str(lab.experiments)]
        done = subprocess.run(qtui, cwd=lab.folder, capture_output=True, text=True, timeout=120,
                              env=environment(HOME="/tmp", PYTHONDONTWRITEBYTECODE="1"), stdin=subprocess.DEVNULL)
        if done.returncode != 2 or "cannot write" not in done.stderr:
            verdict.problems.append(f"qtui: exit {done.returncode}, expected 2 with 'cannot write': {done.stderr[-200:]!r}")
        after = tree(runs)
        if after != before:
            changed = sorted(set(after.items()) ^ set(before.items()))
            verdict.problems.append(f"the folder changed: {changed[:3]}")
        verdict.add(check_database(lab, runs))
    finally:
        set_writable(runs, True)
    return Outcome("readonly", detail, verdict)


def readonly_trials(lab: Lab, source: Path, rounds: int):
    prefix, reason = user_prefix()
    if prefix is None:
        print(f"readonly: skipped: {reason}", flush=True)
        return
    # The runs folders go where every user may search the path: SQLite checks the -shm with
    # access(2), which no capability passes, and the lab may sit below a 0700 folder (pytest's).
    home = Path(tempfile.mkdtemp(prefix="qtui-faults-readonly-"))
    os.chmod(home, 0o755)
    try:
        for _ in range(rounds):
            yield readonly_trial(lab, source, prefix, "folder", home)
            yield readonly_trial(lab, source, prefix, "database", home)
    finally:
        for folder in home.iterdir():
            set_writable(folder, True)
        shutil.rmtree(home, ignore_errors=True)
