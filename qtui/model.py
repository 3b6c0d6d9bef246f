"""What the UI knows about runs: plain records built from database rows.

The database (written by the engine) is the source of truth; these records are a read-only
copy that the poller refreshes. Nothing here imports the engine, SQLite or Textual.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime

# Statuses as stored by the engine, plus "lost": running in the database, process gone.
STATUSES = ("queued", "running", "done", "failed", "cancelled", "lost")
ACTIVE = ("queued", "running")
RERUNNABLE = ("done", "failed", "cancelled", "lost")
STAGES = ("load", "quantize", "sampling", "metrics", "save")


def parse_time(value: str | None) -> float | None:
    """An ISO timestamp from the store (UTC with offset) as epoch seconds; None if absent."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


@dataclass(slots=True)
class RunRow:
    """One run: its database columns that the UI shows, plus its metrics."""

    id: int
    experiment: str
    variant: str
    status: str  # display status: the stored one, or "lost"
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    heartbeat_at: float | None = None
    error: str | None = None
    host: str | None = None
    pid: int | None = None
    folder: str | None = None
    config_hash: str | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    # From the stored config (`qtui.run_info.derive`): what the variant is and how it was run.
    description: str = ""
    quant: str = ""  # bits per role, as engine.methods.describe_bits says it
    samples: int | None = None
    protocol: str = ""  # qtui.protocol.protocol_key of the config

    def with_metrics(self, metrics: dict[str, float | None]) -> "RunRow":
        """A copy with these metrics (dataclasses.replace is several times slower)."""
        return RunRow(
            self.id, self.experiment, self.variant, self.status, self.created_at, self.started_at,
            self.finished_at, self.heartbeat_at, self.error, self.host, self.pid, self.folder,
            self.config_hash, metrics, self.description, self.quant, self.samples, self.protocol,
        )

    def metric(self, name: str) -> float | None:
        return self.metrics.get(name)

    def elapsed(self, now: float | None = None) -> float | None:
        """Seconds since the run started, up to when it finished (or now)."""
        start = parse_time(self.started_at)
        if start is None:
            return None
        end = parse_time(self.finished_at) if self.finished_at else None
        return max(0.0, (end if end is not None else (now or time.time())) - start)


@dataclass(slots=True)
class Progress:
    """The latest progress event of a running run and where its current stage began."""

    run_id: int
    stage: str
    done: int
    total: int
    time: float  # when the latest event was recorded (epoch seconds)
    message: str = ""
    stage_start_time: float | None = None
    stage_start_done: int = 0

    @property
    def fraction(self) -> float | None:
        if self.total and self.total > 0:
            return min(1.0, max(0.0, self.done / self.total))
        return None

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left in the current stage, from its rate so far; None when unknown."""
        if not self.total or self.stage_start_time is None:
            return None
        steps = self.done - self.stage_start_done
        spent = self.time - self.stage_start_time
        if steps <= 0 or spent <= 0:
            return None
        left = (self.total - self.done) * spent / steps
        since = max(0.0, (now or time.time()) - self.time)
        return max(0.0, left - since)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
