"""Choose some runs from a list (the heatmap's columns, a comparison grid's columns).

Space ticks or unticks the highlighted run, `a` ticks all, enter applies, escape cancels.
Returns the chosen run ids in list order (by id), or None.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import SelectionList, Static

from qtui.model import RunRow


def run_line(run: RunRow) -> Text:
    text = Text(f"#{run.id:<5} ", style="bold")
    text.append(f"{run.variant:<14} ", style="cyan")
    text.append(f"{run.status:<9} ")
    text.append(f"n={run.samples if run.samples is not None else '?':<6} ")
    text.append(f"{run.quant} ", style="dim")
    if run.protocol:
        text.append(f"protocol {run.protocol}", style="dim")
    return text


class RunsPicker(ModalScreen[list[int] | None]):
    BINDINGS = [
        Binding("escape", "cancel", "Cancel", tooltip="Close without changing anything"),
        Binding("enter", "apply", "Apply", priority=True, tooltip="Use the ticked runs"),
        Binding("a", "all", "All", tooltip="Tick every run"),
    ]

    def __init__(self, title: str, runs: list[RunRow], chosen: list[int]) -> None:
        super().__init__()
        self.title_text, self.runs, self.chosen = title, runs, set(chosen)

    def compose(self) -> ComposeResult:
        with Vertical(id="picker-box"):
            yield Static(Text(f"{self.title_text}: space ticks, enter applies, escape cancels", style="bold"))
            yield SelectionList[int](*[(run_line(r), r.id, r.id in self.chosen) for r in self.runs],
                                     id="picker-list")

    def on_mount(self) -> None:
        self.query_one(SelectionList).focus()

    def action_all(self) -> None:
        self.query_one(SelectionList).select_all()

    def action_apply(self) -> None:
        chosen = set(self.query_one(SelectionList).selected)
        self.dismiss([r.id for r in self.runs if r.id in chosen])

    def action_cancel(self) -> None:
        self.dismiss(None)
