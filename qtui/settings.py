"""qtui's settings between sessions: `RUNS_DIR/qtui-settings.json`, beside the database, so
each runs folder keeps its own table layout. Small JSON, written atomically; a missing or
unreadable file means the defaults (and a broken one is never overwritten silently: it is
reported and left for the user).
"""

from __future__ import annotations

import json
from pathlib import Path

SETTINGS_NAME = "qtui-settings.json"


def settings_path(runs_dir: str | Path) -> Path:
    return Path(runs_dir) / SETTINGS_NAME


def load_settings(runs_dir: str | Path) -> tuple[dict, str | None]:
    """The settings and a problem to report (None when all is well)."""
    path = settings_path(runs_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError) as exc:
        return {}, f"{path}: cannot read the settings ({exc}); using the defaults"
    if not isinstance(data, dict):
        return {}, f"{path}: not a JSON object; using the defaults"
    return data, None


def save_settings(runs_dir: str | Path, changes: dict) -> Path:
    """Merge `changes` into the stored settings and write them atomically."""
    path = settings_path(runs_dir)
    data, problem = load_settings(runs_dir)
    if problem is not None and path.exists():
        raise ValueError(problem)
    data.update(changes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
