"""One PNG drawn with half-block characters under a title and the file's path.

The image is decoded and scaled in a thread whenever the widget's width changes; a missing
file or a missing Pillow shows a message in place of the picture.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Group
from rich.text import Text
from textual import work
from textual.widgets import Static

from qtui.halfblock import HalfBlockImage, ImageError, load_halfblock


def shown_path(path: str | Path) -> str:
    """The path relative to the working directory when it lies below it, else as is."""
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if relative.startswith("..") else relative


class SampleView(Static):
    def __init__(self, title: str, path: str | None, missing: str = "", **kwargs) -> None:
        super().__init__("", **kwargs)
        self.heading, self.path, self.missing = title, path, missing
        self.image: HalfBlockImage | None = None
        self.problem: str | None = None
        self._loaded_width = 0

    def on_mount(self) -> None:
        self._show()

    def on_resize(self) -> None:
        width = self.content_region.width
        if self.path and width > 0 and width != self._loaded_width:
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
        if self.path is None:
            self.update(Group(head, Text(self.missing or "no image recorded", style="italic yellow")))
            return
        head.append("\n")
        head.append("PNG: ", style="dim")
        head.append(shown_path(self.path))
        if self.problem:
            body = Text(self.problem, style="bold red")
        elif self.image is None:
            body = Text("loading…", style="dim")
        else:
            body = self.image
        self.update(Group(head, body))
