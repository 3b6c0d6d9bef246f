"""`?`: every key of the screen underneath, grouped by where it works, with what it does.

The descriptions are the bindings' own (`Binding.tooltip`, else its short description), so
the list is always the keys that are really bound. Keys shared by every screen come last.
Escape (or `?`) closes it.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Static

# Where a set of bindings applies, by the class that declares them.
PLACES = {
    "QtuiApp": "Everywhere",
    "ExperimentsTree": "Experiments tree (left)",
    "RunsTable": "Runs table",
    "LogPane": "Log pane",
    "Heatmap": "Heatmap",
}
HIDDEN_ACTIONS = {"command_palette"}


def key_rows(screen: Screen, main_only: frozenset[str] = frozenset()) -> list[tuple[str, list[tuple[str, str]]]]:
    """(place, [(key, description)]) for the screen, its widgets and the app, in that order:
    the first binding of a key in the focus chain wins, as it does when the key is pressed."""
    groups: list[tuple[str, list[tuple[str, str]]]] = []
    app = screen.app
    nodes = [screen, *(w for w in screen.walk_children() if w._bindings.key_to_bindings), app]
    seen_nodes = set()
    for node in nodes:
        cls = type(node).__name__
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        rows = []
        for key, binding in node._bindings:
            if binding.action in HIDDEN_ACTIONS:
                continue
            if node is app and screen is not app.screen_stack[0] and binding.action in main_only:
                continue  # main-screen keys do nothing here
            text = binding.tooltip  # qtui's keys say what they do; Textual's own stay out of the list
            if not text:
                continue
            rows.append((app.get_key_display(binding), text))
        rows = list(dict(rows).items())  # one line per key
        if rows:
            place = PLACES.get(cls) or getattr(node, "KEYS_TITLE", None) or cls
            groups.append((place, rows))
    groups.insert(0, ("Moving", [("arrows", "Move; in tables left/right choose the column"),
                                 ("pgup pgdn home end", "Page and jump"),
                                 ("tab shift+tab", "Next / previous pane")]))
    return groups


class KeysScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("question_mark", "close", "Close", show=False),
        Binding("q", "close", "Close", show=False),
    ]

    def __init__(self, under: Screen, main_only: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.groups = key_rows(under, main_only)

    def compose(self) -> ComposeResult:
        with Vertical(id="keys-box"):
            yield Static(Text("Keys (escape closes)", style="bold"), id="keys-title")
            with VerticalScroll(id="keys-scroll"):
                yield Static(self.table(), id="keys-table")

    def table(self) -> Table:
        table = Table.grid(padding=(0, 2))
        table.add_column(no_wrap=True, style="bold cyan", justify="right")
        table.add_column()
        for place, rows in self.groups:
            table.add_row("", Text(place, style="bold underline"))
            for key, text in rows:
                table.add_row(key, text)
            table.add_row("", "")
        return table

    def action_close(self) -> None:
        self.dismiss()
