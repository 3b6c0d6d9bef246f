"""The one thread that writes: it queues runs in the database, cancels and reorders them.

The UI thread never touches SQLite for writing. It calls `launch`, `rerun`, `rerun_failed`,
`cancel` and `move`, which only put a command on a queue; the thread executes them and
reports back through `notify(text, error)`. A cancel does not hold the thread up: the worker
gets SIGTERM, and the thread kills it (SIGKILL) between commands if it is still there after
`cancel_grace_s` of qtui.toml; quitting qtui kills those still waiting at once. Queued runs
are rows of the engine's persistent queue, started by a scheduler process
(`engine.scheduler`) that this thread starts on demand in its own session, exactly as
`engine run` does: quitting qtui or closing its terminal stops neither the runs nor the
queue. How runs are launched (local, GPU pool, Slurm) comes from `qtui.toml` beside
experiments.toml (`engine.settings`), with `--max-parallel` as the local concurrency limit.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from typing import Any, Callable

from qtui.model import RERUNNABLE

Notify = Callable[[str, bool], None]


class Launcher(threading.Thread):
    def __init__(
        self,
        runs_dir: str | Path,
        notify: Notify,
        max_parallel: int = 1,
        executor: Any = None,
        on_change: Callable[[], None] | None = None,
        interval: float = 0.5,
        experiments: str | Path = "experiments.toml",
    ):
        super().__init__(name="qtui-launcher", daemon=True)
        self.runs_dir = Path(runs_dir)
        self.notify = notify
        self.max_parallel = max_parallel
        self.executor = executor  # "local" or "slurm"; None: qtui.toml's choice
        self.on_change = on_change or (lambda: None)
        self.interval = interval
        self.experiments = Path(experiments)
        self.commands: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self.store = None
        self.options: dict | None = None  # engine.runner.launch_options, read in the thread
        self.settings = None  # engine.settings.Settings of qtui.toml, read in the thread
        self.stops: list = []  # engine.executor.Stop: cancelled workers not gone yet

    # ---------------------------------------------------------------- called from the UI
    def launch(self, experiment, variants: list[str], overrides: dict | None = None,
               executor: str | None = None) -> None:
        """Queue one run per variant of an `engine.config.Experiment`, with the sampling keys
        of `overrides` replacing the experiment's, on `executor` (None: qtui.toml's choice)."""
        self.commands.put(("launch", experiment, list(variants), dict(overrides or {}), executor))

    def rerun(self, run_id: int) -> None:
        self.commands.put(("rerun", run_id))

    def rerun_failed(self, experiment: str) -> None:
        self.commands.put(("rerun_failed", experiment))

    def cancel(self, run_id: int) -> None:
        self.commands.put(("cancel", run_id))

    def move(self, run_id: int, steps: int) -> None:
        """Move a waiting run earlier (negative) or later in the queue."""
        self.commands.put(("move", run_id, steps))

    def stop(self) -> None:
        self._stopping.set()
        self.commands.put(("wake",))

    # ---------------------------------------------------------------- the thread
    def run(self) -> None:
        try:
            if not self._stopping.wait(1.0) and unattended_work(self.runs_dir):  # after the first paint
                self._do(("resume",))
            while not self._stopping.is_set():
                try:
                    command = self.commands.get(timeout=0.1 if self.stops else self.interval)
                except queue.Empty:
                    command = None
                if command is not None and command[0] != "wake":
                    self._do(command)
                if self.stops:
                    self._settle_stops()
        finally:
            self._kill_stops()
            if self.store is not None:
                self.store.close()

    def _open(self) -> None:
        """Open the store on the first command (creating the database if there is none)."""
        if self.store is not None:
            return
        from engine.runner import launch_options  # imports sqlite-utils: keep out of start-up
        from engine.settings import load_settings
        from engine.store import Store

        settings = self.settings = load_settings(self.experiments) if self.experiments.exists() else None
        executor = self.executor if isinstance(self.executor, str) else (settings.executor if settings else "local")
        gpus = settings.gpus if settings is not None and executor == "local" else None
        self.options = launch_options(executor, self.max_parallel, gpus, settings)
        self.store = Store.open(self.runs_dir)

    def _ensure_scheduler(self) -> None:
        from engine.scheduler import ensure_scheduler

        ensure_scheduler(self.store.runs_dir, self.options["jobs"], self.options.get("gpus"), self.store)

    def _do(self, command: tuple) -> None:
        name, *args = command
        try:
            self._open()
        except Exception as exc:
            self.notify(f"cannot open the database in {self.runs_dir}: {exc}", True)
            return
        try:
            getattr(self, f"_{name}")(*args)
        except Exception as exc:  # a bad command must not stop the queue
            self.notify(f"{name} failed: {exc}", True)
        self.on_change()

    # ---------------------------------------------------------------- commands
    def _resume(self) -> None:
        """At start: runs still queued (a scheduler died, the machine rebooted) get one."""
        from engine.queue_store import adopt_candidates

        if adopt_candidates(self.store):
            self._ensure_scheduler()

    def _launch(self, experiment, variants: list[str], overrides: dict, executor: str | None = None) -> None:
        from engine.runner import launch_options, queue_runs  # the same rows `engine run` creates

        options = self.options
        if executor is not None and executor != options["executor"]:
            gpus = options.get("gpus") if executor == "local" else None
            options = launch_options(executor, self.max_parallel, gpus, self.settings)
        ids = queue_runs(self.store, experiment, variants, None, options, overrides or None)
        settings = "".join(f", {k} {v}" for k, v in overrides.items())
        self.notify(f"queued {describe(ids)} of {experiment.name}: {', '.join(variants)}{settings}"
                    f" ({options['executor']})", False)

    def _rerun(self, run_id: int) -> None:
        from engine.executor import display_status

        run = self.store.get_run(run_id)
        status = display_status(run)
        if status == "queued":
            self._ensure_scheduler()  # a queued run nobody starts: make sure a scheduler runs
            self.notify(f"run #{run_id} is queued; the scheduler will start it", False)
            return
        if status not in RERUNNABLE:
            self.notify(f"run #{run_id} is {status}: nothing to re-run", True)
            return
        new_id = self._copy(run)
        self.notify(f"re-running #{run_id} ({run['experiment']}/{run['variant']}) as #{new_id}", False)

    def _rerun_failed(self, experiment: str) -> None:
        from engine.executor import display_status

        latest: dict[str, dict] = {}
        for run in self.store.runs(experiment=experiment):
            latest[run["variant"]] = run  # ordered by id: the last one wins
        failed = [r for r in latest.values() if display_status(r) in ("failed", "lost")]
        if not failed:
            self.notify(f"{experiment}: no failed runs to re-run", False)
            return
        new_ids = [self._copy(run) for run in failed]
        self.notify(f"{experiment}: re-running {len(failed)} failed as {describe(new_ids)}", False)

    def _copy(self, run: dict) -> int:
        from engine.runner import requeue

        new_id = requeue(self.store, run, self.options)
        self._ensure_scheduler()
        return new_id

    def _move(self, run_id: int, steps: int) -> None:
        from engine.queue_store import move

        if not move(self.store, run_id, steps):
            self.notify(f"run #{run_id} is not waiting in the queue (or is already at that end)", True)

    def _cancel(self, run_id: int) -> None:
        from engine.executor import begin_cancel
        from engine.settings import CANCEL_GRACE_S

        run = self.store.get_run(run_id)
        if run["status"] not in ("queued", "running"):
            self.notify(f"run #{run_id} is {run['status']}: nothing to cancel", True)
            return
        grace = self.settings.cancel_grace_s if self.settings is not None else CANCEL_GRACE_S
        stop = begin_cancel(self.store, run_id, grace)
        if stop is not None:  # SIGTERM sent: settled between commands
            self.stops.append(stop)
            return
        self._cancelled(run_id)

    def _settle_stops(self) -> None:
        from engine.executor import settle
        from engine.worker import momentary

        for stop in list(self.stops):
            try:
                if not settle(self.store, stop):
                    continue
            except Exception as exc:
                if momentary(exc):  # a busy database: tried again on the next round
                    continue
                self.notify(f"cancel of run #{stop.run_id}: {exc}", True)
            self.stops.remove(stop)
            self._cancelled(stop.run_id, stop.killed)
            self.on_change()

    def _kill_stops(self) -> None:
        """Quitting: cancelled workers still there are killed now, not left to their grace."""
        from engine.executor import settle

        for stop in self.stops:
            try:
                settle(self.store, stop, now=stop.deadline)
            except Exception:  # recorded by their scheduler (the cancel was requested)
                pass
        self.stops.clear()

    def _cancelled(self, run_id: int, killed: bool = False) -> None:
        """Say how a cancel ended."""
        run = self.store.get_run(run_id)
        if run["status"] == "cancelled":
            self.notify(f"cancelled run #{run_id}" + (" (its worker ignored SIGTERM: killed)" if killed else ""),
                        False)
        elif run["status"] in ("done", "failed"):
            self.notify(f"run #{run_id} finished ({run['status']}) before it could be cancelled", False)
        else:
            self.notify(f"run #{run_id} could not be cancelled: it runs on {run.get('host')}", True)


def unattended_work(runs_dir: Path) -> bool:
    """Queued runs or Slurm runs in flight (read with the standard library: the engine's
    modules are imported only when there is something to resume)."""
    import sqlite3

    path = runs_dir / "qtui.db"
    if not path.exists():
        return False
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=2)
        try:
            return conn.execute("select count(*) from runs where status = 'queued' or "
                                "(executor = 'slurm' and status = 'running')").fetchone()[0] > 0
        finally:
            conn.close()
    except sqlite3.Error:
        return False


def describe(ids: list[int]) -> str:
    if not ids:
        return "no runs"
    if len(ids) == 1:
        return f"run #{ids[0]}"
    return f"{len(ids)} runs #{ids[0]}–#{ids[-1]}"
