"""A queue of runs with a concurrency limit, shared by `engine run` and qtui.

Runs are created in the store as `queued`; `submit` adds them here, `poll` starts the next
ones while fewer than `max_parallel` are alive and reaps the finished ones. A worker that
exits without recording an outcome (killed, crashed hard) is marked failed here, with the
tail of its log as the error. Torch-free.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.executor import LocalExecutor, RunHandle, cancel_run
from engine.store import Store


def log_tail(path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


@dataclass
class RunQueue:
    store: Store
    executor: LocalExecutor = field(default_factory=LocalExecutor)
    max_parallel: int = 1
    waiting: deque = field(default_factory=deque)
    active: dict[int, RunHandle] = field(default_factory=dict)

    def submit(self, run_id: int) -> None:
        if run_id not in self.waiting and run_id not in self.active:
            self.waiting.append(run_id)

    def poll(self) -> list[int]:
        """Reap finished workers and start waiting runs; returns the run ids that finished."""
        finished = []
        for run_id, handle in list(self.active.items()):
            code = handle.poll()
            if code is None:
                continue
            del self.active[run_id]
            finished.append(run_id)
            if code != 0:
                error = f"worker exited with code {code}: {log_tail(handle.log_path)}"
            else:
                error = "worker exited without recording a result"
            self.store.finish_if_unfinished(run_id, "failed", error)
        while self.waiting and len(self.active) < self.max_parallel:
            run_id = self.waiting.popleft()
            if self.store.get_run(run_id)["status"] != "queued":
                continue  # cancelled while it waited
            self.active[run_id] = self.executor.launch(self.store, run_id)
        return finished

    def cancel(self, run_id: int) -> bool:
        if run_id in self.waiting:
            self.waiting.remove(run_id)
        changed = cancel_run(self.store, run_id)
        handle = self.active.pop(run_id, None)
        if handle is not None and handle.process is not None:
            handle.process.wait()
        return changed

    def cancel_all(self) -> None:
        for run_id in list(self.waiting) + list(self.active):
            self.cancel(run_id)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.active
