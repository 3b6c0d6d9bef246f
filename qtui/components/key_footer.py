"""The footer of key bindings, able to wrap onto a grid of rows on narrow terminals.

Textual's Footer sets its grid to one column per binding; this one keeps `COLUMNS` columns,
so that with `layout: grid` (set in app.tcss below 120 columns) the keys wrap onto two lines
instead of being cut off. On wide terminals the layout stays horizontal and this is unused.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import Footer


class KeyFooter(Footer):
    COLUMNS = 7

    def compose(self) -> ComposeResult:
        yield from super().compose()
        self.styles.grid_size_columns = self.COLUMNS
