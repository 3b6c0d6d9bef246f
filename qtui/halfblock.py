"""A PNG as terminal text: each character is '▀' with the upper pixel as foreground colour
and the lower pixel as background, so one line shows two rows of pixels.

Images wider than the space are shrunk with a box filter; small images (digit grids) are
enlarged by a whole factor with nearest-neighbour so their pixels stay crisp. Pillow is
imported only when an image is loaded. Colours are true colour; on a 256-colour terminal
Textual maps them to the nearest palette entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.color import Color
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.style import Style

UPPER_HALF = "▀"
RGB = tuple[int, int, int]


class ImageError(Exception):
    """The image cannot be shown: no file, not an image, or Pillow missing."""


@dataclass
class HalfBlockImage:
    width: int
    lines: list[list[tuple[RGB, RGB]]]  # per line: (upper, lower) pixel pairs

    @property
    def height(self) -> int:
        return len(self.lines)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        styles: dict[tuple[RGB, RGB], Style] = {}
        for line in self.lines:
            segments = []
            run_style, run_length = None, 0
            for pair in line:
                style = styles.get(pair)
                if style is None:
                    upper, lower = pair
                    style = Style(color=Color.from_rgb(*upper), bgcolor=Color.from_rgb(*lower))
                    styles[pair] = style
                if style is run_style:
                    run_length += 1
                    continue
                if run_style is not None:
                    segments.append(Segment(UPPER_HALF * run_length, run_style))
                run_style, run_length = style, 1
            if run_style is not None:
                segments.append(Segment(UPPER_HALF * run_length, run_style))
            yield from segments
            yield Segment.line()

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(self.width, self.width)


def target_size(width: int, height: int, max_width: int, max_lines: int | None) -> tuple[int, int, bool]:
    """Pixel size to render at, and whether to enlarge with nearest-neighbour.

    Only the width shrinks an image (taller ones scroll); enlargement is by a whole factor
    that keeps the image within both `max_width` and `max_lines`."""
    limit = max_width / width
    grow = limit if not max_lines else min(limit, max_lines * 2 / height)
    if grow >= 2:
        factor = int(grow)
        return width * factor, height * factor, True
    scale = min(1.0, limit)
    return max(1, int(width * scale)), max(1, int(height * scale)), False


def load_halfblock(path: str | Path, max_width: int, max_lines: int | None = None) -> HalfBlockImage:
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise ImageError(f"Pillow is not installed, cannot draw {path} ({exc})") from None
    try:
        with Image.open(path) as source:
            image = source.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise ImageError(f"{path}: not a readable image ({exc})") from None
    w, h, enlarge = target_size(image.width, image.height, max(1, max_width), max_lines)
    if (w, h) != image.size:
        method = Image.Resampling.NEAREST if enlarge else Image.Resampling.BOX
        image = image.resize((w, h), method)
    pixels = image.load()
    lines = []
    for y in range(0, h, 2):
        line = []
        for x in range(w):
            upper = pixels[x, y]
            lower = pixels[x, y + 1] if y + 1 < h else (0, 0, 0)
            line.append((upper, lower))
        lines.append(line)
    return HalfBlockImage(width=w, lines=lines)
