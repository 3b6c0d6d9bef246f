"""The one thread that writes: it creates runs, drives the engine's `RunQueue` and cancels.

The UI thread never touches SQLite for writing. It calls `launch`, `rerun`, `rerun_failed`
and `cancel`, which only put a command on a queue; the thread executes them, polls the
`RunQueue` (start waiting runs up to the concurrency limit, reap finished workers) and reports
back through `notify(text, error)`. Runs are worker subprocesses started by the engine's
executor, exactly as `engine run` starts them, in their own session: quitting qtui leaves
them running. Runs still waiting in this queue when qtui quits are marked cancelled, so that
nothing stays queued with no one to start it (re-run them later with `r`).
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from typing import Any, Callable

from qtui.model import RERUNNABLE

Notify = Callable[[str, bool], None]
NOT_STARTED = "not started: qtui quit before its turn came (re-run it with r)"


class Launcher(threading.Thread):
    def __init__(
        self,
        runs_dir: str | Path,
        notify: Notify,
        max_parallel: int = 1,
        executor: Any = None,
        on_change: Callable[[], None] | None = None,
        interval: float = 0.5,
    ):
        super().__init__(name="qtui-launcher", daemon=True)
        self.runs_dir = Path(runs_dir)
        self.notify = notify
        self.max_parallel = max_parallel
        self.executor = executor
        self.on_change = on_change or (lambda: None)
        self.interval = interval
        self.commands: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self.queue = None  # engine.run_queue.RunQueue, built in the thread
        self.store = None

    # ---------------------------------------------------------------- called from the UI
    def launch(self, experiment, variants: list[str], overrides: dict | None = None,
               executor: str = "local") -> None:
        """Queue one run per variant of an `engine.config.Experiment`, with the sampling keys
        of `overrides` replacing the experiment's. Only the local executor exists so far
        (the scale-out work passes its choice on from here)."""
        self.commands.put(("launch", experiment, list(variants), dict(overrides or {}), executor))

    def rerun(self, run_id: int) -> None:
        self.commands.put(("rerun", run_id))

    def rerun_failed(self, experiment: str) -> None:
        self.commands.put(("rerun_failed", experiment))

    def cancel(self, run_id: int) -> None:
        self.commands.put(("cancel", run_id))

    def stop(self) -> None:
        self._stopping.set()
        self.commands.put(("wake",))

    def owns(self, run_id: int) -> bool:
        """Whether this launcher started the run's worker and still watches it."""
        queue = self.queue
        return queue is not None and run_id in queue.active

    def waiting_count(self) -> int:
        """Runs submitted here that have not started (read from the UI: a snapshot count)."""
        return 0 if self.queue is None else len(self.queue.waiting)

    # ---------------------------------------------------------------- the thread
    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    command = self.commands.get(timeout=self.interval)
                except queue.Empty:
                    command = None
                if command is not None and command[0] != "wake":
                    self._do(command)
                if self.queue is not None:
                    self._poll_queue()
            if self.queue is not None:
                self._abandon_waiting()
        finally:
            if self.store is not None:
                self.store.close()

    def _open(self) -> None:
        """Open the store on the first command (creating the database if there is none)."""
        if self.queue is not None:
            return
        from engine.run_queue import RunQueue  # imports sqlite-utils: keep out of start-up
        from engine.store import Store

        self.store = Store.open(self.runs_dir)
        kwargs = {"store": self.store, "max_parallel": self.max_parallel}
        if self.executor is not None:
            kwargs["executor"] = self.executor
        self.queue = RunQueue(**kwargs)

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

    def _poll_queue(self) -> None:
        try:
            if not self.queue.idle:
                self.queue.poll()
                self.on_change()
        except Exception as exc:
            self.notify(f"the run queue failed: {exc}", True)

    # ---------------------------------------------------------------- commands
    def _launch(self, experiment, variants: list[str], overrides: dict, executor: str = "local") -> None:
        from engine.runner import create_runs  # the same rows `engine run` creates

        if executor != "local":
            raise ValueError(f"executor {executor!r} is not available")
        ids = create_runs(self.store, experiment, variants, None, overrides or None)
        for run_id in ids:
            self.queue.submit(run_id)
        self.queue.poll()
        settings = "".join(f", {k} {v}" for k, v in overrides.items())
        self.notify(f"queued {describe(ids)} of {experiment.name}: {', '.join(variants)}{settings}", False)

    def _rerun(self, run_id: int) -> None:
        from engine.executor import display_status

        run = self.store.get_run(run_id)
        status = display_status(run)
        if status == "queued" and run_id not in self.queue.waiting and run_id not in self.queue.active:
            self.queue.submit(run_id)  # an orphaned queued run: start it here
            self.queue.poll()
            self.notify(f"run #{run_id} submitted to this queue", False)
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
        """A new queued run with the same experiment, variant and stored config, recorded
        with the current git commit and package versions as `engine run` records them."""
        from engine.runner import git_commit, package_versions

        config = json.loads(run["config"]) if run.get("config") else {}
        new_id = self.store.create_run(
            run["experiment"], run["variant"], config, run.get("config_hash") or "",
            git_commit(), package_versions(),
        )
        self.queue.submit(new_id)
        self.queue.poll()
        return new_id

    def _cancel(self, run_id: int) -> None:
        run = self.store.get_run(run_id)
        if run["status"] not in ("queued", "running"):
            self.notify(f"run #{run_id} is {run['status']}: nothing to cancel", True)
            return
        self.queue.cancel(run_id)  # the worker may record the cancellation itself
        run = self.store.get_run(run_id)
        if run["status"] == "cancelled":
            self.notify(f"cancelled run #{run_id}", False)
        elif run["status"] in ("done", "failed"):
            self.notify(f"run #{run_id} finished ({run['status']}) before it could be cancelled", False)
        else:
            self.notify(f"run #{run_id} could not be cancelled: it runs on {run.get('host')}", True)

    def _abandon_waiting(self) -> None:
        for run_id in list(self.queue.waiting):
            self.store.finish_if_unfinished(run_id, "cancelled", NOT_STARTED)
        self.queue.waiting.clear()


def describe(ids: list[int]) -> str:
    if not ids:
        return "no runs"
    if len(ids) == 1:
        return f"run #{ids[0]}"
    return f"{len(ids)} runs #{ids[0]}–#{ids[-1]}"
