"""One layer in every run of the heatmap: its parameters, bits (or why it stayed full
precision), weight and output errors, Fisher information and measured sensitivity, and what
the method stored in the layer's `extra` (Fisher-weighted error per bit width, scores, GPTQ's
RTN comparison, ...). Escape goes back to the heatmap.
"""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from qtui.heatmap_data import QUANTITIES, Matrix, compact
from qtui.model import RunRow


def fp_reason(extra: dict | None, run: RunRow | None, role: str) -> str:
    if extra and extra.get("reason"):
        return str(extra["reason"])
    if run is not None and run.quant in ("FP", "FP32", "FP16", "BF16"):  # engine.methods.none
        return "full-precision variant"
    return f"role {role} is not quantized by this variant" if role else "not quantized"


def extra_text(extra: dict | None) -> Text:
    text = Text()
    if not extra:
        return text
    for key, value in extra.items():
        if key == "reason":
            continue
        if text:
            text.append("\n")
        text.append(f"{key}: ", style="bold")
        if isinstance(value, dict):
            text.append("  ".join(f"{k}: {compact(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v}"
                                  for k, v in value.items()))
        elif isinstance(value, float):
            text.append(compact(value))
        else:
            text.append(str(value))
    return text


class LayerScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape", "app.pop_screen", "Back", tooltip="Back to the heatmap")]

    def __init__(self, matrix: Matrix, layer_index: int, runs: dict[int, RunRow]) -> None:
        super().__init__()
        self.matrix, self.index, self.runs = matrix, layer_index, runs

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="layer-box"):
            yield Static(self.content(), id="layer-body")

    def content(self) -> Group:
        layer = self.matrix.layers[self.index]
        head = Text(layer.name, style="bold")
        head.append(f"  {layer.role} · {layer.params:,} parameters · block {layer.block}")
        table = Table(expand=False, show_edge=False, pad_edge=False)
        table.add_column("Run", no_wrap=True)
        table.add_column("Bits", no_wrap=True)
        names = [q for q in QUANTITIES if q != "bits"
                 and any(self.matrix.values[q][self.index][c] is not None for c in range(len(self.matrix.runs)))]
        for q in names:
            table.add_column(QUANTITIES[q], justify="right", no_wrap=True)
        extras = [self.matrix.extras[self.index][c] if self.matrix.extras else None
                  for c in range(len(self.matrix.runs))]
        notes = any(extra and set(extra) - {"reason"} for extra in extras)
        if notes:
            table.add_column("Method's notes (extra)")
        for c, (run_id, label) in enumerate(self.matrix.runs):
            run = self.runs.get(run_id)
            extra = self.matrix.extras[self.index][c] if self.matrix.extras else None
            if not self.matrix.present[self.index][c]:
                bits = Text("no row", style="dim")
            elif self.matrix.values["bits"][self.index][c] is None:
                bits = Text(f"FP: {fp_reason(extra, run, layer.role)}", style="yellow")
            else:
                bits = Text(f"W{int(self.matrix.values['bits'][self.index][c])}")
            cells = [compact(v) if v is not None else "·" for v in
                     (self.matrix.values[q][self.index][c] for q in names)]
            table.add_row(f"{label} #{run_id}" if not label.endswith(f"#{run_id}") else label, bits, *cells,
                          *([extra_text(extra)] if notes else []))
        return Group(head, Text(""), table, Text("\nescape: back", style="dim"))
