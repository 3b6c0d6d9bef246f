"""Artifact paths survive a moved runs folder; comparison grids are per set of runs, labelled."""

from __future__ import annotations

import shutil

import numpy as np

from engine.grids import comparison_grid, comparison_path, save_samples
from engine.store import Store


def test_paths_inside_the_runs_folder_are_stored_relative_and_follow_a_move(tmp_path):
    store = Store.open(tmp_path / "runs")
    run_id = store.create_run("e", "A", {}, "h")
    grid = store.run_folder(run_id) / "grid.png"
    grid.parent.mkdir(parents=True)
    grid.write_bytes(b"png")
    store.add_artifact(run_id, "grid", grid)
    store.add_artifact(run_id, "outside", tmp_path / "elsewhere.png")
    with store.db.conn:  # a row written before paths were relative
        store.db["artifacts"].insert({"run_id": run_id, "kind": "old", "path": str(grid)})
    stored = {row["kind"]: row["path"] for row in store.db["artifacts"].rows}
    assert stored["grid"] == "run-00001/grid.png" and stored["outside"] == str(tmp_path / "elsewhere.png")
    store.close()

    shutil.move(tmp_path / "runs", tmp_path / "moved")
    store = Store.open(tmp_path / "moved")
    paths = {a["kind"]: a["path"] for a in store.artifacts(run_id)}
    assert paths["grid"] == str((tmp_path / "moved" / "run-00001" / "grid.png").resolve())
    assert open(paths["grid"], "rb").read() == b"png"  # found in its new place
    assert paths["old"] == str(grid)  # old absolute rows are read as they are
    store.close()


def test_comparison_grids_are_named_by_their_runs_and_labelled(tmp_path):
    from PIL import Image

    columns = []
    for n, name in enumerate(["fp #1", "A #2", "a-much-longer-variant-name #3"]):
        path = tmp_path / f"s{n}.safetensors"
        save_samples(path, np.full((12, 16, 16), 40 * n, dtype=np.uint8), list(range(12)))
        columns.append((name, path))
    assert comparison_path(tmp_path, "e", [3, 1, 2]).name == "e-runs-1-2-3.png"
    assert comparison_path(tmp_path, "e", [1, 2]) != comparison_path(tmp_path, "e", [1, 3])
    assert comparison_path(tmp_path, "e", list(range(20))).name.startswith("e-runs-20-")
    out = comparison_grid(columns, comparison_path(tmp_path, "e", [1, 2, 3]))
    assert out.parent.name == "comparisons"
    with Image.open(out) as image:
        pixels = np.asarray(image.convert("L"))
    grid_height = 2 * (10 * 17 + 1)
    strip = pixels[: pixels.shape[0] - grid_height]
    assert pixels.shape[1] == 2 * (3 * 17 + 1) and strip.shape[0] > 40  # long names: written upwards
    for c in range(3):  # every column has its label: dark text in its part of the strip
        assert (strip[:, 2 + c * 34: 2 + (c + 1) * 34] < 128).any(), c
    short = comparison_grid(columns[:2], tmp_path / "short.png")
    with Image.open(short) as image:
        assert image.height - grid_height < 20  # short names fit across
