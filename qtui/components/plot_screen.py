"""Plots of an experiment in the terminal (plotext, drawn into a Static as Rich text).

- Pareto: FID (or CLIP score / prompt accuracy: `m`) against size ratio or bits per weight
  (`b`) for the done runs of the experiment's main protocol, points labelled by variant, the
  Pareto front (`qtui.plot_data.pareto_front`) joined and listed under the plot.
- Fisher: a Fisher run's per-layer Fisher information against the measured sensitivity, both
  on log scales, with the run's Spearman correlation (`fisher_spearman`); `f` switches.

plotext is imported when the screen is opened; the plot is rebuilt at the widget's size on
every resize. The Fisher run's layers are read in a thread. Escape goes back.
"""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Static

from qtui.components.key_footer import KeyFooter
from qtui.model import RunRow
from qtui.plot_data import QUALITY, SIZES, Point, fisher_points, main_protocol, pareto_front, pareto_points
from qtui.reader import Reader


def fisher_run(runs: list[RunRow], prefer: int | None) -> RunRow | None:
    """The preferred run when it measured `fisher_spearman`, else the latest done run that did."""
    candidates = [r for r in runs if r.metric("fisher_spearman") is not None]
    chosen = next((r for r in candidates if r.id == prefer), None)
    if chosen is None:
        done = [r for r in candidates if r.status == "done"] or candidates
        chosen = max(done, key=lambda r: r.id, default=None)
    return chosen


def render(width: int, height: int, title: str, xlabel: str, ylabel: str, points: list[Point],
           front: list[Point], log: bool = False, labels: bool = True) -> Text:
    """One scatter plot (front joined by a line) as Rich text of width x height cells."""
    import plotext

    fig = plotext.figure
    fig.clear()
    fig.plot_size(max(20, width), max(8, height))
    fig.theme("dark")
    fig.legend(active=False)
    if points:
        fig.draw(fig.signal([p.x for p in points], [p.y for p in points], marker="●"))
    if len(front) > 1:
        fig.draw(fig.signal([p.x for p in front], [p.y for p in front], marker="x").lines())
    if labels and points:
        # labels right of their point, or left of it in the right half (so they stay on the plot)
        low, high = min(p.x for p in points), max(p.x for p in points)
        middle = (low * high) ** 0.5 if log and low > 0 else (low + high) / 2
        for p in points:
            right = p.x > middle
            fig.draw(fig.text(p.x, p.y, f"{p.label} " if right else f" {p.label}",
                              alignment="right" if right else "left"))
    if log:
        fig.ruler("x").scale("log")
        fig.ruler("y").scale("log")
    fig.title(title)
    fig.label(xlabel, "x")
    fig.label(ylabel, "y")
    return Text.from_ansi(fig.build().string())


class PlotScreen(Screen[None]):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", tooltip="Back to the runs"),
        Binding("m", "next_metric", "Metric", tooltip="Pareto plot: FID, CLIP score or prompt accuracy"),
        Binding("b", "next_size", "Size axis", tooltip="Pareto plot: size ratio or bits per weight on x"),
        Binding("f", "toggle_fisher", "Fisher", tooltip="Switch between the Pareto plot and Fisher against "
                "measured sensitivity per layer (a run with fisher_spearman)"),
    ]

    def __init__(self, runs_dir: Path, experiment: str, runs: list[RunRow], prefer: int | None = None) -> None:
        super().__init__()
        self.runs_dir, self.experiment, self.prefer = Path(runs_dir), experiment, prefer
        self.runs = [r for r in runs if r.experiment == experiment]
        self.protocol = main_protocol(self.runs)
        self.quality, self.size_axis, self.mode = "fid", "size_ratio", "pareto"
        self.fisher: RunRow | None = fisher_run(self.runs, prefer)
        self.fisher_layers: list[dict] | None = None
        self.points: list[Point] = []
        self.front: list[Point] = []

    def compose(self) -> ComposeResult:
        self.sub_title = self.experiment
        with Vertical(id="plot-box"):
            yield Static("", id="plot-title")
            yield Static("", id="plot")
            yield Static("", id="plot-note")
        yield KeyFooter(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self.redraw()

    def on_resize(self) -> None:
        self.call_after_refresh(self.redraw)

    def qualities(self) -> list[str]:
        return [q for q in QUALITY if any(r.metric(q) is not None for r in self.runs)] or ["fid"]

    def action_next_metric(self) -> None:
        qs = self.qualities()
        self.quality = qs[(qs.index(self.quality) + 1) % len(qs)] if self.quality in qs else qs[0]
        self.mode = "pareto"
        self.redraw()

    def action_next_size(self) -> None:
        sizes = list(SIZES)
        self.size_axis = sizes[(sizes.index(self.size_axis) + 1) % len(sizes)]
        self.mode = "pareto"
        self.redraw()

    def action_toggle_fisher(self) -> None:
        self.mode = "fisher" if self.mode == "pareto" else "pareto"
        if self.mode == "fisher" and self.fisher is not None and self.fisher_layers is None:
            self.load_fisher(self.fisher.id)
        self.redraw()

    @work(thread=True, exclusive=True, exit_on_error=False)
    def load_fisher(self, run_id: int) -> None:
        try:
            reader = Reader(self.runs_dir)
            try:
                layers = reader.layers(run_id)
            finally:
                reader.close()
        except Exception as exc:
            self.app.call_from_thread(self.notify, f"cannot read layers: {exc}", severity="error")
            return
        self.app.call_from_thread(self._fisher_loaded, layers)

    def _fisher_loaded(self, layers: list[dict]) -> None:
        self.fisher_layers = layers
        self.redraw()

    def redraw(self) -> None:
        plot = self.query_one("#plot", Static)
        width, height = plot.content_size.width, plot.content_size.height
        if width <= 0 or height <= 0:
            return
        if self.mode == "fisher":
            self._draw_fisher(plot, width, height)
        else:
            self._draw_pareto(plot, width, height)

    def _draw_pareto(self, plot: Static, width: int, height: int) -> None:
        runs = [r for r in self.runs if r.protocol == self.protocol]
        label, lower = QUALITY[self.quality]
        self.points = pareto_points(runs, self.quality, self.size_axis)
        self.front = pareto_front(self.points, lower)
        others = sum(1 for r in self.runs if r.status == "done" and r.protocol != self.protocol)
        title = Text(f"{self.experiment}: {label} against {SIZES[self.size_axis]}", style="bold")
        title.append(f"  ({len(self.points)} done runs of its main protocol"
                     + (f"; {others} of other protocols left out" if others else "") + ")", style="dim")
        self.query_one("#plot-title", Static).update(title)
        if not self.points:
            plot.update(Text(f"no done run has both {self.quality} and {self.size_axis}", style="yellow"))
        else:
            plot.update(render(width, height, "", SIZES[self.size_axis], label, self.points, self.front))
        note = Text("Pareto front (x, joined): ", style="bold")
        note.append(", ".join(p.label for p in self.front) or "—")
        better = "lower" if lower else "higher"
        note.append(f"  · {better} {label} and smaller size is better · m metric · b size axis · f Fisher",
                    style="dim")
        self.query_one("#plot-note", Static).update(note)

    def _draw_fisher(self, plot: Static, width: int, height: int) -> None:
        title = self.query_one("#plot-title", Static)
        note = self.query_one("#plot-note", Static)
        if self.fisher is None:
            title.update(Text(f"{self.experiment}: Fisher against measured sensitivity", style="bold"))
            plot.update(Text(f"{self.experiment} has no run with fisher_spearman (a Fisher-allocated run)",
                             style="yellow"))
            note.update(Text("f back to the Pareto plot", style="dim"))
            return
        run = self.fisher
        rho = run.metric("fisher_spearman")
        title.update(Text(f"Fisher against measured sensitivity per layer: #{run.id} {run.variant}"
                          f"  (Spearman {rho:.3f})", style="bold"))
        if self.fisher_layers is None:
            plot.update(Text("reading layers…", style="dim"))
            return
        points = fisher_points(self.fisher_layers)
        if not points:
            plot.update(Text(f"run #{run.id} has no layer with both Fisher and sensitivity", style="yellow"))
        else:
            plot.update(render(width, height, "", "Fisher information (log)", "sensitivity (log)", points, [],
                               log=True, labels=False))
        note.update(Text(f"{len(points)} layers · Spearman rank correlation {rho:.3f} · f Pareto plot",
                         style="dim"))
