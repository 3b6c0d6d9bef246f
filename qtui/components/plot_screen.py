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
from textual.widget import Widget
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

    plotext.terminal.limit(False, False)  # the widget's size, not the terminal's, bounds the plot
    fig = plotext.figure
    fig.clear()
    fig.plot_size(max(20, width), max(8, height))
    fig.theme("dark")
    fig.legend(active=False)
    if len(front) > 1:
        fig.draw(fig.signal([p.x for p in front], [p.y for p in front], marker="dot").lines())
    if points:
        fig.draw(fig.signal([p.x for p in points], [p.y for p in points], marker="●"))
    if front:
        fig.draw(fig.signal([p.x for p in front], [p.y for p in front], marker="◆"))
    if labels and points:
        # labels right of their point, or left of it in the right half (so they stay on the plot)
        low, high = min(p.x for p in points), max(p.x for p in points)
        middle = (low * high) ** 0.5 if log and low > 0 else (low + high) / 2
        step = 1.5 * (high - low) / max(1, width - 12)  # about one cell: the label beside its marker
        for p in points:
            right = p.x > middle and not log
            x = p.x if log else (p.x - step if right else p.x + step)
            fig.draw(fig.text(x, p.y, p.label, alignment="right" if right else "left"))
    if log:
        fig.ruler("x").scale("log")
        fig.ruler("y").scale("log")
    fig.title(title)
    fig.label(xlabel, "x")
    fig.label(ylabel, "y")
    return Text.from_ansi(fig.build().string())


class PlotView(Widget):
    """A plot drawn at the widget's own size whenever it is rendered (so resizes just work)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.spec: tuple | None = None  # render()'s arguments after width and height
        self.message: Text | None = None

    def show(self, *spec) -> None:
        self.spec, self.message = spec, None
        self.refresh()

    def say(self, message: Text) -> None:
        self.spec, self.message = None, message
        self.refresh()

    def text(self) -> Text:
        if self.spec is None:
            return self.message or Text("")
        width, height = self.content_size.width, self.content_size.height
        return render(width, height, *self.spec)

    def render(self) -> Text:
        return self.text()


class PlotScreen(Screen[None]):
    KEYS_TITLE = "Plots"
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
            yield PlotView(id="plot")
            yield Static("", id="plot-note")
        yield KeyFooter(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self.redraw()

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
        plot = self.query_one("#plot", PlotView)
        if self.mode == "fisher":
            self._draw_fisher(plot)
        else:
            self._draw_pareto(plot)

    def _draw_pareto(self, plot: PlotView) -> None:
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
            plot.say(Text(f"no done run has both {self.quality} and {self.size_axis}", style="yellow"))
        else:
            plot.show("", SIZES[self.size_axis], label, self.points, self.front)
        note = Text("Pareto front (◆, joined): ", style="bold")
        note.append(", ".join(p.label for p in self.front) or "—")
        better = "lower" if lower else "higher"
        note.append(f"  · {better} {label} and smaller size is better · m metric · b size axis · f Fisher",
                    style="dim")
        self.query_one("#plot-note", Static).update(note)

    def _draw_fisher(self, plot: PlotView) -> None:
        title = self.query_one("#plot-title", Static)
        note = self.query_one("#plot-note", Static)
        if self.fisher is None:
            title.update(Text(f"{self.experiment}: Fisher against measured sensitivity", style="bold"))
            plot.say(Text(f"{self.experiment} has no run with fisher_spearman (a Fisher-allocated run)",
                          style="yellow"))
            note.update(Text("f back to the Pareto plot", style="dim"))
            return
        run = self.fisher
        rho = run.metric("fisher_spearman")
        title.update(Text(f"Fisher against measured sensitivity per layer: #{run.id} {run.variant}"
                          f"  (Spearman {rho:.3f})", style="bold"))
        if self.fisher_layers is None:
            plot.say(Text("reading layers…", style="dim"))
            return
        points = fisher_points(self.fisher_layers)
        if not points:
            plot.say(Text(f"run #{run.id} has no layer with both Fisher and sensitivity", style="yellow"))
        else:
            plot.show("", "Fisher information (log)", "sensitivity (log)", points, [], True, False)
        note.update(Text(f"{len(points)} layers · Spearman rank correlation {rho:.3f} · f Pareto plot",
                         style="dim"))
