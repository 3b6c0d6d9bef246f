"""The runs table: every run with its status and results, filtered, sorted, best values marked.

A line-API widget rather than `DataTable`: DataTable measures every cell of every row and
re-renders on each sort, which takes seconds at 10,000 runs. Here cell texts and values are
formatted column by column in the poller's thread (`prepare`), only the visible lines are
rendered, and a re-sort is one sort of cached keys.

Keys: arrows move the cursor (left/right choose the sort column, shown in the header), `s`
sorts by that column and pressing it again reverses; clicking a header does the same.
Missing values sort last both ways. The best value of each metric column among the shown
rows is marked.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.segment import Segment
from rich.style import Style
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from qtui.columns import COLUMNS, Column, best_of, sort_order
from qtui.messages import RunHighlighted
from qtui.model import RunRow

STATUS_CLASSES = {
    s: f"runs-table--{s}" for s in ("queued", "running", "done", "failed", "cancelled", "lost")
}


@dataclass
class Prepared:
    """Cell texts, raw values and column widths of some runs, computed off the UI thread."""

    texts: dict[int, tuple[str, ...]]
    values: dict[int, tuple]
    widths: list[int]


def prepare(runs: list[RunRow], columns: tuple[Column, ...] = COLUMNS) -> Prepared:
    """Format column by column (fast for many runs), then regroup by run."""
    value_columns = [c.values(runs) for c in columns]
    text_columns = [c.texts(runs, v) for c, v in zip(columns, value_columns)]
    widths = [
        max(len(c.label) + 2, max(map(len, texts), default=0))
        for c, texts in zip(columns, text_columns)
    ]
    ids = [run.id for run in runs]
    return Prepared(dict(zip(ids, zip(*text_columns))), dict(zip(ids, zip(*value_columns))), widths)


def fit(text: str, width: int, align: str) -> str:
    if len(text) > width:
        return text[: max(0, width - 1)] + "…"
    return text.rjust(width) if align == "right" else text.ljust(width)


class RunsTable(ScrollView, can_focus=True):
    COMPONENT_CLASSES = {
        "runs-table--header",
        "runs-table--header-cursor",
        "runs-table--cursor",
        "runs-table--best",
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

    def __init__(self, columns: tuple[Column, ...] = COLUMNS, **kwargs) -> None:
        super().__init__(**kwargs)
        self.columns = columns
        self.sort_key = "id"  # newest first until the user sorts
        self.descending = True
        self.rows: dict[int, RunRow] = {}
        self.order: list[int] = []
        self.filter_experiment: str | None = None
        self.filter_status: str | None = None
        self.shown: list[int] = list(range(len(columns)))  # indices of the columns on screen
        self.cursor_row = 0
        self.cursor_col = 0  # index into `shown`
        self.best: dict[str, object] = {}
        self._texts: dict[int, tuple[str, ...]] = {}
        self._values: dict[int, tuple] = {}  # raw column values per run: sorting and best marks
        self._filtered: list[RunRow] = []
        self._styles: dict = {}  # component styles and their combinations, per style change
        self._sort_cache: dict[str, tuple] = {}  # per sort column, until the shown runs change
        self._widths = [len(c.label) + 2 for c in columns]
        self._strips: dict[tuple[int, bool], Strip] = {}
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
            self._widths = [len(c.label) + 2 for c in self.columns]
        for run_id in removed:
            self.rows.pop(run_id, None)
            self._texts.pop(run_id, None)
            self._values.pop(run_id, None)
        if prepared is None or prepared.texts.keys() != {r.id for r in runs}:
            prepared = prepare(runs, self.columns)
        self.rows.update((run.id, run) for run in runs)
        self._texts.update(prepared.texts)
        self._values.update(prepared.values)
        self._widths = [max(a, b) for a, b in zip(self._widths, prepared.widths)]
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
            self.best = self._best()
            self._choose_columns(self._filtered)
            self._sort_cache.clear()
        self.order = self._sorted_ids()
        self._strips.clear()
        if self._selected is not None and self._selected in self.rows:
            try:
                self.cursor_row = self.order.index(self._selected)
            except ValueError:
                pass
        self.cursor_row = max(0, min(self.cursor_row, len(self.order) - 1))
        width = sum(self._widths[i] + 1 for i in self.shown) + 1
        self.virtual_size = Size(width, len(self.order) + 1)
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

    def _best(self) -> dict[str, object]:
        """The best value of each metric column among the shown runs."""
        best = {}
        values = [self._values[r.id] for r in self._filtered]
        for i, column in enumerate(self.columns):
            if column.best:
                value = best_of((v[i] for v in values), column.best)
                if value is not None:
                    best[column.key] = value
        return best

    def _choose_columns(self, rows: list[RunRow]) -> None:
        """Hide the experiment column when one experiment is shown, and CLIP where no run
        has a CLIP score; the cursor stays on its column."""
        current = self.columns[self.shown[self.cursor_col]].key if self.shown else None
        hidden = set()
        if self.filter_experiment is not None:
            hidden.add("experiment")
        if not any("clip_score" in r.metrics for r in rows):
            hidden.add("clip")
        self.shown = [i for i, c in enumerate(self.columns) if c.key not in hidden]
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
            styles = {"plain": base + top, "best": base + self.style("runs-table--best") + top}
            for status, name in STATUS_CLASSES.items():
                styles[status] = base + self.style(name) + top
            self._styles[key] = styles
        return styles

    # ---------------------------------------------------------------- rendering
    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.scrollable_content_region.width
        if y == 0:
            strip = self._header()
        else:
            index = scroll_y + y - 1
            if index >= len(self.order):
                return Strip.blank(width, self.style("base"))
            if index == self.cursor_row:
                fill = self.cell_styles(True)["plain"]
                return self._row(self.order[index], True).crop_extend(scroll_x, scroll_x + width, fill)
            strip = self._row(self.order[index], False)
        return strip.crop_extend(scroll_x, scroll_x + width, self.style("base"))

    def _header(self) -> Strip:
        base = self.style("base") + self.style("runs-table--header")
        cursor = self.style("runs-table--header-cursor")
        segments = [Segment(" ", base)]
        for position, i in enumerate(self.shown):
            column = self.columns[i]
            label = column.label
            if column.key == self.sort_key:
                label += " ▼" if self.descending else " ▲"
            style = base + cursor if (position == self.cursor_col and self.has_focus) else base
            segments.append(Segment(fit(label, self._widths[i], column.align), style))
            segments.append(Segment(" ", base))
        return Strip(segments)

    def _row(self, run_id: int, is_cursor: bool) -> Strip:
        strip = self._strips.get((run_id, is_cursor))
        if strip is not None:
            return strip
        run, texts = self.rows[run_id], self._texts[run_id]
        styles, values, best = self.cell_styles(is_cursor), self._values[run_id], self.best
        plain = styles["plain"]
        segments = [Segment(" ", plain)]
        for i in self.shown:
            column = self.columns[i]
            if column.key == "status":
                style = styles.get(run.status, plain)
            elif column.key in best and values[i] == best[column.key]:
                style = styles["best"]
            else:
                style = plain
            segments.append(Segment(fit(texts[i], self._widths[i], column.align), style))
            segments.append(Segment(" ", plain))
        strip = Strip(segments)
        self._strips[(run_id, is_cursor)] = strip
        return strip

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
        left = 1 + sum(self._widths[i] + 1 for i in self.shown[:position])
        return left, left + self._widths[self.shown[position]]

    def action_column(self, delta: int) -> None:
        self.cursor_col = max(0, min(self.cursor_col + delta, len(self.shown) - 1))
        left, right = self.column_span(self.cursor_col)
        view = self.scrollable_content_region.width
        if left - 1 < self.scroll_x:
            self.scroll_to(x=max(0, left - 1), animate=False, immediate=True)
        elif right + 1 > self.scroll_x + view:
            self.scroll_to(x=right + 1 - view, animate=False, immediate=True)
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
            position = self.column_at(offset.x + self.scroll_x)
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
