"""The samples of a run: its sample grid and its experiment's side-by-side comparison grid.

Artifacts are looked up in the database (kinds "grid" and "comparison") in a thread; the
pictures are drawn in the terminal with their paths shown, to open them elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Static

from qtui.components.key_footer import KeyFooter
from qtui.components.sample_view import SampleView
from qtui.model import RunRow
from qtui.reader import Reader


class SamplesScreen(Screen[None]):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", tooltip="Back to the runs"),
        Binding("g", "focus_next_image", "Next image", tooltip="Scroll to the next picture"),
    ]

    def __init__(self, runs_dir: Path, run: RunRow) -> None:
        super().__init__()
        self.runs_dir, self.run = runs_dir, run

    def compose(self) -> ComposeResult:
        self.sub_title = f"#{self.run.id} {self.run.experiment}/{self.run.variant}"
        with VerticalScroll(id="samples"):
            yield Static(f"Samples of run #{self.run.id} {self.run.experiment}/{self.run.variant}"
                         f" ({self.run.status})", id="samples-title")
        yield KeyFooter(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self.query_one("#samples").focus()
        self.find_artifacts()

    @work(thread=True, exclusive=True, exit_on_error=False)
    def find_artifacts(self) -> None:
        try:
            reader = Reader(self.runs_dir)
            try:
                grids = [a for a in reader.artifacts(self.run.id) if a["kind"] == "grid"]
                comparison = reader.comparison(self.run.experiment)
            finally:
                reader.close()
        except Exception as exc:
            self.app.call_from_thread(self._show_error, str(exc))
            return
        grid = grids[-1]["path"] if grids else None
        other = comparison["path"] if comparison else None
        self.app.call_from_thread(self._show, grid, other)

    def _resolve(self, path: str | None) -> str | None:
        """Absolute paths as they are; a relative one where it exists: below the working
        directory, the runs directory, or the run's folder (else below the runs directory)."""
        if path is None:
            return None
        p = Path(path)
        if p.is_absolute():
            return str(p)
        folder = self.runs_dir / (self.run.folder or "")
        candidates = [p, self.runs_dir / p, folder / p, folder / p.name]
        return str(next((c for c in candidates if c.exists()), self.runs_dir / p))

    def _show(self, grid: str | None, comparison: str | None) -> None:
        box = self.query_one("#samples")
        box.mount(SampleView(
            f"Sample grid of run #{self.run.id}", self._resolve(grid),
            missing=f"run #{self.run.id} has no sample grid yet ({self.run.status})", classes="sample",
        ))
        box.mount(SampleView(
            f"Side-by-side grid of {self.run.experiment}", self._resolve(comparison),
            missing=f"{self.run.experiment} has no comparison grid yet", classes="sample",
        ))

    def _show_error(self, message: str) -> None:
        self.query_one("#samples").mount(Static(f"cannot read the artifacts: {message}", classes="problem"))

    def action_focus_next_image(self) -> None:
        views = list(self.query(SampleView))
        if not views:
            return
        box = self.query_one("#samples")
        below = [v for v in views if v.virtual_region.y > box.scroll_y + 1]
        box.scroll_to_widget(below[0] if below else views[0], top=True, animate=False)
