"""A queue of runs with a concurrency limit, shared by `engine run` and qtui.

Runs are created in the store as `queued`; `submit` adds them here, `poll` starts the next
ones while fewer than `max_parallel` are alive and reaps the finished ones. A worker that
exits without recording an outcome (killed, crashed hard) is marked failed here, with a plain
reason (`engine.exit_reason.describe_exit`: the signal, the stage it was in, the last error
its log states). Torch-free.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.executor import LocalExecutor, RunHandle, cancel_run
from engine.exit_reason import describe_exit
from engine.store import Store


def log_tail(path, lines: int = 40, max_bytes: int = 64 * 1024) -> str:
    """The last lines of a log, as text."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


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
            self.store.finish_if_unfinished(run_id, "failed", describe_exit(code, log_tail(handle.log_path)))
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
