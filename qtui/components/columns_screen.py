"""`o`: choose, hide and reorder the columns of the runs table; kept in the settings file.

Every built-in column and every metric stored by any run is listed, the shown ones first in
their order. Space shows or hides the highlighted column, `[` and `]` (or shift+up/down) move
it, `d` restores the defaults, enter applies and saves, escape leaves everything as it was.
ID and Variant always come first: they stay put when the table scrolls sideways.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from qtui.columns import BY_KEY, DEFAULT_LAYOUT, FROZEN, METRIC_PREFIX, column_for, normal_layout


class ColumnsScreen(ModalScreen[list[str] | None]):
    BINDINGS = [
        Binding("escape", "cancel", "Cancel", tooltip="Close without changing the columns"),
        Binding("enter", "apply", "Apply", tooltip="Show the chosen columns and keep them for next time"),
        Binding("space", "toggle", "Show/hide", tooltip="Show or hide the highlighted column"),
        Binding("left_square_bracket,shift+up", "move(-1)", "Up", tooltip="Move the column left (up the list)"),
        Binding("right_square_bracket,shift+down", "move(1)", "Down",
                tooltip="Move the column right (down the list)"),
        Binding("d", "defaults", "Defaults", tooltip="The default columns"),
    ]

    def __init__(self, layout: list[str], metrics: list[str]) -> None:
        super().__init__()
        self.shown = normal_layout(layout)
        everything = list(BY_KEY) + [METRIC_PREFIX + m for m in metrics]
        self.hidden = [k for k in everything if k not in self.shown]

    def compose(self) -> ComposeResult:
        with Vertical(id="columns-box"):
            yield Static(Text("Columns: space shows/hides, [ ] move, enter applies, escape cancels",
                              style="bold"), id="columns-title")
            yield OptionList(*self.options(), id="columns-list")

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    @property
    def order(self) -> list[str]:
        return self.shown + self.hidden

    def options(self) -> list[Option]:
        out = []
        for key in self.order:
            column = column_for(key)
            label = Text("[x] " if key in self.shown else "[ ] ", style="bold" if key in self.shown else "dim")
            label.append(column.label if key in BY_KEY else key[len(METRIC_PREFIX):])
            if key in FROZEN:
                label.append("  (always first)", style="dim")
            elif key.startswith(METRIC_PREFIX):
                label.append("  metric", style="dim")
            out.append(Option(label, id=key))
        return out

    def refresh_list(self, key: str) -> None:
        option_list = self.query_one(OptionList)
        option_list.clear_options()
        option_list.add_options(self.options())
        option_list.highlighted = self.order.index(key)

    def current(self) -> str | None:
        option_list = self.query_one(OptionList)
        if option_list.highlighted is None:
            return None
        return self.order[option_list.highlighted]

    def action_toggle(self) -> None:
        key = self.current()
        if key is None or key in FROZEN:
            return
        if key in self.shown:
            self.shown.remove(key)
            self.hidden.insert(0, key)
        else:
            self.hidden.remove(key)
            self.shown.append(key)
        self.refresh_list(key)

    def action_move(self, delta: int) -> None:
        key = self.current()
        if key is None or key not in self.shown or key in FROZEN:
            return
        i = self.shown.index(key)
        j = max(len(FROZEN), min(len(self.shown) - 1, i + delta))
        self.shown.insert(j, self.shown.pop(i))
        self.refresh_list(key)

    def action_defaults(self) -> None:
        key = self.current() or "id"
        everything = self.order
        self.shown = list(DEFAULT_LAYOUT)
        self.hidden = [k for k in everything if k not in self.shown]
        self.refresh_list(key)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.action_apply()

    def action_apply(self) -> None:
        self.dismiss(list(self.shown))

    def action_cancel(self) -> None:
        self.dismiss(None)
