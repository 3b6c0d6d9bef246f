"""The heatmap screen: one experiment's layers against its runs, with a legend.

The columns start as the latest run with layer data of each variant (the highlighted run
stands in for its variant); `c` chooses any runs of the experiment instead. Layer rows are
read in a thread; the legend follows the quantity. Enter on a layer shows its details.
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
    else its latest run with layers; only runs of the preferred run's protocol, when there is
    one. Ordered as the catalogue lists the variants."""
    chosen: dict[str, RunRow] = {}
    protocol = next((r.protocol for r in runs if r.id == prefer), None)
    if protocol is not None:
        runs = [r for r in runs if r.protocol == protocol]
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


def run_labels(columns: list[RunRow]) -> dict[int, str]:
    """Column names: the variant, with its run id where a variant has several columns."""
    counts: dict[str, int] = {}
    for run in columns:
        counts[run.variant] = counts.get(run.variant, 0) + 1
    return {run.id: run.variant if counts[run.variant] == 1 else f"{run.variant} #{run.id}" for run in columns}


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
        Binding("c", "choose_runs", "Runs", tooltip="Choose the runs shown as columns (any runs of the "
                "experiment with per-layer data)"),
    ]

    def __init__(self, runs_dir: Path, experiment: str, runs: list[RunRow],
                 variant_order: list[str], prefer: int | None = None) -> None:
        super().__init__()
        self.runs_dir, self.experiment, self.runs = runs_dir, experiment, runs
        self.variant_order, self.prefer = variant_order, prefer
        self.matrix: Matrix | None = None
        self.columns: list[RunRow] = []
        self.with_layers: set[int] = set()

    def compose(self) -> ComposeResult:
        with Vertical(id="heatmap-box"):
            yield Static(f"Per-layer heatmap of {self.experiment}: loading…", id="heatmap-title")
            yield Static("", id="heatmap-legend")
        yield KeyFooter(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self.load()

    @work(thread=True, exclusive=True, exit_on_error=False)
    def load(self, chosen: list[int] | None = None) -> None:
        try:
            reader = Reader(self.runs_dir)
            try:
                with_layers = reader.layer_runs(self.experiment)
                if chosen is None:
                    columns = pick_columns(self.runs, with_layers, self.variant_order, self.prefer)
                else:
                    by_id = {run.id: run for run in self.runs}
                    columns = [by_id[i] for i in chosen if i in by_id and i in with_layers]
                layers = {run.id: reader.layers(run.id) for run in columns}
            finally:
                reader.close()
        except Exception as exc:
            self.app.call_from_thread(self._problem, f"cannot read layers: {exc}")
            return
        self.with_layers = with_layers
        if not columns:
            self.app.call_from_thread(
                self._problem, f"{self.experiment} has no run with per-layer data yet"
                if not with_layers else "no run chosen: press c to choose runs"
            )
            return
        matrix = build_matrix(layers, run_labels(columns))
        self.app.call_from_thread(self._show, matrix, columns)

    def _problem(self, message: str) -> None:
        self.query_one("#heatmap-title", Static).update(Text(message, style="bold yellow"))
        for old in self.query(Heatmap):
            old.remove()

    async def _show(self, matrix: Matrix, columns: list[RunRow]) -> None:
        self.matrix, self.columns = matrix, columns
        names = ", ".join(label if label.endswith(f"#{run_id}") else f"{label}=#{run_id}"
                          for run_id, label in matrix.runs)
        title = Text(f"{self.experiment}: {len(matrix.layers)} layers × {len(columns)} runs", style="bold")
        title.append(f"  ({names})", style="dim")
        self.query_one("#heatmap-title", Static).update(title)
        previous = list(self.query(Heatmap))
        heatmap = Heatmap(matrix, id="heatmap")
        if previous and previous[0].quantity in matrix.quantities():
            heatmap.set_reactive(Heatmap.quantity, previous[0].quantity)
        for old in previous:
            await old.remove()
        await self.query_one("#heatmap-box").mount(heatmap, before="#heatmap-legend")
        heatmap.focus()

    def on_heatmap_changed(self, event: Heatmap.Changed) -> None:
        heatmap = self.query_one(Heatmap)
        has_fp = event.quantity == "bits" and any(any(r.fp) for r in heatmap.rows)
        text = legend(event.quantity, event.scale, has_fp)
        text.append(f"  · layers in {event.sort}", style="dim")
        if event.abbreviations:
            text.append("\ncolumns: ", style="bold")
            text.append("  ".join(f"{short} = {name}" for short, name in event.abbreviations))
        self.query_one("#heatmap-legend", Static).update(text)

    def on_heatmap_layer_chosen(self, event: Heatmap.LayerChosen) -> None:
        from qtui.components.layer_screen import LayerScreen

        if self.matrix is not None:
            by_id = {run.id: run for run in self.columns}
            self.app.push_screen(LayerScreen(self.matrix, event.layer_index, by_id))

    def action_choose_runs(self) -> None:
        from qtui.components.runs_picker import RunsPicker

        candidates = sorted((r for r in self.runs if r.id in self.with_layers), key=lambda r: r.id)
        chosen = [run.id for run in self.columns]
        self.app.push_screen(RunsPicker(f"Runs of {self.experiment} in the heatmap", candidates, chosen),
                             self._runs_chosen)

    def _runs_chosen(self, chosen: list[int] | None) -> None:
        if chosen is not None:
            self.query_one("#heatmap-title", Static).update(f"Per-layer heatmap of {self.experiment}: loading…")
            self.load(chosen)
