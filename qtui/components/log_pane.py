"""The selected run's output, streamed from its `worker.log` by `qtui.log_tail.LogTailer`.

A line-API widget rather than Textual's Log, because progress lines update in place: a
progress line of the same stage as the last line replaces it, so a stage shows as one line
that counts up however many updates arrive, across chunks as well as within one. Keeps the
last `MAX_LINES` lines and follows the end unless the user scrolled up.
"""

from __future__ import annotations

import re

from rich.cells import cell_len
from rich.segment import Segment
from rich.text import Text
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip

from qtui.model import RunRow

MAX_LINES = 2000
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
ERROR_WORDS = ("Traceback", "Error", "error:", "[failed]")


class LogPane(ScrollView, can_focus=True):
    COMPONENT_CLASSES = {"log-pane--progress", "log-pane--error"}

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.run_id: int | None = None
        self.lines: list[str] = []
        self._error: list[bool] = []
        self._last_stage: str | None = None
        self._width = 0
        self.border_title = "Log"

    def follow(self, run: RunRow | None) -> None:
        """Show the title for a newly selected run; its lines come via `add_lines`."""
        self.run_id = None if run is None else run.id
        self.describe(run)

    def describe(self, run: RunRow | None) -> None:
        if run is None:
            self.border_title = "Log"
            self.border_subtitle = ""
            return
        what = f" ({run.description})" if run.description else ""
        self.border_title = Text(f"Log #{run.id} {run.experiment}/{run.variant}{what} · {run.status}")
        self.border_subtitle = Text((run.error or "")[:200])

    def clear(self) -> None:
        self.lines, self._error, self._last_stage, self._width = [], [], None, 0
        self.virtual_size = Size(0, 0)
        self.refresh()

    def add_lines(self, run_id: int, lines: list[tuple[str, str | None]], reset: bool) -> None:
        """Append (text, stage) lines of a run; stage is None for lines that are not progress."""
        if run_id != self.run_id:
            return  # a late chunk of a run that is no longer selected
        at_end = self.scroll_y >= self.max_scroll_y
        if reset:
            self.clear()
        for text, stage in lines:
            text = CONTROL.sub("�", text.expandtabs())
            if stage is not None and stage == self._last_stage and self.lines:
                self.lines[-1] = text
            else:
                self.lines.append(text)
                self._error.append(stage is None and any(w in text for w in ERROR_WORDS))
            self._last_stage = stage
            self._width = max(self._width, cell_len(text))
        if len(self.lines) > MAX_LINES:
            del self.lines[:-MAX_LINES]
            del self._error[:-MAX_LINES]
        self.virtual_size = Size(self._width + 1, len(self.lines))
        if at_end or reset:
            self.call_after_refresh(self.scroll_end, animate=False, x_axis=False)
        self.refresh()

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.scrollable_content_region.width
        base = self.rich_style
        index = scroll_y + y
        if index >= len(self.lines):
            return Strip.blank(width, base)
        text = self.lines[index]
        style = base
        if self._error[index]:
            style = base + self.get_component_rich_style("log-pane--error")
        elif text.startswith("["):
            style = base + self.get_component_rich_style("log-pane--progress")
        return Strip([Segment(text, style)]).crop_extend(scroll_x, scroll_x + width, base)
