"""How qtui's grids draw a line: cells of fixed widths separated by one space, a frozen left
part that stays put and a right part that scrolls sideways. The runs table (id and variant
frozen) and the heatmap (layer and role frozen) both draw their header and rows with this.
"""

from __future__ import annotations

from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip

Cell = tuple[str, int, str, Style]  # text, width, align ("left", "right", "center"), style


def fit(text: str, width: int, align: str = "left") -> str:
    """Text in exactly `width` cells: cut with an ellipsis, or padded on the aligned side."""
    if len(text) > width:
        return text[: max(0, width - 1)] + "…" if width > 0 else ""
    if align == "right":
        return text.rjust(width)
    if align == "center":
        return text.center(width)
    return text.ljust(width)


def cells_strip(cells: list[Cell], gap: Style, lead: bool = True) -> Strip:
    """Cells separated (and, with `lead`, preceded) by a one-space gap in style `gap`."""
    segments = [Segment(" ", gap)] if lead else []
    for text, width, align, style in cells:
        segments.append(Segment(fit(text, width, align), style))
        segments.append(Segment(" ", gap))
    return Strip(segments)


def width_of(widths: list[int], lead: bool = True) -> int:
    """Cells that `cells_strip` lays out with these widths take this many columns."""
    return sum(w + 1 for w in widths) + (1 if lead else 0)


def frozen_line(frozen: Strip, frozen_width: int, scrolled: Strip, scroll_x: int, width: int,
                fill: Style) -> Strip:
    """The frozen part as is (cut to the view), then the scrolled part from `scroll_x`."""
    left = frozen.crop_extend(0, min(frozen_width, width), fill)
    room = max(0, width - frozen_width)
    return Strip.join([left, scrolled.crop_extend(scroll_x, scroll_x + room, fill)])
