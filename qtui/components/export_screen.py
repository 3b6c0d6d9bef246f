"""Asks where to export the results table; the extension (.csv, .md, .tex, .json) picks
the format.

Keys: enter exports, escape cancels, ctrl+t/ctrl+o/ctrl+l/ctrl+j switch the path's extension
to CSV, Markdown, LaTeX or JSON. Returns the chosen path, or None.
"""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

EXTENSIONS = {"csv": ".csv", "md": ".md", "tex": ".tex", "json": ".json"}


class ExportScreen(ModalScreen[str | None]):
    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+t", "extension('csv')", "CSV"),
        Binding("ctrl+o", "extension('md')", "Markdown"),
        Binding("ctrl+l", "extension('tex')", "LaTeX"),
        Binding("ctrl+j", "extension('json')", "JSON"),
    ]

    def __init__(self, default_path: str, rows: int) -> None:
        super().__init__()
        self.default_path, self.rows = default_path, rows

    def compose(self) -> ComposeResult:
        with Vertical(id="export-box"):
            yield Label(f"Export the results table ({self.rows} runs as shown)", id="export-title")
            yield Input(self.default_path, id="export-path")
            yield Label("Format from the extension: .csv .md .tex, or .json for everything "
                        "about each run. The whole database: engine export.", id="export-hint")
            with Horizontal(id="export-buttons"):
                yield Button("CSV", id="csv")
                yield Button("Markdown", id="md")
                yield Button("LaTeX", id="tex")
                yield Button("JSON", id="json")
                yield Button("Export", variant="primary", id="export")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def action_extension(self, kind: str) -> None:
        field = self.query_one(Input)
        field.value = str(Path(field.value or "results").with_suffix(EXTENSIONS[kind]))
        field.cursor_position = len(field.value)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "export":
            self._submit()
        elif event.button.id in EXTENSIONS:
            self.action_extension(event.button.id)

    def on_input_submitted(self) -> None:
        self._submit()

    def _submit(self) -> None:
        value = self.query_one(Input).value.strip()
        self.dismiss(value or None)

    def action_cancel(self) -> None:
        self.dismiss(None)
