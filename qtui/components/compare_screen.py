"""Two or more runs side by side: their metrics, the paired differences of each run against
the first (when they share a protocol), their layers as a heatmap and their samples.

Everything is read in one thread: the runs' rows, metrics and layers (`Reader`), whether
their protocols differ (`engine.protocol.differences` on the stored configs), the paired
differences (`engine.paired_runs.compare_runs`, from each run's eval.npz; numpy is imported
there, never at qtui start-up) and the side-by-side grid (`engine.grids`, one file per set of
runs). Runs of different protocols get their metrics side by side and a plain statement of
what differs, never a paired difference. Escape goes back.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Static

from qtui.components.heatmap import Heatmap
from qtui.components.heatmap_screen import legend, run_labels
from qtui.components.key_footer import KeyFooter
from qtui.components.sample_view import SampleView
from qtui.model import RunRow
from qtui.plot_data import protocol_message
from qtui.reader import Reader

# Rows of the side-by-side metrics table: (metric, label)
METRIC_ROWS = [
    ("fid", "FID"), ("kid", "KID"), ("clip_score", "CLIP score"), ("prompt_acc", "prompt accuracy"),
    ("size_ratio", "size ratio"), ("mean_bits", "bits per weight"), ("size_bytes", "size (bytes)"),
    ("latency_ms", "latency (ms)"), ("peak_mem_mb", "peak memory (MB)"), ("quantize_s", "quantize (s)"),
]
PAIRED_LABELS = {"fid": "d FID", "clip_score": "d CLIP", "prompt_acc": "d accuracy"}
VERDICT_STYLE = {"better": "bold green", "worse": "bold red"}


def fmt(value) -> str:
    """4 significant digits; whole numbers from 10,000 up (sizes in bytes) with separators."""
    if value is None:
        return "—"
    if not isinstance(value, (int, float)):
        return str(value)
    if float(value).is_integer() and abs(value) >= 1e4:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def metrics_table(runs: list[RunRow], metrics: dict[int, dict], labels: dict[int, str]) -> Table:
    table = Table(box=None, padding=(0, 2), header_style="bold")
    table.add_column("metric", no_wrap=True)
    for run in runs:
        table.add_column(labels[run.id], justify="right", no_wrap=True)
    table.add_row("samples", *[str(r.samples) if r.samples is not None else "—" for r in runs])
    for key, label in METRIC_ROWS:
        values = [metrics[r.id].get(key) for r in runs]
        if all(v is None for v in values):
            continue
        cells = []
        for run, v in zip(runs, values):
            text = fmt(v)
            low, high = metrics[run.id].get(f"{key}_ci_low"), metrics[run.id].get(f"{key}_ci_high")
            if v is not None and low is not None and high is not None:
                text += f" [{low:.3g}, {high:.3g}]"
            cells.append(text)
        table.add_row(label, *cells)
    return table


def paired_table(rows: list[tuple[str, object]]) -> Table:
    """rows: (run label, {metric: PairedDiff} or an error text)."""
    table = Table(box=None, padding=(0, 2), header_style="bold")
    for name, justify in (("run", "left"), ("difference", "left"), ("value [95% interval]", "right"),
                          ("verdict", "left")):
        table.add_column(name, justify=justify, no_wrap=True)
    for label, diffs in rows:
        if isinstance(diffs, str):
            table.add_row(label, Text(diffs, style="yellow"), "", "")
            continue
        order = list(PAIRED_LABELS)
        for metric, d in sorted(diffs.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
            table.add_row(label, PAIRED_LABELS.get(metric, f"d {metric}"),
                          f"{d.diff:+.4g} [{d.low:+.3g}, {d.high:+.3g}]",
                          Text(d.verdict, style=VERDICT_STYLE.get(d.verdict, "")))
    return table


class CompareScreen(Screen[None]):
    KEYS_TITLE = "Compare"
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", tooltip="Back to the runs"),
        Binding("g", "focus_next_part", "Next part", tooltip="Scroll to the next part (paired differences, "
                "layers, samples)"),
    ]

    def __init__(self, runs_dir: Path, runs: list[RunRow]) -> None:
        super().__init__()
        self.runs_dir, self.runs = Path(runs_dir), list(runs)
        self.labels = run_labels(self.runs)
        self.same_protocol: bool | None = None
        self.protocol_note = ""
        self.paired: list[tuple[str, object]] | None = None  # what the paired table shows

    def compose(self) -> ComposeResult:
        names = ", ".join(f"#{r.id} {r.experiment}/{r.variant}" for r in self.runs)
        self.sub_title = names
        with VerticalScroll(id="compare"):
            yield Static(Text(f"Comparing {names}", style="bold"), id="compare-title")
            yield Static("", id="compare-protocol")
            yield Static("reading the runs…", id="compare-metrics", classes="compare-part")
            yield Static("", id="compare-paired", classes="compare-part")
            yield Static("", id="compare-layers-title", classes="compare-part")
            yield Static("", id="compare-legend")
        yield KeyFooter(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self.query_one("#compare").focus()
        self.load()

    @work(thread=True, exclusive=True, exit_on_error=False)
    def load(self) -> None:
        try:
            reader = Reader(self.runs_dir)
            try:
                records = {r.id: reader.run_record(r.id) or {} for r in self.runs}
                metrics = {r.id: reader.metrics(r.id) for r in self.runs}
                layers = {r.id: reader.layers(r.id) for r in self.runs}
            finally:
                reader.close()
        except Exception as exc:
            self.app.call_from_thread(self._problem, f"cannot read the runs: {exc}")
            return
        from engine.protocol import differences

        first = self.runs[0]
        configs = {i: json.loads(rec.get("config") or "{}") for i, rec in records.items()}
        notes = []
        for run in self.runs[1:]:
            diff = differences(configs[first.id], configs[run.id])
            if diff:
                notes.append(f"#{first.id} and #{run.id}: {protocol_message(diff)}")
        self.app.call_from_thread(self._show_metrics, metrics, notes, layers)
        if not notes:
            self.app.call_from_thread(self._show_paired, self._paired())
        self._draw_samples()

    def _paired(self) -> list[tuple[str, object]]:
        from engine.errors import UserError
        from engine.paired_runs import compare_runs
        from engine.store import Store

        first, rows = self.runs[0], []
        store = Store.open(self.runs_dir, create=False)
        try:
            for run in self.runs[1:]:
                label = f"{self.labels[run.id]} − {self.labels[first.id]}"
                try:
                    rows.append((label, compare_runs(store, run.id, first.id)))
                except UserError as exc:
                    rows.append((label, str(exc)))
        finally:
            store.close()
        return rows

    def _draw_samples(self) -> None:
        from engine.grids import SAMPLES_FILE, comparison_grid, comparison_path

        columns, ids = [], []
        for run in self.runs:
            path = self.runs_dir / (run.folder or f"run-{run.id:05d}") / SAMPLES_FILE
            if path.exists():
                columns.append((self.labels[run.id], path))
                ids.append(run.id)
        if not columns:
            self.app.call_from_thread(self._show_samples, None, "none of these runs has stored samples")
            return
        try:
            out = comparison_path(self.runs_dir, self.runs[0].experiment, ids)
            if not out.exists():
                comparison_grid(columns, out)
        except Exception as exc:
            self.app.call_from_thread(self._show_samples, None, f"cannot draw the grid: {exc}")
            return
        missing = [f"#{r.id}" for r in self.runs if r.id not in ids]
        note = f" ({', '.join(missing)}: no stored samples)" if missing else ""
        self.app.call_from_thread(self._show_samples, str(out), note)

    def _problem(self, message: str) -> None:
        self.query_one("#compare-metrics", Static).update(Text(message, style="bold yellow"))

    def _show_metrics(self, metrics: dict[int, dict], notes: list[str], layers: dict[int, list[dict]]) -> None:
        self.same_protocol = not notes
        protocol = self.query_one("#compare-protocol", Static)
        if notes:
            self.protocol_note = "\n".join(notes)
            protocol.update(Text(self.protocol_note + "\nMetrics are shown side by side; no paired "
                                 "differences (they need the same prompts, noise and sample count).",
                                 style="bold yellow"))
        else:
            self.protocol_note = "same protocol: paired differences against " + self.labels[self.runs[0].id]
            protocol.update(Text(self.protocol_note, style="green"))
        self.query_one("#compare-metrics", Static).update(
            Group(Text("Metrics", style="bold underline"), metrics_table(self.runs, metrics, self.labels)))
        paired = self.query_one("#compare-paired", Static)
        paired.display = not notes
        paired.update("" if notes else Text("computing paired differences…", style="dim"))
        self._show_layers(layers)

    def _show_paired(self, rows: list[tuple[str, object]]) -> None:
        self.paired = rows
        self.query_one("#compare-paired", Static).update(Group(
            Text("Paired differences (each run − the first; same prompts and noise, paired bootstrap)",
                 style="bold underline"), paired_table(rows)))

    def _show_layers(self, layers: dict[int, list[dict]]) -> None:
        from qtui.heatmap_data import build_matrix

        title = self.query_one("#compare-layers-title", Static)
        with_layers = {i: rows for i, rows in layers.items() if rows}
        if not with_layers:
            title.update(Text("Layers: none of these runs has per-layer data", style="dim"))
            return
        matrix = build_matrix(with_layers, {r.id: self.labels[r.id] for r in self.runs if r.id in with_layers})
        without = [f"#{r.id}" for r in self.runs if r.id not in with_layers]
        text = Text(f"Layers side by side ({len(matrix.layers)} layers; n (with the heatmap focused) cycles bits, "
                    "weight error, output error, ...)", style="bold underline")
        if without:
            text.append(f"  {', '.join(without)}: no per-layer data", style="yellow")
        title.update(text)
        self.query_one("#compare").mount(Heatmap(matrix, id="compare-heatmap"), before="#compare-legend")

    def on_heatmap_changed(self, event: Heatmap.Changed) -> None:
        heatmap = self.query_one(Heatmap)
        has_fp = event.quantity == "bits" and any(any(r.fp) for r in heatmap.rows)
        self.query_one("#compare-legend", Static).update(legend(event.quantity, event.scale, has_fp))

    def _show_samples(self, path: str | None, note: str) -> None:
        title = "Samples side by side (one row per prompt and noise)" + (note if path else "")
        self.query_one("#compare").mount(SampleView(title, path, missing=note if path is None else "",
                                                    classes="sample compare-part",
                                                    mode=getattr(self.app, "image_mode", "auto")))

    def action_focus_next_part(self) -> None:
        parts = list(self.query(".compare-part"))
        box = self.query_one("#compare")
        below = [p for p in parts if p.virtual_region.y > box.scroll_y + 1]
        box.scroll_to_widget(below[0] if below else parts[0], top=True, animate=False)
