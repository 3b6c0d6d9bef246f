"""How pictures are drawn: real pixels where the terminal can show them (textual-image: the
Kitty graphics protocol or Sixel), coloured half-blocks (`qtui.halfblock`) everywhere else.

Whether the terminal speaks Kitty or Sixel can only be asked before Textual takes over the
terminal, so `qtui`'s `main()` calls `probe()` first (skipped with `--images halfblock`; it
costs at most a few tenths of a second when the terminal does not answer). Importing this
module imports nothing heavy. Modes: "auto" (pixels when the terminal can, else
half-blocks), "pixels", "halfblock"; `m` in the samples screen switches between them.
"""

from __future__ import annotations

MODES = ("auto", "halfblock", "pixels")
PIXEL_KINDS = {"SixelImage": "sixel", "TGPImage": "kitty"}
detected: str | None = None  # "sixel" or "kitty" once probe() found one; None: half-blocks only


def probe() -> str | None:
    """Ask the terminal (before Textual starts) which image protocol it speaks."""
    global detected
    # textual-image logs a warning with a traceback when the terminal does not answer its
    # cell-size query (many do not, over SSH); with no logging set up Python would print it
    # over the screen. Its fallback is fine: keep its log out of the terminal.
    import logging

    quiet = logging.getLogger("textual_image")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    try:
        import textual_image.renderable as renderable
        import textual_image.widget  # noqa: F401  (asks for the cell size, also only possible now)
    except Exception:  # not installed, or no terminal to ask
        detected = None
        return None
    detected = PIXEL_KINDS.get(renderable.Image.__name__)
    return detected


def effective(mode: str) -> str:
    """What a mode draws in this terminal: "pixels" or "halfblock"."""
    return "pixels" if mode in ("auto", "pixels") and detected else "halfblock"


def next_mode(mode: str) -> str:
    return MODES[(MODES.index(mode) + 1) % len(MODES)] if mode in MODES else "auto"


def pixel_widget_class():
    """textual-image's widget for the detected protocol."""
    from textual_image.widget import SixelImage, TGPImage

    return SixelImage if detected == "sixel" else TGPImage


def describe(mode: str) -> str:
    shown = effective(mode)
    if shown == "pixels":
        return f"images: {mode} → pixels ({detected})"
    if mode == "pixels":
        return "images: pixels asked, but this terminal shows no Kitty or Sixel images → half-blocks"
    return f"images: {mode} → half-blocks"
