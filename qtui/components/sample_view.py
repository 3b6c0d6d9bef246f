"""One PNG under a title and the file's path: real pixels where the terminal shows them
(textual-image, Kitty or Sixel), else half-block characters (`qtui.images` decides).

Half-blocks are decoded and scaled in a thread whenever the widget's width changes; a
missing file or a missing Pillow shows a message in place of the picture.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Group
from rich.text import Text
from textual import work
from textual.containers import Vertical
from textual.widgets import Static

from qtui import images
from qtui.halfblock import HalfBlockImage, ImageError, load_halfblock


def shown_path(path: str | Path) -> str:
    """The path relative to the working directory when it lies below it, else as is."""
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if relative.startswith("..") else relative


class SampleView(Vertical):
    def __init__(self, title: str, path: str | None, missing: str = "", mode: str = "auto", **kwargs) -> None:
        super().__init__(**kwargs)
        self.heading, self.path, self.missing = title, path, missing
        self.mode = mode
        self.image: HalfBlockImage | None = None
        self.pixels = None  # the textual-image widget when drawing real pixels
        self.problem: str | None = None
        self._loaded_width = 0

    def compose(self):
        yield Static("", classes="sample-head")
        yield Static("", classes="sample-body")

    def on_mount(self) -> None:
        self._show()

    @property
    def drawing(self) -> str:
        return images.effective(self.mode)

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        self._loaded_width = 0
        self.image = None
        self._show()
        self.on_resize()

    def on_resize(self) -> None:
        width = self.content_region.width
        if self.drawing != "halfblock" or not self.path or width <= 0 or width == self._loaded_width:
            return
        self._loaded_width = width
        self.load(self.path, width, max(8, self.app.size.height - 6))

    @work(thread=True, exclusive=True, exit_on_error=False)
    def load(self, path: str, width: int, lines: int) -> None:
        try:
            image, problem = load_halfblock(path, width, lines), None
        except ImageError as exc:
            image, problem = None, str(exc)
        self.app.call_from_thread(self._loaded, image, problem)

    def _loaded(self, image: HalfBlockImage | None, problem: str | None) -> None:
        self.image, self.problem = image, problem
        self._show()

    def _show(self) -> None:
        head = Text(self.heading, style="bold")
        body = self.query_one(".sample-body", Static)
        if self.path is None:
            self.query_one(".sample-head", Static).update(
                Group(head, Text(self.missing or "no image recorded", style="italic yellow")))
            body.display = False
            return
        head.append("\n")
        head.append("PNG: ", style="dim")
        head.append(shown_path(self.path))
        self.query_one(".sample-head", Static).update(head)
        if self.drawing == "pixels":
            self._show_pixels(body)
            return
        if self.pixels is not None:
            self.pixels.remove()
            self.pixels = None
        body.display = True
        if self.problem:
            body.update(Text(self.problem, style="bold red"))
        elif self.image is None:
            body.update(Text("loading…", style="dim"))
        else:
            body.update(self.image)

    def _show_pixels(self, body: Static) -> None:
        if self.pixels is not None:
            return
        if not Path(self.path).is_file():
            self.problem = f"{self.path}: file not found"
            body.display = True
            body.update(Text(self.problem, style="bold red"))
            return
        body.display = False
        widget = images.pixel_widget_class()(self.path, classes="sample-pixels")
        self.pixels = widget
        self.mount(widget)
