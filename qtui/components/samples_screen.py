"""The samples of a run: its sample grid and a side-by-side comparison grid.

Artifacts are looked up in the database (kinds "grid" and "comparison") in a thread; the
pictures are drawn in the terminal with their paths shown, to open them elsewhere. The
comparison is the one drawn when this run finished (it holds the run); `c` chooses the runs
of another one, which is drawn from their stored samples (`engine.grids`, in a thread) into
its own file named by those runs.
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
        Binding("m", "image_mode", "Image mode", tooltip="Switch how pictures are drawn: auto (pixels "
                "where the terminal shows Kitty or Sixel images), half-blocks, pixels"),
        Binding("c", "choose_runs", "Compare runs", tooltip="Choose the runs of a side-by-side grid "
                "(same prompts and noise when they share a protocol)"),
    ]

    def __init__(self, runs_dir: Path, run: RunRow, others: list[RunRow] = ()) -> None:
        super().__init__()
        self.runs_dir, self.run = runs_dir, run
        self.others = [r for r in others if r.experiment == run.experiment]

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
                comparison = reader.comparison(self.run.experiment, self.run.id)
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
        candidates = [self.runs_dir / p, p, folder / p, folder / p.name]
        return str(next((c for c in candidates if c.exists()), self.runs_dir / p))

    def _show(self, grid: str | None, comparison: str | None) -> None:
        box = self.query_one("#samples")
        mode = getattr(self.app, "image_mode", "auto")
        box.mount(SampleView(
            f"Sample grid of run #{self.run.id}", self._resolve(grid),
            missing=f"run #{self.run.id} has no sample grid yet ({self.run.status})", classes="sample", mode=mode,
        ))
        box.mount(SampleView(
            f"Side-by-side grid of {self.run.experiment} (c chooses its runs)", self._resolve(comparison),
            missing=f"{self.run.experiment} has no comparison grid yet (c draws one)", classes="sample",
            id="comparison-view", mode=mode,
        ))

    def action_image_mode(self) -> None:
        from qtui import images

        self.app.image_mode = images.next_mode(getattr(self.app, "image_mode", "auto"))
        for view in self.query(SampleView):
            view.set_mode(self.app.image_mode)
        self.notify(images.describe(self.app.image_mode))

    def action_choose_runs(self) -> None:
        from qtui.components.runs_picker import RunsPicker

        candidates = sorted((r for r in self.others if r.status == "done"), key=lambda r: r.id)
        if not candidates:
            self.notify(f"{self.run.experiment} has no finished runs to compare", severity="warning")
            return
        chosen = [self.run.id] if self.run.status == "done" else []
        self.app.push_screen(RunsPicker(f"Runs side by side ({self.run.experiment})", candidates, chosen),
                             self._runs_chosen)

    def _runs_chosen(self, chosen: list[int] | None) -> None:
        if not chosen:
            return
        runs = [r for r in self.others if r.id in set(chosen)]
        if len({r.protocol for r in runs}) > 1:
            self.notify("these runs do not share one protocol: rows are not the same prompts and noise",
                        severity="warning", timeout=8)
        self.draw_comparison(runs)

    @work(thread=True, exclusive=True, group="comparison", exit_on_error=False)
    def draw_comparison(self, runs: list[RunRow]) -> None:
        try:
            from engine.grids import SAMPLES_FILE, comparison_grid, comparison_path

            columns, ids = [], []
            for run in runs:
                path = self.runs_dir / (run.folder or f"run-{run.id:05d}") / SAMPLES_FILE
                if path.exists():
                    columns.append((f"{run.variant} #{run.id}", path))
                    ids.append(run.id)
            if not columns:
                raise ValueError("none of these runs has stored samples")
            out = comparison_path(self.runs_dir, self.run.experiment, ids)
            if not out.exists():
                comparison_grid(columns, out)
        except Exception as exc:
            self.app.call_from_thread(self.notify, f"cannot draw the grid: {exc}", severity="error", timeout=8)
            return
        self.app.call_from_thread(self._show_comparison, str(out), ids)

    async def _show_comparison(self, path: str, ids: list[int]) -> None:
        view = SampleView(f"Side-by-side grid of runs {', '.join(f'#{i}' for i in ids)}", path, classes="sample",
                          id="comparison-view", mode=getattr(self.app, "image_mode", "auto"))
        for old in self.query("#comparison-view"):
            await old.remove()
        await self.query_one("#samples").mount(view)

    def _show_error(self, message: str) -> None:
        self.query_one("#samples").mount(Static(f"cannot read the artifacts: {message}", classes="problem"))

    def action_focus_next_image(self) -> None:
        views = list(self.query(SampleView))
        if not views:
            return
        box = self.query_one("#samples")
        below = [v for v in views if v.virtual_region.y > box.scroll_y + 1]
        box.scroll_to_widget(below[0] if below else views[0], top=True, animate=False)
