"""One progress bar per running run: stage, steps done, elapsed time and the stage's ETA.

Progress comes from the database (each run's latest event, via the poller), so runs started
by `engine run` elsewhere show here too. The panel redraws on each snapshot and once a second
for the clocks; it never reads anything itself.
"""

from __future__ import annotations

import time

from rich.console import RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from qtui.model import STAGES, Progress, RunRow, format_duration


class ProgressPanel(Static):
    def __init__(self, **kwargs) -> None:
        super().__init__("", **kwargs)
        self.running: dict[int, RunRow] = {}
        self.progress: dict[int, Progress] = {}
        self.queued = 0
        self.clock = time.time  # replaced in tests for stable output

    def on_mount(self) -> None:
        self.set_interval(1.0, self._tick)

    def _tick(self) -> None:
        if self.running:
            self.update(self._render_panel())

    def show(self, running: dict[int, RunRow], progress: dict[int, Progress], queued: int) -> None:
        self.running, self.progress, self.queued = running, progress, queued
        self.border_title = f"Progress · {len(running)} running · {queued} queued"
        self.update(self._render_panel())

    def _render_panel(self) -> RenderableType:
        if not self.running:
            note = "No run in progress." + (f" {self.queued} queued." if self.queued else "")
            return Text(note + " l in the tree launches.", style="dim")
        now = self.clock()
        narrow = self.content_region.width < 70  # keep room for the bar on 80 columns
        table = Table.grid(padding=(0, 1), expand=True)
        table.add_column(no_wrap=True)  # run
        table.add_column(no_wrap=True)  # stage
        table.add_column(ratio=1, min_width=6)  # bar
        table.add_column(no_wrap=True, justify="right")  # count
        table.add_column(no_wrap=True, justify="right")  # elapsed and ETA
        for run_id in sorted(self.running):
            run = self.running[run_id]
            p = self.progress.get(run_id)
            name = Text(f"#{run_id} ", style="bold")
            name.append(f"{run.variant}", style="cyan")
            if p is None:
                table.add_row(name, Text("starting", style="dim"), ProgressBar(total=None, pulse=True),
                              "", format_duration(run.elapsed(now)))
                continue
            stage = p.stage
            if stage in STAGES and not narrow:
                stage = f"{stage} {STAGES.index(stage) + 1}/{len(STAGES)}"
            bar = ProgressBar(total=p.total or None, completed=p.done, pulse=not p.total)
            count = f"{p.done}/{p.total}" if p.total else ""
            eta = p.eta(now)
            clock = format_duration(run.elapsed(now))
            if eta is not None:
                clock += f" ≈{format_duration(eta)}" if narrow else f" ETA {format_duration(eta)}"
            table.add_row(name, Text(stage, style="yellow"), bar, count, clock)
        return table
