"""The heatmap screen: one experiment's layers against its runs, with a legend.

The columns are the latest run with layer data of each variant (the highlighted run stands
in for its variant). Layer rows are read in a thread; the legend follows the quantity.
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
from qtui.components.heatmap import Heatmap
from qtui.heatmap_data import DARK, FP_COLOUR, PALETTE, QUANTITIES, Matrix, Scale, build_matrix, cell_text
from qtui.model import RunRow
from qtui.reader import Reader


def pick_columns(runs: list[RunRow], with_layers: set[int], variant_order: list[str],
                 prefer: int | None) -> list[RunRow]:
    """Per variant: the preferred run if it has layers, else its latest done run with layers,
    else its latest run with layers. Ordered as the catalogue lists the variants."""
    chosen: dict[str, RunRow] = {}
    for run in sorted(runs, key=lambda r: r.id):
        if run.id not in with_layers:
            continue
        current = chosen.get(run.variant)
        if current is not None and current.id == prefer:
            continue
        if run.id == prefer or current is None or run.status == "done" or current.status != "done":
            chosen[run.variant] = run
    rank = {v: i for i, v in enumerate(variant_order)}
    return sorted(chosen.values(), key=lambda r: (rank.get(r.variant, len(rank)), r.variant))


def legend(quantity: str, scale: Scale | None, has_fp: bool) -> Text:
    text = Text(f"{QUANTITIES.get(quantity, quantity)}: ", style="bold")
    if scale is None:
        text.append("no values", style="italic")
    elif quantity == "bits" and float(scale.low).is_integer() and scale.high - scale.low <= 16:
        for bits in range(int(scale.low), int(scale.high) + 1):
            k = scale.index(bits)
            fg = "#ffffff" if k < DARK else "#000000"
            text.append(f" {bits} ", style=f"{fg} on {PALETTE[k]}")
        text.append(" bits per weight")
    else:
        lower = scale.low
        for k, upper in enumerate(scale.bounds()):
            fg = "#ffffff" if k < DARK else "#000000"
            text.append(f" {cell_text(lower, quantity, False, True)}", style=f"{fg} on {PALETTE[k]}")
            text.append(" ", style=f"on {PALETTE[k]}")
            lower = upper
        text.append(f" ≤ {cell_text(scale.high, quantity, False, True)}")
        if scale.log:
            text.append("  (log scale)", style="dim")
    if has_fp:
        text.append("  ")
        text.append(" FP ", style=f"#ffffff on {FP_COLOUR}")
        text.append(" full precision")
    return text


class HeatmapScreen(Screen[None]):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", tooltip="Back to the runs"),
    ]

    def __init__(self, runs_dir: Path, experiment: str, runs: list[RunRow],
                 variant_order: list[str], prefer: int | None = None) -> None:
        super().__init__()
        self.runs_dir, self.experiment, self.runs = runs_dir, experiment, runs
        self.variant_order, self.prefer = variant_order, prefer
        self.matrix: Matrix | None = None

    def compose(self) -> ComposeResult:
        with Vertical(id="heatmap-box"):
            yield Static(f"Per-layer heatmap of {self.experiment}: loading…", id="heatmap-title")
            yield Static("", id="heatmap-legend")
        yield KeyFooter(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self.load()

    @work(thread=True, exclusive=True, exit_on_error=False)
    def load(self) -> None:
        try:
            reader = Reader(self.runs_dir)
            try:
                with_layers = reader.layer_runs(self.experiment)
                columns = pick_columns(self.runs, with_layers, self.variant_order, self.prefer)
                layers = {run.id: reader.layers(run.id) for run in columns}
            finally:
                reader.close()
        except Exception as exc:
            self.app.call_from_thread(self._problem, f"cannot read layers: {exc}")
            return
        if not columns:
            self.app.call_from_thread(
                self._problem, f"{self.experiment} has no run with per-layer data yet"
            )
            return
        matrix = build_matrix(layers, {run.id: run.variant for run in columns})
        self.app.call_from_thread(self._show, matrix, columns)

    def _problem(self, message: str) -> None:
        self.query_one("#heatmap-title", Static).update(Text(message, style="bold yellow"))

    def _show(self, matrix: Matrix, columns: list[RunRow]) -> None:
        self.matrix = matrix
        names = ", ".join(f"{run.variant}=#{run.id}" for run in columns)
        title = Text(f"{self.experiment}: {len(matrix.layers)} layers × {len(columns)} runs", style="bold")
        title.append(f"  ({names})", style="dim")
        self.query_one("#heatmap-title", Static).update(title)
        heatmap = Heatmap(matrix, id="heatmap")
        self.query_one("#heatmap-box").mount(heatmap, before="#heatmap-legend")
        heatmap.focus()

    def on_heatmap_changed(self, event: Heatmap.Changed) -> None:
        has_fp = event.quantity == "bits" and any(any(r.fp) for r in self.query_one(Heatmap).rows)
        self.query_one("#heatmap-legend", Static).update(legend(event.quantity, event.scale, has_fp))
