"""Per-layer heatmap: layers (rows, model order, with their role) against runs (columns).

A line-API widget, so a model of a few hundred layers scrolls without cost. The layer names
stay put while the run columns scroll sideways. Keys: `n` next quantity, `b` collapse or
expand every block, enter collapses or expands the block under the cursor.
"""

from __future__ import annotations

from rich.segment import Segment
from rich.style import Style
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from qtui.heatmap_data import (
    DARK, FP_COLOUR, PALETTE, Line, Matrix, Scale, cell_text, lines, make_scale,
)

CELL = 7
ROLE_WIDTH = 5
MAX_NAME = 36


def left_truncate(text: str, width: int) -> str:
    if len(text) <= width:
        return text.ljust(width)
    return "…" + text[-(width - 1):]


class Heatmap(ScrollView, can_focus=True):
    COMPONENT_CLASSES = {"heatmap--header", "heatmap--cursor", "heatmap--block", "heatmap--missing"}
    BINDINGS = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "cursor(-20)", "Page up", show=False),
        Binding("pagedown", "cursor(20)", "Page down", show=False),
        Binding("home", "jump(0)", "First", show=False),
        Binding("end", "jump(-1)", "Last", show=False),
        Binding("left", "pan(-1)", "Left", show=False),
        Binding("right", "pan(1)", "Right", show=False),
        Binding("n", "next_quantity", "Quantity", tooltip="Next quantity: bits, weight error, Fisher, "
                "sensitivity, output error (those the runs have)"),
        Binding("b", "toggle_all", "Fold all", tooltip="Collapse or expand every block"),
        Binding("enter", "toggle_block", "Fold block", tooltip="Collapse or expand the block under the cursor"),
    ]

    quantity: reactive[str] = reactive("bits", init=False)

    class Changed(Message):
        """The quantity, the rows or the scale changed: the legend needs redrawing."""

        def __init__(self, quantity: str, scale: Scale | None, rows: int, collapsed: int) -> None:
            super().__init__()
            self.quantity, self.scale, self.rows, self.collapsed = quantity, scale, rows, collapsed

    def __init__(self, matrix: Matrix, **kwargs) -> None:
        super().__init__(**kwargs)
        self.matrix = matrix
        self.collapsed: set[str] = set()
        self.rows: list[Line] = []
        self.scale: Scale | None = None
        self.cursor = 0
        self.name_width = 10
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
        self.rows = lines(self.matrix, self.quantity, self.collapsed)
        self.scale = make_scale(self.rows, self.quantity)
        longest = max((len(r.label) for r in self.rows), default=5)
        room = self.scrollable_content_region.width - CELL * len(self.matrix.runs) - ROLE_WIDTH - 3
        self.name_width = max(10, min(longest, max(MAX_NAME, room)))
        self.cursor = max(0, min(self.cursor, len(self.rows) - 1))
        width = self.fixed_width + CELL * len(self.matrix.runs)
        self.virtual_size = Size(width, len(self.rows) + 1)
        self.refresh()
        self.post_message(self.Changed(self.quantity, self.scale, len(self.rows), len(self.collapsed)))

    @property
    def fixed_width(self) -> int:
        return 1 + self.name_width + 1 + ROLE_WIDTH + 1

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
            header = self.get_component_rich_style("heatmap--header")
            fixed = [Segment(" " + "Layer".ljust(self.name_width) + " " + "Role".ljust(ROLE_WIDTH) + " ", base + header)]
            cells = [Segment(label[: CELL - 1].center(CELL), base + header) for _, label in self.matrix.runs]
        else:
            index = scroll_y + y - 1
            if index >= len(self.rows):
                return Strip.blank(width, base)
            row = self.rows[index]
            style = base
            if row.is_block:
                style = style + self.get_component_rich_style("heatmap--block")
            if index == self.cursor:
                style = style + self.get_component_rich_style("heatmap--cursor")
            text = " " + left_truncate(row.label, self.name_width) + " " + row.role[:ROLE_WIDTH].ljust(ROLE_WIDTH) + " "
            fixed = [Segment(text, style)]
            cells = []
            for value, fp in zip(row.values, row.fp or [False] * len(row.values)):
                shown = cell_text(value, self.quantity, fp, row.is_block)
                cells.append(Segment(shown[:CELL - 1].center(CELL), self._cell_style(value, fp)))
        fixed_strip = Strip(fixed).crop_extend(0, min(self.fixed_width, width), base)
        room = max(0, width - self.fixed_width)
        cell_strip = Strip(cells).crop_extend(scroll_x, scroll_x + room, base)
        return Strip.join([fixed_strip, cell_strip])

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

    def action_pan(self, direction: int) -> None:
        self.scroll_to(x=max(0, self.scroll_x + direction * CELL), animate=False, immediate=True)

    def action_next_quantity(self) -> None:
        qs = self.matrix.quantities()
        if qs:
            self.quantity = qs[(qs.index(self.quantity) + 1) % len(qs)] if self.quantity in qs else qs[0]

    def action_toggle_all(self) -> None:
        blocks = self.matrix.blocks()
        current = self.rows[self.cursor].block if self.rows else None
        self.collapsed = set() if self.collapsed else set(blocks)
        self._recompute()
        self._cursor_to_block(current)

    def action_toggle_block(self) -> None:
        if not self.rows:
            return
        block = self.rows[self.cursor].block
        self.collapsed ^= {block}
        self._recompute()
        self._cursor_to_block(block)

    def _cursor_to_block(self, block: str | None) -> None:
        for i, row in enumerate(self.rows):
            if row.block == block:
                self.move_cursor(i)
                return
