"""`engine run`: queue the runs, make sure a scheduler drains the queue, show Rich progress
from the workers' JSON lines, and end with the results table. Ctrl-C cancels this command's
runs (queued ones leave the queue, running ones are stopped: SIGTERM, then SIGKILL after the
cancel grace of qtui.toml, or at once on a second Ctrl-C), and only those.

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
from engine.export import TEXT_KEYS, cell, display_rows, is_best, result_rows, visible_columns
from engine.executor import LOG_NAME, cancel_runs
from engine.scheduler import ensure_scheduler
from engine.settings import CANCEL_GRACE_S
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
                launch: dict | None = None, sampling: dict | None = None) -> list[int]:
    """Queue one run per variant and seed, all in one transaction; they form one batch (one
    Slurm job array). `sampling` overrides keys of each config's sampling table (qtui's launch
    dialog: samples, seed, steps, guidance)."""
    commit, versions = git_commit(), package_versions()
    launch = launch or launch_options()
    batch = uuid.uuid4().hex[:12]
    configs = []
    for seed in experiment.run_seeds:  # one run per variant and seed, seed by seed
        for variant in variants:
            config = experiment.run_config(variant, samples, seed)
            if sampling:
                config["sampling"].update(sampling)
            configs.append((variant, config))
    with store.transaction():  # the whole batch or none of it (a Slurm array is the batch)
        return [store.create_run(experiment.name, variant, config, config_hash(config), commit, versions,
                                 executor=launch["executor"], launch=launch, batch=batch)
                for variant, config in configs]


def queue_runs(store: Store, experiment: Experiment, variants: list[str], samples: int | None,
               launch: dict | None = None, sampling: dict | None = None) -> list[int]:
    """Queue the runs and make sure a scheduler is draining the queue."""
    launch = launch or launch_options()
    ids = create_runs(store, experiment, variants, samples, launch, sampling)
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


def requeue(store: Store, run: dict, launch: dict) -> int:
    """A new queued run with the experiment, variant and stored config of `run` (a failed or
    cancelled one, say), recorded with the current git commit and package versions as `engine
    run` records them. The engine is deterministic: it gives the numbers the original would
    have given."""
    config = json.loads(run["config"]) if run.get("config") else {}
    return store.create_run(run["experiment"], run["variant"], config, run.get("config_hash") or "",
                            git_commit(), package_versions(), executor=launch["executor"], launch=launch)


def run_experiment(store: Store, experiment: Experiment, variants: list[str], samples: int | None,
                   jobs: int = 1, console: Console | None = None, launch: dict | None = None,
                   cancel_grace: float = CANCEL_GRACE_S) -> list[int]:
    launch = launch or launch_options(jobs=jobs)
    ids = queue_runs(store, experiment, variants, samples, launch)
    follow_runs(store, ids, launch, console, cancel_grace)
    return ids


def follow_runs(store: Store, ids: list[int], launch: dict, console: Console | None = None,
                cancel_grace: float = CANCEL_GRACE_S) -> None:
    """Rich progress of the runs `ids` until all have finished. Ctrl-C cancels them, waiting at
    most `cancel_grace` seconds for their workers (a second Ctrl-C kills them at once)."""
    console = console or Console()
    seeds = {i: json.loads(store.get_run(i)["config"])["sampling"]["seed"] for i in ids}
    several = len(set(seeds.values())) > 1
    names = {i: store.get_run(i)["variant"] + (f" s{seeds[i]}" if several else "") for i in ids}
    followers = {i: LogFollower(store.run_folder(i) / LOG_NAME) for i in ids}
    progress = Progress(
        TextColumn("{task.fields[variant]:>10}"),
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
        console.print(f"[yellow]interrupted: cancelling this command's runs (workers still there after "
                      f"{cancel_grace:g} s are killed; Ctrl-C again kills them now)[/yellow]")
        cancel_runs(store, ids, cancel_grace)
        raise


TABLE_SKIP = ("id", "experiment", "reduction_pct", "mean_bits")


def results_table(store: Store, run_ids: list[int], title: str, preferred: dict[str, str] | None = None) -> Table:
    """The runs grouped by protocol (P1, P2, ...) and seeds, best values in bold within a group."""
    shown, cols, notes = display_rows(result_rows(store, run_ids=run_ids), preferred)
    cols = [c for c in cols if c[0] not in TABLE_SKIP]
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for key, header, _ in cols:
        left = key in TEXT_KEYS
        table.add_column(header, justify="left" if left else "right", no_wrap=key != "bits")
    for row in shown:
        table.add_row(*(f"[bold]{cell(row, k, f)}[/bold]" if is_best(row, k) else cell(row, k, f) for k, _, f in cols))
    floors = {}
    for row in shown:
        if row.get("fid_floor") is not None:
            floors.setdefault(row.get("samples"), row["fid_floor"])
    caption = [", ".join(f"n={n}: {v:.2f}" for n, v in floors.items())] if floors else []
    if caption:
        caption[0] = f"FID floor (a perfect generator's FID at the run's sample count, Gaussian fit): {caption[0]}"
    caption.append("FID 95% CI: this run's own samples resampled, reference fixed (spread, not bias); "
                   "dFID: paired bootstrap against the reference variant on the same samples")
    table.caption = "\n".join(caption + notes)
    return table
