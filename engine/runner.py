"""`engine run`: create the runs, start their workers through the queue, show Rich progress
from the workers' JSON lines, and end with the results table. Ctrl-C cancels every run."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from engine.config import Experiment, config_hash
from engine.export import TEXT_KEYS, cell, display_rows, is_best, result_rows
from engine.run_queue import RunQueue
from engine.store import Store


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


def create_runs(store: Store, experiment: Experiment, variants: list[str], samples: int | None) -> list[int]:
    commit, versions = git_commit(), package_versions()
    ids = []
    for seed in experiment.run_seeds:  # one run per variant and seed, seed by seed
        for variant in variants:
            config = experiment.run_config(variant, samples, seed)
            ids.append(store.create_run(experiment.name, variant, config, config_hash(config), commit, versions))
    return ids


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
                   jobs: int = 1, console: Console | None = None) -> list[int]:
    console = console or Console()
    ids = create_runs(store, experiment, variants, samples)
    queue = RunQueue(store, max_parallel=jobs)
    for run_id in ids:
        queue.submit(run_id)
    seeds = {i: json.loads(store.get_run(i)["config"])["sampling"]["seed"] for i in ids}
    several = len(set(seeds.values())) > 1
    names = {i: store.get_run(i)["variant"] + (f" s{seeds[i]}" if several else "") for i in ids}
    followers: dict[int, LogFollower] = {}
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
    try:
        with progress:
            while True:
                queue.poll()
                for run_id, handle in queue.active.items():
                    followers.setdefault(run_id, LogFollower(handle.log_path))
                for run_id, follower in followers.items():
                    for event in follower.new_events():
                        if event.get("event") == "progress":
                            progress.update(tasks[run_id], stage=event["stage"], status="running",
                                            completed=event.get("done", 0), total=event.get("total") or None)
                for run_id in ids:
                    status = store.get_run(run_id)["status"]
                    if status not in ("queued", "running"):
                        progress.update(tasks[run_id], status=status)
                if queue.idle:
                    break
                time.sleep(0.2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: cancelling runs[/yellow]")
        queue.cancel_all()
        raise
    return ids


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
