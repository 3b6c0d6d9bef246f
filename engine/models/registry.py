"""Where models live: shipped names resolve to `models/NAME`, anything else is a directory.

Torch-free: used by config validation. Loading is `engine.models.loader`.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "models"
INDEX_FILE = "model_index.json"


class ModelNotFound(Exception):
    pass


def shipped_models() -> list[str]:
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / INDEX_FILE).is_file())


def resolve_model(model: str, base: Path | None = None) -> Path:
    """A shipped model name, or a directory (absolute, or relative to `base`) with a
    diffusers-style `model_index.json`."""
    candidates = []
    if (SHIPPED_DIR / model / INDEX_FILE).is_file():
        return SHIPPED_DIR / model
    path = Path(model).expanduser()
    if not path.is_absolute() and base is not None:
        candidates.append(base / path)
    candidates.append(path)
    for candidate in candidates:
        if candidate.is_dir():
            if not (candidate / INDEX_FILE).is_file():
                raise ModelNotFound(f"{candidate} has no {INDEX_FILE}: not a saved model directory")
            return candidate.resolve()
    shipped = ", ".join(shipped_models()) or "none"
    raise ModelNotFound(f"no model {model!r}: not a shipped model ({shipped}) nor a directory")
