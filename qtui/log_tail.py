"""Tails the selected run's `worker.log` in a thread and hands readable lines to the UI.

Workers print JSON lines ({"event": "progress", ...}, {"event": "log", ...}) and sometimes
plain text (tracebacks). Lines are formatted for people, and a run of consecutive progress
lines collapses to its last line, so thousands of progress updates cost one line of screen.
The thread waits for the UI to apply each chunk before reading on (back-pressure), and reads
at most the last `max_chunk` bytes of whatever accumulated meanwhile.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Callable

LOG_NAME = "worker.log"  # engine.executor.LOG_NAME


def log_path(runs_dir: Path, folder: str | None, run_id: int) -> Path:
    return Path(runs_dir) / (folder or f"run-{run_id:05d}") / LOG_NAME


def format_line(raw: str) -> tuple[str, str | None]:
    """A log line as shown, and its stage if it is a progress line (else None)."""
    raw = raw.rstrip("\r\n")
    if not raw.startswith("{"):
        return raw, None
    try:
        obj = json.loads(raw)
    except ValueError:
        return raw, None
    if not isinstance(obj, dict):
        return raw, None
    event = obj.get("event")
    message = str(obj.get("message") or "")
    if event == "progress":
        stage = obj.get("stage", "?")
        done, total = obj.get("done"), obj.get("total")
        count = f" {done}/{total}" if total else (f" {done}" if done is not None else "")
        return f"[{stage}]{count}" + (f" {message}" if message else ""), str(stage)
    if event == "log":
        return message, None
    rest = {k: v for k, v in obj.items() if k not in ("event", "message")}
    details = " ".join(f"{k}={v}" for k, v in rest.items())
    head = f"[{event}]" if event else ""
    return " ".join(part for part in (head, message, details) if part), None


def format_lines(raw_lines: list[str]) -> list[tuple[str, str | None]]:
    """Format and coalesce: of consecutive progress lines of one stage only the last stays.
    Lines come with their stage (None if not progress), so the pane can coalesce across
    chunks too."""
    out: list[tuple[str, str | None]] = []
    last_stage: str | None = None
    for raw in raw_lines:
        text, stage = format_line(raw)
        if stage is not None and stage == last_stage:
            out[-1] = (text, stage)
        else:
            out.append((text, stage))
        last_stage = stage
    return out


class LogTailer(threading.Thread):
    """Follows one log file at a time; `post(run_id, lines, reset)` delivers to the UI."""

    def __init__(
        self,
        post: Callable[[int, list[tuple[str, str | None]], bool], None],
        interval: float = 0.25,
        initial_bytes: int = 64 * 1024,
        max_chunk: int = 256 * 1024,
    ):
        super().__init__(name="qtui-log-tail", daemon=True)
        self.post, self.interval = post, interval
        self.initial_bytes, self.max_chunk = initial_bytes, max_chunk
        self.applied = threading.Event()
        self._lock = threading.Lock()
        self._target: tuple[int, Path] | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()

    def follow(self, run_id: int | None, path: Path | None) -> None:
        with self._lock:
            self._target = None if run_id is None or path is None else (run_id, path)
        self._wake.set()
        self.applied.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self.applied.set()

    def run(self) -> None:
        current: tuple[int, Path] | None = None
        offset, partial, missing_shown = 0, b"", False
        while not self._stopping.is_set():
            with self._lock:
                target = self._target
            reset = target != current
            if reset:
                current, offset, partial, missing_shown = target, 0, b"", False
            if current is not None:
                run_id, path = current
                try:
                    size = path.stat().st_size
                except OSError:
                    if not missing_shown:
                        self._deliver(run_id, [(f"(no log yet: {path} does not exist)", None)], True)
                        missing_shown = True
                    size = None
                if size is not None:
                    if missing_shown:
                        reset, missing_shown = True, False
                    if size < offset:  # truncated or replaced: start over
                        offset, partial, reset = 0, b"", True
                    if reset or size > offset:
                        offset, partial = self._read(run_id, path, size, offset, partial, reset)
            self._wake.wait(self.interval)
            self._wake.clear()

    def _read(self, run_id: int, path: Path, size: int, offset: int, partial: bytes, reset: bool):
        limit = self.initial_bytes if reset else self.max_chunk
        start = max(offset, size - limit)
        skipped = start - offset
        try:
            with open(path, "rb") as handle:
                handle.seek(start)
                data = handle.read(size - start)
        except OSError as exc:
            self._deliver(run_id, [(f"(cannot read {path}: {exc})", None)], reset)
            return offset, partial
        if skipped:
            partial = b""
            data = data.split(b"\n", 1)[1] if b"\n" in data else b""
        data = partial + data
        *complete, partial = data.split(b"\n")
        lines = format_lines([line.decode("utf-8", "replace") for line in complete])
        if skipped:
            lines.insert(0, (f"… {skipped} bytes skipped …", None))
        if lines or reset:
            self._deliver(run_id, lines, reset)
        return start + (size - start), partial

    def _deliver(self, run_id: int, lines: list[tuple[str, str | None]], reset: bool) -> None:
        if self._stopping.is_set():
            return
        self.applied.clear()
        self.post(run_id, lines, reset)
        self.applied.wait(10)
