"""The queue: running runs, then queued ones in the order the scheduler starts them, with their
executor, where they run (GPU, Slurm job and node) and their state (waiting, starting, Slurm's
own state with its reason such as "PENDING (Priority)", running).

Keys: K / shift+up moves the highlighted waiting run earlier, J / shift+down later, c (twice)
cancels it (scancel for Slurm jobs), escape or u goes back. Rows are read in a thread every
second through the read-only Reader; changes go through the app's launcher thread.
"""

from __future__ import annotations

import time
from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Static

from qtui.components.key_footer import KeyFooter
from qtui.reader import Reader

COLUMNS = ("#", "run", "experiment / variant", "executor", "where", "state")
QUERY = (
    "select * from runs where status in ('queued', 'running') "
    "order by status = 'queued', claimed_by is null, queue_pos, id"
)
CONFIRM_SECONDS = 3.0


def read_queue(runs_dir: Path) -> list[dict]:
    reader = Reader(runs_dir)
    try:
        return [dict(r) for r in reader.query(QUERY)]
    finally:
        reader.close()


def queue_rows(runs: list[dict]) -> list[tuple]:
    """(run id, cells) per run: position among the waiting runs, or '-' for the others."""
    from engine.queue_store import queue_state

    out, position = [], 0
    for run in runs:
        where, state = queue_state(run)
        waiting = state == "waiting"
        position += waiting
        out.append((run["id"], (
            str(position) if waiting else "-", f"#{run['id']}", f"{run['experiment']}/{run['variant']}",
            run.get("executor") or "local", where, state,
        )))
    return out


class QueueScreen(Screen[None]):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("u", "app.pop_screen", "Back", show=False),
        Binding("K", "move(-1)", "Earlier"),
        Binding("shift+up", "move(-1)", "Earlier", show=False),
        Binding("J", "move(1)", "Later"),
        Binding("shift+down", "move(1)", "Later", show=False),
        Binding("c", "cancel", "Cancel run"),
    ]

    def __init__(self, runs_dir: Path) -> None:
        super().__init__()
        self.runs_dir = runs_dir
        self.rows: list[tuple] = []
        self.loaded = 0  # loads applied (tests wait on it)
        self._confirm: tuple[int, float] | None = None

    def compose(self) -> ComposeResult:
        with Vertical(id="queue-box"):
            yield Static("Queue: running, then waiting in start order", id="queue-title")
            table = DataTable(id="queue", cursor_type="row", zebra_stripes=True)
            table.add_columns(*COLUMNS)
            yield table
        yield KeyFooter(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self.query_one(DataTable).focus()
        self.load()
        self.set_interval(1.0, self.load)

    @work(thread=True, exclusive=True, group="queue", exit_on_error=False)
    def load(self) -> None:
        try:
            rows, error = queue_rows(read_queue(self.runs_dir)), None
        except Exception as exc:  # no database yet, or one being created
            rows, error = [], str(exc)
        self.app.call_from_thread(self._show, rows, error)

    def _show(self, rows: list[tuple], error: str | None) -> None:
        table = self.query_one(DataTable)
        selected = self.selected()
        if rows != self.rows:
            self.rows = rows
            table.clear()
            for run_id, cells in rows:
                table.add_row(*cells, key=str(run_id))
            ids = [r for r, _ in rows]
            if selected in ids:
                table.move_cursor(row=ids.index(selected))
        waiting = sum(1 for _, cells in rows if cells[0] != "-")
        title = error or f"Queue: {len(rows) - waiting} running or starting, {waiting} waiting"
        self.query_one("#queue-title", Static).update(title)
        self.loaded += 1

    def selected(self) -> int | None:
        table = self.query_one(DataTable)
        if not self.rows or table.cursor_row is None or table.cursor_row >= len(self.rows):
            return None
        return self.rows[table.cursor_row][0]

    def action_move(self, steps: int) -> None:
        run_id = self.selected()
        if run_id is None or self.app.launcher is None:
            return
        self.app.launcher.move(run_id, steps)
        self.set_timer(0.2, self.load)  # the cursor follows the run to its new place

    def action_cancel(self) -> None:
        run_id = self.selected()
        if run_id is None or self.app.launcher is None:
            return
        now = time.monotonic()
        if self._confirm and self._confirm[0] == run_id and now - self._confirm[1] < CONFIRM_SECONDS:
            self._confirm = None
            self.app.launcher.cancel(run_id)
            self.set_timer(0.3, self.load)
        else:
            self._confirm = (run_id, now)
            self.app.notify(f"press c again to cancel run #{run_id}", severity="warning", timeout=CONFIRM_SECONDS)
