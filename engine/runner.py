"""`engine run`: queue the runs, make sure a scheduler drains the queue, show Rich progress
from the workers' JSON lines, and end with the results table. Ctrl-C cancels this command's
runs (queued ones leave the queue, running ones are stopped), and only those.

The runs are rows of the persistent queue (`engine.queue_store`); the scheduler process
(`engine.scheduler`) starts them, locally or on Slurm, so this command may go away at any
time without stopping anything but the display."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from engine.config import Experiment, config_hash
from engine.export import result_rows, visible_columns, cell
from engine.executor import LOG_NAME, cancel_run
from engine.scheduler import ensure_scheduler
from engine.store import FINISHED, Store


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("qtui", "torch", "diffusers", "numpy", "scipy", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def launch_options(executor: str = "local", jobs: int = 1, gpus: list[str] | None = None, settings=None) -> dict:
    """How the runs are to be started, stored on each run (the scheduler reads it)."""
    options = {"executor": executor, "jobs": jobs, "gpus": gpus}
    if executor == "slurm" and settings is not None:
        options["slurm"] = settings.slurm.as_dict()
    return options


def create_runs(store: Store, experiment: Experiment, variants: list[str], samples: int | None,
                launch: dict | None = None) -> list[int]:
    """Queue one run per variant; they form one batch (one Slurm job array)."""
    commit, versions = git_commit(), package_versions()
    launch = launch or launch_options()
    batch = uuid.uuid4().hex[:12]
    ids = []
    for variant in variants:
        config = experiment.run_config(variant, samples)
        ids.append(store.create_run(experiment.name, variant, config, config_hash(config), commit, versions,
                                    executor=launch["executor"], launch=launch, batch=batch))
    return ids


def queue_runs(store: Store, experiment: Experiment, variants: list[str], samples: int | None,
               launch: dict | None = None) -> list[int]:
    """Queue the runs and make sure a scheduler is draining the queue."""
    launch = launch or launch_options()
    ids = create_runs(store, experiment, variants, samples, launch)
    ensure_scheduler(store.runs_dir, launch.get("jobs") or 1, launch.get("gpus"), store)
    return ids


def shown_status(run: dict) -> str:
    from engine.queue_store import slurm_status

    if run["status"] == "queued" and run.get("slurm_state"):
        return slurm_status(run)
    return run["status"]


class LogFollower:
    """Reads the new JSON lines of a worker's log since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new_events(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        events = []
        for line in data[:end].decode(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return events


def run_experiment(store: Store, experiment: Experiment, variants: list[str], samples: int | None,
                   jobs: int = 1, console: Console | None = None, launch: dict | None = None) -> list[int]:
    console = console or Console()
    launch = launch or launch_options(jobs=jobs)
    ids = queue_runs(store, experiment, variants, samples, launch)
    names = dict(zip(ids, variants))
    followers = {i: LogFollower(store.run_folder(i) / LOG_NAME) for i in ids}
    progress = Progress(
        TextColumn("{task.fields[variant]:>8}"),
        TextColumn("{task.fields[stage]:<9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    )
    tasks = {i: progress.add_task("", total=None, variant=names[i], stage="", status="queued") for i in ids}
    last_ensure = time.time()
    try:
        with progress:
            while True:
                for run_id, follower in followers.items():
                    for event in follower.new_events():
                        if event.get("event") == "progress":
                            progress.update(tasks[run_id], stage=event["stage"], status="running",
                                            completed=event.get("done", 0), total=event.get("total") or None)
                runs = [store.get_run(i) for i in ids]
                for run in runs:
                    if run["status"] != "running":
                        progress.update(tasks[run["id"]], status=shown_status(run))
                if all(r["status"] in FINISHED for r in runs):
                    break
                if time.time() - last_ensure > 5 and any(r["status"] == "queued" for r in runs):
                    # the scheduler died (killed, machine rebooted): start another
                    ensure_scheduler(store.runs_dir, launch.get("jobs") or 1, launch.get("gpus"), store)
                    last_ensure = time.time()
                time.sleep(0.2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: cancelling this command's runs[/yellow]")
        for run_id in ids:
            cancel_run(store, run_id)
        raise
    return ids


TABLE_SKIP = ("id", "experiment", "reduction_pct", "mean_bits")


def results_table(store: Store, run_ids: list[int], title: str) -> Table:
    rows = result_rows(store, run_ids=run_ids)
    cols = [c for c in visible_columns(rows) if c[0] not in TABLE_SKIP]
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for key, header, _ in cols:
        left = key in ("variant", "status", "bits", "fid_ci")
        table.add_column(header, justify="left" if left else "right", no_wrap=key != "bits")
    for row in rows:
        table.add_row(*(cell(row, k, f) for k, _, f in cols))
    floors = [r["fid_floor"] for r in rows if r.get("fid_floor") is not None]
    if floors:
        table.caption = f"FID floor (two halves of the real digits): {floors[0]:.2f}"
    return table
