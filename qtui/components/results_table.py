"""The runs table: every run with its status and results, filtered, sorted, best values marked.

A line-API widget rather than `DataTable`: DataTable measures every cell of every row and
re-renders on each sort, which takes seconds at 10,000 runs. Here cell texts and values are
formatted column by column in the poller's thread (`prepare`), only the visible lines are
rendered, and a re-sort is one sort of cached keys.

Keys: arrows move the cursor (left/right choose the sort column, shown in the header), `s`
sorts by that column and pressing it again reverses; clicking a header does the same.
Missing values sort last both ways. The best value of each metric column is marked among
the shown runs of the same experiment and protocol only (`qtui.protocol`); ID and Variant stay
put while the other columns scroll sideways; widths follow the shown runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.style import Style
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from qtui.columns import (
    COLUMNS, DEFAULT_LAYOUT, FROZEN, Column, best_by_group, columns_for, comparable_group, normal_layout,
    odd_protocols, sort_order,
)
from qtui.components.grid_lines import cells_strip, frozen_line, width_of
from qtui.messages import RunHighlighted
from qtui.model import RunRow

STATUS_CLASSES = {
    s: f"runs-table--{s}" for s in ("queued", "running", "done", "failed", "cancelled", "lost")
}


@dataclass
class Prepared:
    """Cell texts and raw values of some runs, computed off the UI thread for these columns."""

    texts: dict[int, tuple[str, ...]]
    values: dict[int, tuple]
    keys: tuple[str, ...] = ()  # the columns they were computed for


def prepare(runs: list[RunRow], columns: tuple[Column, ...] = COLUMNS) -> Prepared:
    """Format column by column (fast for many runs), then regroup by run."""
    value_columns = [c.values(runs) for c in columns]
    text_columns = [c.texts(runs, v) for c, v in zip(columns, value_columns)]
    ids = [run.id for run in runs]
    return Prepared(dict(zip(ids, zip(*text_columns))), dict(zip(ids, zip(*value_columns))),
                    tuple(c.key for c in columns))


class RunsTable(ScrollView, can_focus=True):
    COMPONENT_CLASSES = {
        "runs-table--header",
        "runs-table--header-cursor",
        "runs-table--cursor",
        "runs-table--best",
        "runs-table--odd",
        *STATUS_CLASSES.values(),
    }
    BINDINGS = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "jump(0)", "First", show=False),
        Binding("end", "jump(-1)", "Last", show=False),
        Binding("left", "column(-1)", "Column left", show=False),
        Binding("right", "column(1)", "Column right", show=False),
        Binding("s", "sort", "Sort", tooltip="Sort by the column under the header cursor (left/right "
                "choose it); again reverses. Clicking a header does the same"),
        Binding("c", "app.cancel_run", "Cancel", tooltip="Cancel the selected queued or running run (press twice)"),
        Binding("r", "app.rerun", "Rerun", tooltip="Re-run the selected run with its stored config (press twice)"),
        Binding("enter", "app.details", "Details", show=False, tooltip="Details of the selected run"),
    ]

    def __init__(self, layout: list[str] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.column_layout = normal_layout(layout or DEFAULT_LAYOUT)  # the chosen columns, in order
        self.columns = columns_for(self.column_layout)  # every column that has cells (shown or not)
        self.sort_key = "id"  # newest first until the user sorts
        self.descending = True
        self.rows: dict[int, RunRow] = {}
        self.order: list[int] = []
        self.filter_experiment: str | None = None
        self.filter_status: str | None = None
        self.shown: list[int] = list(range(len(self.columns)))  # indices of the columns on screen
        self.cursor_row = 0
        self.cursor_col = 0  # index into `shown`
        self.best: dict[str, dict] = {}  # column -> (experiment, protocol) -> best value
        self.odd: set[int] = set()  # runs with another protocol than most of their experiment
        self._texts: dict[int, tuple[str, ...]] = {}
        self._values: dict[int, tuple] = {}  # raw column values per run: sorting and best marks
        self._filtered: list[RunRow] = []
        self._styles: dict = {}  # component styles and their combinations, per style change
        self._sort_cache: dict[str, tuple] = {}  # per sort column, until the shown runs change
        self._widths = [len(c.label) + 2 for c in self.columns]
        self.frozen = 0  # how many of the shown columns (from the left) stay put
        self._strips: dict[tuple[int, bool], tuple[Strip, Strip]] = {}
        self._selected: int | None = None

    # ---------------------------------------------------------------- data in
    def apply(self, runs: list[RunRow], removed: list[int] = (), reset: bool = False,
              prepared: Prepared | None = None) -> None:
        """Add or replace runs by id, drop removed ones, then re-filter and re-sort in place.
        `prepared` (from `prepare(runs)`, computed in another thread) saves the formatting."""
        if reset:
            self.rows.clear()
            self._texts.clear()
            self._values.clear()
        for run_id in removed:
            self.rows.pop(run_id, None)
            self._texts.pop(run_id, None)
            self._values.pop(run_id, None)
        keys = tuple(c.key for c in self.columns)
        if prepared is None or prepared.keys != keys or prepared.texts.keys() != {r.id for r in runs}:
            prepared = prepare(runs, self.columns)
        self.rows.update((run.id, run) for run in runs)
        self._texts.update(prepared.texts)
        self._values.update(prepared.values)
        self._rebuild()

    def set_layout(self, layout: list[str]) -> None:
        """Show these columns in this order (id and variant stay first)."""
        self.column_layout = normal_layout(layout)
        columns = columns_for(self.column_layout)
        if [c.key for c in columns] != [c.key for c in self.columns]:
            self.columns = columns
            prepared = prepare(list(self.rows.values()), columns)
            self._texts, self._values = prepared.texts, prepared.values
            if self.sort_key not in {c.key for c in columns}:
                self.sort_key, self.descending = "id", True
        self._rebuild()

    def set_filter(self, experiment: str | None = ..., status: str | None = ...) -> None:  # type: ignore[assignment]
        if experiment is not ...:
            self.filter_experiment = experiment
        if status is not ...:
            self.filter_status = status
        self._rebuild()

    def sort_by(self, key: str, descending: bool | None = None) -> None:
        """Sort by a column; without `descending`, the same column again reverses the order."""
        if descending is None:
            descending = not self.descending if key == self.sort_key else False
        self.sort_key, self.descending = key, descending
        self._rebuild(refilter=False)
        index = self.column_index(key)
        if index is not None:
            self.cursor_col = index
        self.post_message(self.SortChanged(key, descending))

    def _rebuild(self, refilter: bool = True) -> None:
        """Filter (unless only the order changed), sort, and lay out again."""
        if refilter:
            experiment, status = self.filter_experiment, self.filter_status
            self._filtered = [
                r
                for r in self.rows.values()
                if (experiment is None or r.experiment == experiment)
                and (status is None or r.status == status)
            ]
            self.best = best_by_group(self._filtered, [self._values[r.id] for r in self._filtered],
                                      self.columns)
            self.odd = odd_protocols(self._filtered)
            self._choose_columns(self._filtered)
            self._measure()
            self._sort_cache.clear()
        self.order = self._sorted_ids()
        self._strips.clear()
        if self._selected is not None and self._selected in self.rows:
            try:
                self.cursor_row = self.order.index(self._selected)
            except ValueError:
                pass
        self.cursor_row = max(0, min(self.cursor_row, len(self.order) - 1))
        self.virtual_size = Size(self.frozen_width + self.scrolled_width, len(self.order) + 1)
        self._after_cursor_move()
        self.refresh()

    def _sorted_ids(self) -> list[int]:
        """The shown runs in sort order (`qtui.columns.sort_order`: missing values last both
        ways, ties in id order). Each column's ids and keys are kept until the shown runs
        change, so a re-sort is one sort."""
        cached = self._sort_cache.get(self.sort_key)
        if cached is None:
            index = [c.key for c in self.columns].index(self.sort_key)
            ids = sorted(r.id for r in self._filtered)
            cached = self._sort_cache[self.sort_key] = (ids, [self._values[i][index] for i in ids])
        ids, keys = cached
        return sort_order(ids, keys, self.descending)

    def _measure(self) -> None:
        """Column widths from the shown runs only (and the headers)."""
        widths = [len(c.label) + 2 for c in self.columns]
        texts = [self._texts[r.id] for r in self._filtered]
        for i in self.shown:
            longest = max((len(t[i]) for t in texts), default=0)
            widths[i] = max(widths[i], longest)
        self._widths = widths

    @property
    def frozen_width(self) -> int:
        return width_of([self._widths[i] for i in self.shown[: self.frozen]])

    @property
    def scrolled_width(self) -> int:
        return width_of([self._widths[i] for i in self.shown[self.frozen:]], lead=False)

    def _choose_columns(self, rows: list[RunRow]) -> None:
        """The layout's columns, less the experiment column when one experiment is shown and
        CLIP where no run has a CLIP score; the cursor stays on its column."""
        current = self.columns[self.shown[self.cursor_col]].key if self.shown else None
        hidden = set()
        if self.filter_experiment is not None:
            hidden.add("experiment")
        if not any("clip_score" in r.metrics for r in rows):
            hidden.add("clip")
        index = {c.key: i for i, c in enumerate(self.columns)}
        self.shown = [index[k] for k in self.column_layout if k in index and k not in hidden]
        self.frozen = sum(1 for i in self.shown[: len(FROZEN)] if self.columns[i].key in FROZEN)
        index = self.column_index(current) if current else None
        self.cursor_col = index if index is not None else min(self.cursor_col, len(self.shown) - 1)

    def column_index(self, key: str) -> int | None:
        """Position of a column among those on screen."""
        for position, i in enumerate(self.shown):
            if self.columns[i].key == key:
                return position
        return None

    # ---------------------------------------------------------------- data out
    @property
    def selected(self) -> RunRow | None:
        if not self.order:
            return None
        return self.rows.get(self.order[self.cursor_row])

    def style(self, name: str) -> Style:
        """A component style (or "base", the widget's own), looked up once per style change
        rather than per cell: resolving styles costs more than drawing the lines."""
        style = self._styles.get(name)
        if style is None:
            style = self.rich_style if name == "base" else self.get_component_rich_style(name)
            self._styles[name] = style
        return style

    def cell_styles(self, is_cursor: bool) -> dict[str, Style]:
        """Styles of a row's cells: "plain", "best" and one per status, with the cursor on top."""
        key = ("cells", is_cursor)
        styles = self._styles.get(key)
        if styles is None:
            base = self.style("base")
            top = self.style("runs-table--cursor") if is_cursor else Style()
            styles = {"plain": base + top, "best": base + self.style("runs-table--best") + top,
                      "odd": base + self.style("runs-table--odd") + top}
            for status, name in STATUS_CLASSES.items():
                styles[status] = base + self.style(name) + top
            self._styles[key] = styles
        return styles

    # ---------------------------------------------------------------- rendering
    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.scrollable_content_region.width
        fill = self.style("base")
        if y == 0:
            frozen, scrolled = self._header()
        else:
            index = scroll_y + y - 1
            if index >= len(self.order):
                return Strip.blank(width, fill)
            is_cursor = index == self.cursor_row
            if is_cursor:
                fill = self.cell_styles(True)["plain"]
            frozen, scrolled = self._row(self.order[index], is_cursor)
        return frozen_line(frozen, self.frozen_width, scrolled, scroll_x, width, fill)

    def _header(self) -> tuple[Strip, Strip]:
        base = self.style("base") + self.style("runs-table--header")
        cursor = self.style("runs-table--header-cursor")
        cells = []
        for position, i in enumerate(self.shown):
            column = self.columns[i]
            label = column.label
            if column.key == self.sort_key:
                label += " ▼" if self.descending else " ▲"
            style = base + cursor if (position == self.cursor_col and self.has_focus) else base
            cells.append((label, self._widths[i], column.align, style))
        return cells_strip(cells[: self.frozen], base), cells_strip(cells[self.frozen:], base, lead=False)

    def _row(self, run_id: int, is_cursor: bool) -> tuple[Strip, Strip]:
        strips = self._strips.get((run_id, is_cursor))
        if strips is not None:
            return strips
        run, texts = self.rows[run_id], self._texts[run_id]
        styles, values, best = self.cell_styles(is_cursor), self._values[run_id], self.best
        plain = styles["plain"]
        group = comparable_group(run)
        cells = []
        for i in self.shown:
            column = self.columns[i]
            key = column.key
            if key == "status":
                style = styles.get(run.status, plain)
            elif key in best and values[i] is not None and best[key].get(group) == values[i]:
                style = styles["best"]
            elif key in ("samples", "protocol") and run_id in self.odd:
                style = styles["odd"]
            else:
                style = plain
            cells.append((texts[i], self._widths[i], column.align, style))
        strips = (cells_strip(cells[: self.frozen], plain), cells_strip(cells[self.frozen:], plain, lead=False))
        self._strips[(run_id, is_cursor)] = strips
        return strips

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._strips.clear()
        self._styles.clear()

    def on_focus(self) -> None:
        self.notify_style_update()
        self.refresh()

    def on_blur(self) -> None:
        self.notify_style_update()
        self.refresh()

    # ---------------------------------------------------------------- cursor and actions
    def _after_cursor_move(self) -> None:
        height = max(1, self.scrollable_content_region.height - 1)
        if self.cursor_row < self.scroll_y:
            self.scroll_to(y=self.cursor_row, animate=False, immediate=True)
        elif self.cursor_row >= self.scroll_y + height:
            self.scroll_to(y=self.cursor_row - height + 1, animate=False, immediate=True)
        selected = self.order[self.cursor_row] if self.order else None
        if selected != self._selected:
            self._selected = selected
            self.post_message(RunHighlighted(selected))

    def move_cursor(self, row: int) -> None:
        if not self.order:
            return
        previous = self.order[self.cursor_row] if self.cursor_row < len(self.order) else None
        self.cursor_row = max(0, min(row, len(self.order) - 1))
        for key in ((previous, True), (self.order[self.cursor_row], True)):
            self._strips.pop(key, None)
        self._after_cursor_move()
        self.refresh()

    def select_run(self, run_id: int) -> bool:
        try:
            index = self.order.index(run_id)
        except ValueError:
            return False
        self.move_cursor(index)
        return True

    def action_cursor(self, delta: int) -> None:
        self.move_cursor(self.cursor_row + delta)

    def action_page(self, direction: int) -> None:
        self.move_cursor(self.cursor_row + direction * max(1, self.scrollable_content_region.height - 2))

    def action_jump(self, where: int) -> None:
        self.move_cursor(0 if where == 0 else len(self.order) - 1)

    def column_span(self, position: int) -> tuple[int, int]:
        """Where a shown column lies on the unscrolled line (frozen columns first)."""
        if position < self.frozen:
            left = 1 + sum(self._widths[i] + 1 for i in self.shown[:position])
        else:
            left = self.frozen_width + sum(self._widths[i] + 1 for i in self.shown[self.frozen:position])
        return left, left + self._widths[self.shown[position]]

    def action_column(self, delta: int) -> None:
        self.cursor_col = max(0, min(self.cursor_col + delta, len(self.shown) - 1))
        if self.cursor_col >= self.frozen:
            left, right = self.column_span(self.cursor_col)
            left, right = left - self.frozen_width, right - self.frozen_width  # in the scrolled part
            room = self.scrollable_content_region.width - self.frozen_width
            if left < self.scroll_x:
                self.scroll_to(x=max(0, left), animate=False, immediate=True)
            elif right + 1 > self.scroll_x + room:
                self.scroll_to(x=right + 1 - room, animate=False, immediate=True)
        self.refresh()

    def action_sort(self) -> None:
        self.sort_by(self.columns[self.shown[self.cursor_col]].key)

    def column_at(self, x: int) -> int | None:
        """The position (among shown columns) of the column at virtual x, if any."""
        for position in range(len(self.shown)):
            left, right = self.column_span(position)
            if left <= x <= right:
                return position
        return None

    def on_click(self, event) -> None:
        offset = event.get_content_offset(self)
        if offset is None:
            return
        if offset.y == 0:
            x = offset.x if offset.x < self.frozen_width else offset.x + self.scroll_x
            position = self.column_at(x)
            if position is not None:
                self.cursor_col = position
                self.sort_by(self.columns[self.shown[position]].key)
        else:
            self.move_cursor(self.scroll_y + offset.y - 1)

    class SortChanged(Message):
        """The table was sorted by another column or direction."""

        def __init__(self, key: str, descending: bool) -> None:
            super().__init__()
            self.key, self.descending = key, descending
