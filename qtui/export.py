"""Export the results table as shown: the same runs, filtered and ordered as on screen.

The rows and their formatting are the engine's (`engine.export`), so a file written here
matches what `engine export` writes for the same runs; qtui only chooses the runs and their
order. The format follows the file's extension: .csv, .md, .tex, or .json (everything about
each run: config, metrics, layers, artifacts). Runs in a thread: it opens the engine's store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

EXTENSIONS = {".csv": "csv", ".md": "md", ".markdown": "md", ".tex": "latex", ".json": "json"}


def format_for(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in EXTENSIONS:
        raise ValueError(f"{path}: unknown format {suffix or '(no extension)'}; use .csv, .md, .tex or .json")
    return EXTENSIONS[suffix]


def render(runs_dir: str | Path, fmt: str, run_ids: Sequence[int]) -> str:
    """The engine's table of these runs, in this order, as text in the given format."""
    from engine.export import FORMATS, result_rows, to_json
    from engine.store import Store

    store = Store.open(runs_dir, create=False)
    try:
        position = {run_id: i for i, run_id in enumerate(run_ids)}
        rows = result_rows(store, run_ids=position.keys())
        rows.sort(key=lambda row: position[row["id"]])
        return to_json(store, rows) if fmt == "json" else FORMATS[fmt](rows)
    finally:
        store.close()


def export_runs(runs_dir: str | Path, path: str | Path, run_ids: Sequence[int]) -> Path:
    """Write the runs' table to `path` (parents created, replaced atomically)."""
    path = Path(path).expanduser()
    text = render(runs_dir, format_for(path), run_ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
