"""Messages that background threads and widgets post to the app."""

from __future__ import annotations

from textual.message import Message

from qtui.poller import Snapshot


class SnapshotReady(Message):
    """The poller read what changed in the database."""

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot


class LogLines(Message):
    """New (text, stage) lines of the followed run's log (all of them when `reset`)."""

    def __init__(self, run_id: int, lines: list[tuple[str, str | None]], reset: bool) -> None:
        super().__init__()
        self.run_id, self.lines, self.reset = run_id, lines, reset


class Notice(Message):
    """Something a background thread wants the user to know."""

    def __init__(self, text: str, error: bool = False) -> None:
        super().__init__()
        self.text, self.error = text, error


class RunHighlighted(Message):
    """The cursor of the runs table moved to a run (None: the table is empty)."""

    def __init__(self, run_id: int | None) -> None:
        super().__init__()
        self.run_id = run_id


class ExperimentChosen(Message):
    """The user chose an experiment in the tree to filter by (None: all experiments)."""

    def __init__(self, experiment: str | None) -> None:
        super().__init__()
        self.experiment = experiment
