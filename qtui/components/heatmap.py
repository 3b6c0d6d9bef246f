"""Per-layer heatmap: layers (rows, model order, with their role) against runs (columns).

A line-API widget, so a model of a few hundred layers scrolls without cost. The layer names
and roles stay put while the run columns scroll sideways (drawn as the runs table draws its
frozen columns: `grid_lines`). Run columns carry their full names when they fit, else
numbers explained in a legend. Keys: arrows move the cell cursor, `n` next quantity, `s`
sorts the layers by the cursor column's values (again: ascending, again: model order), `b`
folds the block under the cursor, `B` every block, enter shows the layer's details.
"""

from __future__ import annotations

from rich.style import Style
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from qtui.components.grid_lines import cells_strip, frozen_line, width_of
from qtui.heatmap_data import (
    DARK, FP_COLOUR, PALETTE, Line, Matrix, Scale, cell_text, column_labels, lines, make_scale, sort_lines,
)

ROLE_WIDTH = 5
MIN_NAME = 20


def left_truncate(text: str, width: int) -> str:
    if len(text) <= width:
        return text.ljust(width)
    return "…" + text[-(width - 1):]


class Heatmap(ScrollView, can_focus=True):
    COMPONENT_CLASSES = {"heatmap--header", "heatmap--cursor", "heatmap--block", "heatmap--missing",
                         "heatmap--header-cursor"}
    BINDINGS = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "cursor(-20)", "Page up", show=False),
        Binding("pagedown", "cursor(20)", "Page down", show=False),
        Binding("home", "jump(0)", "First", show=False),
        Binding("end", "jump(-1)", "Last", show=False),
        Binding("left", "column(-1)", "Left", show=False, tooltip="Previous run column"),
        Binding("right", "column(1)", "Right", show=False, tooltip="Next run column"),
        Binding("n", "next_quantity", "Quantity", tooltip="Next quantity: bits, weight error, Fisher, "
                "sensitivity, output error (those the runs have)"),
        Binding("s", "sort", "Sort", tooltip="Sort the layers by the cursor column's values: largest "
                "first, again smallest first, again model order"),
        Binding("b", "toggle_block", "Fold block", tooltip="Collapse or expand the block under the cursor"),
        Binding("B", "toggle_all", "Fold all", tooltip="Collapse or expand every block"),
        Binding("enter", "details", "Layer", tooltip="The layer's details in every run (on a block: "
                "fold or unfold it)"),
    ]

    quantity: reactive[str] = reactive("bits", init=False)

    class Changed(Message):
        """The quantity, the rows or the scale changed: the legend needs redrawing."""

        def __init__(self, quantity: str, scale: Scale | None, rows: int, collapsed: int,
                     abbreviations: list[tuple[str, str]], sort: str) -> None:
            super().__init__()
            self.quantity, self.scale, self.rows, self.collapsed = quantity, scale, rows, collapsed
            self.abbreviations, self.sort = abbreviations, sort

    class LayerChosen(Message):
        """Enter on a layer row: show its details."""

        def __init__(self, layer_index: int) -> None:
            super().__init__()
            self.layer_index = layer_index

    def __init__(self, matrix: Matrix, **kwargs) -> None:
        super().__init__(**kwargs)
        self.matrix = matrix
        self.collapsed: set[str] = set()
        self.rows: list[Line] = []
        self.scale: Scale | None = None
        self.cursor = 0
        self.column = 0  # the run column under the cursor
        self.sort: tuple[int, bool] | None = None  # (run column, descending), None: model order
        self.name_width = 10
        self.labels: list[str] = [label for _, label in matrix.runs]
        self.widths: list[int] = []
        self.abbreviations: list[tuple[str, str]] = []
        self._styles: dict[int, Style] = {}
        qs = matrix.quantities()
        self.set_reactive(Heatmap.quantity, qs[0] if qs else "bits")

    def on_mount(self) -> None:
        self._recompute()

    def watch_quantity(self) -> None:
        self._recompute()

    def on_resize(self) -> None:
        self._recompute()

    # ---------------------------------------------------------------- model
    def _recompute(self) -> None:
        rows = lines(self.matrix, self.quantity, self.collapsed)
        if self.sort is not None and self.matrix.runs:
            rows = sort_lines(rows, min(self.sort[0], len(self.matrix.runs) - 1), self.sort[1])
        self.rows = rows
        self.scale = make_scale(self.rows, self.quantity)
        longest = max((len(r.label) for r in self.rows), default=5)
        view = self.scrollable_content_region.width
        names = [label for _, label in self.matrix.runs]
        # Run names in full if they fit beside layer names cut to MIN_NAME; the layer names
        # then get whatever room is left.
        self.name_width = max(10, min(longest, MIN_NAME))
        self.labels, self.widths, self.abbreviations = column_labels(names, max(0, view - self.fixed_width))
        room = view - self.fixed_width - width_of(self.widths, lead=False)
        if room > 0:
            self.name_width = max(self.name_width, min(longest, self.name_width + room))
        self.cursor = max(0, min(self.cursor, len(self.rows) - 1))
        self.column = max(0, min(self.column, len(self.matrix.runs) - 1))
        self.virtual_size = Size(self.fixed_width + width_of(self.widths, lead=False), len(self.rows) + 1)
        self.refresh()
        sort = "model order"
        if self.sort is not None and self.matrix.runs:
            sort = f"by {names[self.sort[0]]}, {'largest' if self.sort[1] else 'smallest'} first"
        self.post_message(self.Changed(self.quantity, self.scale, len(self.rows), len(self.collapsed),
                                       self.abbreviations, sort))

    @property
    def fixed_width(self) -> int:
        return width_of([self.name_width, ROLE_WIDTH])

    def _cell_style(self, value: float | None, fp: bool) -> Style:
        if fp:
            key = -1
        elif value is None or self.scale is None:
            return self.get_component_rich_style("heatmap--missing")
        else:
            key = self.scale.index(value)
        style = self._styles.get(key)
        if style is None:
            if key == -1:
                style = Style(color="#ffffff", bgcolor=FP_COLOUR)
            else:
                style = Style(color="#ffffff" if key < DARK else "#000000", bgcolor=PALETTE[key], bold=True)
            self._styles[key] = style
        return style

    # ---------------------------------------------------------------- rendering
    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.scrollable_content_region.width
        base = self.rich_style
        if y == 0:
            header = base + self.get_component_rich_style("heatmap--header")
            cursor = header + self.get_component_rich_style("heatmap--header-cursor")
            fixed = cells_strip([("Layer", self.name_width, "left", header), ("Role", ROLE_WIDTH, "left", header)],
                                header)
            cells = [(label, w, "center", cursor if j == self.column and self.has_focus else header)
                     for j, (label, w) in enumerate(zip(self.labels, self.widths))]
            return frozen_line(fixed, self.fixed_width, cells_strip(cells, header, lead=False), scroll_x, width,
                               header)
        index = scroll_y + y - 1
        if index >= len(self.rows):
            return Strip.blank(width, base)
        row = self.rows[index]
        style = base
        if row.is_block:
            style = style + self.get_component_rich_style("heatmap--block")
        is_cursor = index == self.cursor
        if is_cursor:
            style = style + self.get_component_rich_style("heatmap--cursor")
        fixed = cells_strip([(left_truncate(row.label, self.name_width), self.name_width, "left", style),
                             (row.role[:ROLE_WIDTH], ROLE_WIDTH, "left", style)], style)
        cells = []
        for j, (value, fp) in enumerate(zip(row.values, row.fp or [False] * len(row.values))):
            cell_style = self._cell_style(value, fp)
            if is_cursor and j == self.column:
                cell_style = cell_style + Style(reverse=True)
            cells.append((cell_text(value, self.quantity, fp, row.is_block), self.widths[j], "center", cell_style))
        return frozen_line(fixed, self.fixed_width, cells_strip(cells, base, lead=False), scroll_x, width, base)

    # ---------------------------------------------------------------- actions
    def move_cursor(self, index: int) -> None:
        if not self.rows:
            return
        self.cursor = max(0, min(index, len(self.rows) - 1))
        height = max(1, self.scrollable_content_region.height - 1)
        if self.cursor < self.scroll_y:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= self.scroll_y + height:
            self.scroll_to(y=self.cursor - height + 1, animate=False, immediate=True)
        self.refresh()

    def action_cursor(self, delta: int) -> None:
        self.move_cursor(self.cursor + delta)

    def action_jump(self, where: int) -> None:
        self.move_cursor(0 if where == 0 else len(self.rows) - 1)

    def action_column(self, delta: int) -> None:
        if not self.widths:
            return
        self.column = max(0, min(self.column + delta, len(self.widths) - 1))
        left = sum(w + 1 for w in self.widths[: self.column])
        right = left + self.widths[self.column]
        room = self.scrollable_content_region.width - self.fixed_width
        if left < self.scroll_x:
            self.scroll_to(x=left, animate=False, immediate=True)
        elif right + 1 > self.scroll_x + room:
            self.scroll_to(x=right + 1 - room, animate=False, immediate=True)
        self.refresh()

    def action_next_quantity(self) -> None:
        qs = self.matrix.quantities()
        if qs:
            self.quantity = qs[(qs.index(self.quantity) + 1) % len(qs)] if self.quantity in qs else qs[0]

    def action_sort(self) -> None:
        """Model order -> largest first -> smallest first -> model order (per column)."""
        if self.sort is None or self.sort[0] != self.column:
            self.sort = (self.column, True)
        elif self.sort[1]:
            self.sort = (self.column, False)
        else:
            self.sort = None
        current = self.rows[self.cursor].label if self.rows else None
        self._recompute()
        self._cursor_to(lambda row: row.label == current)

    def action_toggle_all(self) -> None:
        blocks = self.matrix.blocks()
        current = self.rows[self.cursor].block if self.rows else None
        self.collapsed = set() if self.collapsed else set(blocks)
        self._recompute()
        self._cursor_to(lambda row: row.block == current)

    def action_toggle_block(self) -> None:
        if not self.rows:
            return
        block = self.rows[self.cursor].block
        self.collapsed ^= {block}
        self._recompute()
        self._cursor_to(lambda row: row.block == block)

    def action_details(self) -> None:
        if not self.rows:
            return
        row = self.rows[self.cursor]
        if row.is_block:
            self.action_toggle_block()
            return
        index = next((i for i, layer in enumerate(self.matrix.layers) if layer.name == row.label), None)
        if index is not None:
            self.post_message(self.LayerChosen(index))

    def _cursor_to(self, test) -> None:
        for i, row in enumerate(self.rows):
            if test(row):
                self.move_cursor(i)
                return
