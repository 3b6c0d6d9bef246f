"""The real qtui app, driven headless with Pilot, on databases the tests fill themselves.

Runs are launched through the engine's real executor and run queue; only the worker module
is swapped for `qtui_fake_worker` (same command line, same store writes, no torch).
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import time
from pathlib import Path

import pytest

from engine.executor import pid_alive
from engine.store import Store
from qtui.app import QtuiApp
from qtui.columns import DEFAULT_LAYOUT, sort_rows
from qtui.components.error_modal import ErrorModal
from qtui.components.export_screen import ExportScreen
from qtui.components.heatmap import Heatmap
from qtui.components.heatmap_screen import HeatmapScreen
from qtui.components.sample_view import SampleView
from qtui.components.samples_screen import SamplesScreen
from qtui_fake_worker import use_fake_worker
from qtui_helpers import add_run, fill_demo, write_catalogue

SIZE = (80, 24)
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(autouse=True)
def colour(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)


@pytest.fixture
def demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_catalogue(tmp_path)
    ids = fill_demo(tmp_path / "runs")
    return ids


def make_app(**kwargs) -> QtuiApp:
    kwargs.setdefault("poll_interval", 0.1)
    return QtuiApp("runs", "experiments.toml", **kwargs)


async def wait_for(pilot, condition, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        await pilot.pause(0.05)
    notes = [n.message for n in pilot.app._notifications]
    raise AssertionError(f"timed out waiting for {what}; notifications: {notes}")


async def started(pilot) -> QtuiApp:
    app = pilot.app
    await wait_for(pilot, lambda: app.loaded and app.catalogue is not None, what="runs and metrics")
    await pilot.pause()
    return app


async def select_run(pilot, run_id: int) -> None:
    app = pilot.app
    app.runs_table.focus()
    await wait_for(pilot, lambda: run_id in app.runs_table.order, what=f"run {run_id} in the table")
    assert app.runs_table.select_run(run_id)
    await pilot.pause()


# ---------------------------------------------------------------- start-up and browsing
async def test_startup_shows_experiments_variants_and_all_runs(demo):
    t0 = time.perf_counter()
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        assert time.perf_counter() - t0 < 5  # about a second; generous on a shared machine
        table, tree = app.runs_table, app.experiments_tree
        assert len(table.rows) == 7 and len(table.order) == 7
        assert {r.status for r in table.rows.values()} == {"done", "failed", "cancelled"}
        assert table.order[0] == max(table.order)  # newest first
        labels = {str(node.label.plain) for node in tree._node_index.values()}
        assert any(label.startswith("digits-rtn") for label in labels)
        assert "○ w2 failed W2" in labels and "○ fp32 done FP" in labels  # status, then bits (auto dtype: FP)
        assert "7/7" in str(table.border_title)


async def test_sort_by_every_column_both_ways_from_the_keyboard(demo):
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        table = app.runs_table
        rows = list(table.rows.values())
        columns = [table.columns[i] for i in table.shown]
        assert [c.key for c in columns] == list(DEFAULT_LAYOUT)  # all shown: some runs have CLIP
        for _ in columns:
            await pilot.press("left")
        for index, column in enumerate(columns):
            assert table.cursor_col == index
            await pilot.press("s")
            assert (table.sort_key, table.descending) == (column.key, False)
            assert table.order == [r.id for r in sort_rows(rows, column, False)], column.key
            await pilot.press("s")
            assert (table.sort_key, table.descending) == (column.key, True)
            expected = [r.id for r in sort_rows(rows, column, True)]
            assert table.order == expected, column.key
            values = [column.value(table.rows[i]) for i in table.order]
            assert None not in values or values.index(None) >= len([v for v in values if v is not None])
            await pilot.press("right")


async def test_clicking_a_header_sorts_and_clicking_again_reverses(demo):
    async with make_app().run_test(size=(160, 40)) as pilot:
        app = await started(pilot)
        table = app.runs_table
        left, _ = table.column_span(table.column_index("fid"))
        x = left + 2
        await pilot.click(table, offset=(x + 1, 1))  # +1: the border; line 1 is the header
        assert (table.sort_key, table.descending) == ("fid", False)
        fids = [table.rows[i].metric("fid") for i in table.order]
        assert fids[:5] == sorted(fids[:5]) and fids[5:] == [None, None]
        await pilot.click(table, offset=(x + 1, 1))
        assert (table.sort_key, table.descending) == ("fid", True)
        fids = [table.rows[i].metric("fid") for i in table.order]
        assert fids[0] == 41.7 and fids[5:] == [None, None]  # missing values stay last


async def test_filter_by_experiment_and_status_and_best_marks(demo):
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        table, tree = app.runs_table, app.experiments_tree
        tree.focus()
        tree.move_to("digits-mixed")
        await pilot.press("enter")
        assert {table.rows[i].experiment for i in table.order} == {"digits-mixed"}
        assert len(table.order) == 2
        assert table.column_index("experiment") is None  # one experiment: its column hides
        tree.move_cursor(tree.root)
        await pilot.press("enter")
        assert len(table.order) == 7 and table.column_index("experiment") == 2  # after the frozen id, variant
        tree.move_to("digits-mixed", "attn8-conv4")
        await pilot.pause()
        await pilot.click(tree, offset=(12, tree.cursor_line + 1))  # a click filters too
        assert {table.rows[i].experiment for i in table.order} == {"digits-mixed"}
        tree.move_cursor(tree.root)
        await pilot.press("enter")
        assert set(table.best["fid"].values()) == {3.21} and set(table.best["acc"].values()) == {0.91}
        await pilot.press("f")  # queued
        assert table.filter_status == "queued" and table.order == []
        for _ in range(2):
            await pilot.press("f")  # running, then done
        assert table.filter_status == "done" and len(table.order) == 5
        await pilot.press("f")
        assert table.order == [demo["failed"]]
        assert "failed" in str(table.border_title)


async def test_log_pane_streams_the_selected_runs_output_coalesced(demo, tmp_path):
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        await select_run(pilot, demo["fp32"])
        log = app.log_pane
        await wait_for(pilot, lambda: any("fid 3.21" in line for line in log.lines), what="log lines")
        assert log.lines.count("[sampling] 64/64") == 1 and not any("[sampling] 8/64" in l for l in log.lines)
        before = len(log.lines)
        path = tmp_path / "runs" / "run-00001" / "worker.log"
        for chunk in range(3):  # progress arriving in several chunks updates one line in place
            with open(path, "a") as handle:
                for done in range(2000):
                    handle.write(f'{{"event": "progress", "stage": "sampling", "done": {chunk * 2000 + done}, '
                                 f'"total": 6000}}\n')
            await wait_for(pilot, lambda: log.lines[-1] == f"[sampling] {chunk * 2000 + 1999}/6000",
                           what=f"chunk {chunk}")
        assert log.lines[before:] == ["[sampling] 5999/6000"]
        with open(path, "a") as handle:
            handle.write("Traceback (most recent call last):\n")
            handle.write('{"event": "log", "message": "the end"}\n')
        await wait_for(pilot, lambda: log.lines[-1] == "the end", what="appended lines")
        assert log.lines[before:] == ["[sampling] 5999/6000", "Traceback (most recent call last):", "the end"]
        with open(path, "a") as handle:
            handle.writelines(f"line {i}\n" for i in range(100))
        await wait_for(pilot, lambda: log.lines[-1] == "line 99", what="many lines")
        await wait_for(pilot, lambda: log.scroll_y == log.max_scroll_y > 0, what="the end")  # follows it


# ---------------------------------------------------------------- keys
async def test_keys_escape_goes_back_and_question_mark_describes_every_key(demo):
    from qtui.components.keys_screen import KeysScreen

    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, KeysScreen)
        groups = dict(app.screen.groups)
        assert set(groups) >= {"Everywhere", "Runs table", "Experiments tree (left)"}
        everywhere = dict(groups["Everywhere"])
        assert "Per-layer heatmap" in everywhere["h"] and "main screen only" in everywhere["q"]
        assert "reverses" in dict(groups["Runs table"])["s"]
        await pilot.press("escape")
        assert not isinstance(app.screen, KeysScreen) and app.is_running
        await pilot.press("f")  # a filter, then escape clears it
        assert app.runs_table.filter_status == "queued"
        await pilot.press("escape")
        assert app.runs_table.filter_status is None and len(app.runs_table.order) == 7
        await select_run(pilot, demo["w4"])
        await pilot.press("h")
        await wait_for(pilot, lambda: bool(app.screen.query(Heatmap)), what="heatmap")
        await pilot.press("question_mark")
        groups = dict(app.screen.groups)
        assert "n" in dict(groups["Heatmap"]) and "q" not in dict(groups.get("Everywhere", []))
        await pilot.press("escape", "escape")
        assert not isinstance(app.screen, (KeysScreen, HeatmapScreen)) and app.is_running


# ---------------------------------------------------------------- columns
def line_text(widget, y: int) -> str:
    return "".join(segment.text for segment in widget.render_line(y))


async def test_columns_choose_hide_reorder_and_keep_between_sessions(demo, tmp_path):
    from qtui.components.columns_screen import ColumnsScreen
    from qtui.settings import settings_path

    store = Store.open(tmp_path / "runs")
    store.put_metrics(demo["w4"], {"quantize_s": 12.5, "fisher_spearman": 0.75})
    store.close()
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        table = app.runs_table
        await pilot.press("o")
        screen = app.screen
        assert isinstance(screen, ColumnsScreen)
        assert "m:quantize_s" in screen.hidden and "m:fisher_spearman" in screen.hidden
        assert "m:fid" not in screen.hidden  # metrics that a built-in column shows are not repeated
        options = screen.query_one("OptionList")
        options.highlighted = screen.order.index("quant")
        await pilot.press("space")  # hide the quantization column
        options.highlighted = screen.order.index("fid")
        await pilot.press("left_square_bracket", "left_square_bracket")  # FID two places left
        options.highlighted = screen.order.index("m:quantize_s")
        await pilot.press("space")  # show a stored metric
        options.highlighted = screen.order.index("id")
        await pilot.press("space", "right_square_bracket")  # id stays: frozen columns do not move
        await pilot.press("enter")
        assert not isinstance(app.screen, ColumnsScreen)
        keys = [table.columns[i].key for i in table.shown]
        assert keys[:2] == ["id", "variant"] and "quant" not in keys and keys[-1] == "m:quantize_s"
        assert keys[2:5] == ["experiment", "fid", "status"]  # two places left: before status and n
        assert table.rows[demo["w4"]].metric("quantize_s") == 12.5
        position = table.column_index("m:quantize_s")
        assert table._texts[demo["w4"]][table.shown[position]] == "12.5"
        saved = json.loads(settings_path(tmp_path / "runs").read_text())["columns"]
        assert saved == keys
        await pilot.press("o")
        await pilot.press("escape")  # cancel changes nothing
        assert [table.columns[i].key for i in table.shown] == keys

    async with make_app().run_test(size=SIZE) as pilot:  # the next session keeps them
        app = await started(pilot)
        assert [app.runs_table.columns[i].key for i in app.runs_table.shown] == keys
        assert app.runs_table.rows[demo["w4"]].metric("quantize_s") == 12.5


async def test_id_and_variant_stay_while_scrolling_and_widths_follow_the_shown_rows(demo):
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        table = app.runs_table
        await select_run(pilot, demo["w4"])
        header = line_text(table, 0)
        assert header.split()[:3] == ["ID", "▼", "Variant"]  # newest first
        for _ in range(len(table.shown)):
            await pilot.press("right")
        await pilot.pause()
        assert table.scroll_x > 0  # the last column is reached by scrolling
        header = line_text(table, 0)
        assert header.split()[:3] == ["ID", "▼", "Variant"] and "Mem MB" in header
        row = line_text(table, 1 + table.cursor_row - int(table.scroll_y))
        assert row.split()[:2] == [str(demo["w4"]), "w4"]
        quant = table.shown[table.column_index("quant")]
        wide = table._widths[quant]
        app.runs_table.set_filter(experiment="digits-rtn")
        assert table._widths[quant] == max(len("Quantization") + 2, 4)  # W8, W4, FP32: the header
        app.runs_table.set_filter(experiment="digits-mixed")
        assert table._widths[quant] == len("attention W8, conv W4, linear W8") == wide


async def test_best_marks_only_within_one_experiment_and_protocol(demo, tmp_path):
    from qtui_helpers import config_for, metrics_for

    store = Store.open(tmp_path / "runs")
    few = add_run(store, "digits-rtn", "w4", metrics=metrics_for(2.5, 0.95, 4.0, 600_000, 4.8),
                  config=config_for("digits-rtn", "w4", {"conv": 4, "attention": 4, "linear": 4}, samples=16))
    store.close()
    async with make_app().run_test(size=(160, 40)) as pilot:
        app = await started(pilot)
        table = app.runs_table
        app.runs_table.set_filter(experiment="digits-rtn")
        main = table.rows[demo["w4"]].protocol
        assert table.rows[few].protocol != main and table.rows[few].samples == 16
        assert table.best["fid"] == {("digits-rtn", main): 3.21}  # the 16-sample run is not ranked
        assert table.odd == {few}
        assert "another protocol" in str(table.border_subtitle)
        row = line_text(table, 1 + table.order.index(few))
        assert " 16 " in row


# ---------------------------------------------------------------- run details
async def test_details_show_what_how_provenance_error_config_and_log(demo, tmp_path):
    import tomllib

    from qtui.components.details_screen import DetailsScreen

    store = Store.open(tmp_path / "runs")
    store.db["runs"].update(demo["failed"], {"git_commit": "abc1234", "executor": "slurm",
                                             "versions": '{"torch": "2.14.1"}'})
    store.put_metrics(demo["failed"], {"quantize_s": 1.25, "calibration_s": 0.5})
    store.db.conn.commit()
    store.close()
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        await select_run(pilot, demo["failed"])
        await pilot.press("enter")
        assert isinstance(app.screen, DetailsScreen)
        await wait_for(pilot, lambda: app.screen.sections, what="details")
        text = {k: plain(v) for k, v in app.screen.sections.items()}
        assert "every layer w2" in text["what"] and "W2" in text["what"]
        for word in ("Samples", "64", "Seed", "Steps", "5", "Guidance", "1.0", "tiny-model"):
            assert word in text["protocol"], word
        assert "4 other run(s) of digits-rtn share this protocol; 0 do not" in text["protocol"]
        assert "abc1234" in text["origin"] and "torch 2.14.1" in text["origin"] and "slurm" in text["origin"]
        assert "lab-01" in text["origin"]
        assert "quantize_s" in text["timings"] and "1.25 s" in text["timings"] and "03:20" in text["timings"]
        assert "RuntimeError: out of memory" in text["error"]
        config = tomllib.loads(text["config"].split("\n", 2)[2])  # the TOML under its heading
        assert config["sampling"]["samples"] == 64 and config["params"]["bits"]["conv"] == 2
        assert "Traceback" in text["log"] and "worker.log" in text["log"]
        await pilot.press("escape")
        assert not isinstance(app.screen, DetailsScreen)
        await select_run(pilot, demo["fp32"])
        await pilot.press("i")
        await wait_for(pilot, lambda: isinstance(app.screen, DetailsScreen) and app.screen.sections,
                       what="details by i")
        log = plain(app.screen.sections["log"])
        assert "fid 3.21 [3.05, 3.37]" in log and "[sampling] 64/64" in log
        what = plain(app.screen.sections["what"])
        assert "22: conv: 8 × FP · linear: 2 × FP · attention: 12 × FP" in what  # bits per role from the layers
        assert "error" not in app.screen.sections


def plain(renderable) -> str:
    from rich.console import Console

    console = Console(width=200, record=True, file=open(os.devnull, "w"))
    console.print(renderable)
    return console.export_text()


# ---------------------------------------------------------------- heatmap, samples, export
async def test_heatmap_opens_cycles_quantities_and_folds_blocks(demo):
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        await select_run(pilot, demo["w4"])
        await pilot.press("h")
        assert isinstance(app.screen, HeatmapScreen)
        await wait_for(pilot, lambda: bool(app.screen.query(Heatmap)), what="heatmap")
        heatmap = app.screen.query_one(Heatmap)
        assert [label for _, label in heatmap.matrix.runs] == ["fp32", "w8", "w4", "w2"]
        assert len(heatmap.rows) == 22 and heatmap.quantity == "bits"
        assert heatmap.rows[0].fp[0] and heatmap.rows[0].values[2] == 4
        await pilot.press("q")  # q quits only from the main screen, and does nothing here
        assert app.is_running and isinstance(app.screen, HeatmapScreen) and heatmap.quantity == "bits"
        await pilot.press("n")
        assert heatmap.quantity == "weight_err"
        await pilot.press("n")
        assert heatmap.quantity == "sensitivity"  # no Fisher information in these runs
        await pilot.press("B")
        assert len(heatmap.rows) == 6 and heatmap.rows[2].label == "▸ down_blocks.0"
        await pilot.press("down", "down", "enter")  # unfold the block under the cursor
        assert len(heatmap.rows) == 11
        legend = str(app.screen.query_one("#heatmap-legend").render())
        assert "sensitivity" in legend
        await pilot.press("escape")
        assert not isinstance(app.screen, HeatmapScreen)


async def test_heatmap_runs_chosen_sorted_and_a_layers_details(demo, tmp_path):
    from qtui.components.layer_screen import LayerScreen
    from qtui.components.runs_picker import RunsPicker
    from qtui_helpers import fake_layers

    layers = fake_layers({"conv": 4, "attention": 4, "linear": 4}, seed=3)
    layers[0].update(bits=None, weight_err=None, extra=json.dumps({"reason": "embedder: kept in full precision"}))
    layers[2].update(fisher=2.5e-7, extra=json.dumps({"fisher_err": {"4": 1.5e-6, "8": 6.1e-9}, "score": 0.25}))
    store = Store.open(tmp_path / "runs")
    again = add_run(store, "digits-rtn", "w4", layers=layers)
    store.close()
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        await select_run(pilot, demo["w4"])
        await pilot.press("h")
        await wait_for(pilot, lambda: bool(app.screen.query(Heatmap)), what="heatmap")
        assert [label for _, label in app.screen.query_one(Heatmap).matrix.runs] == ["fp32", "w8", "w4", "w2"]
        await pilot.press("c")
        assert isinstance(app.screen, RunsPicker)
        await pilot.press("a", "enter")
        await wait_for(pilot, lambda: app.screen.query(Heatmap)
                       and len(app.screen.query_one(Heatmap).matrix.runs) == 5, what="five columns")
        heatmap = app.screen.query_one(Heatmap)
        labels = [label for _, label in heatmap.matrix.runs]
        assert labels == ["fp32", "w8", f"w4 #{demo['w4']}", "w2", f"w4 #{again}"]  # full names fit at 80
        assert heatmap.labels == labels and heatmap.abbreviations == []
        await pilot.press("n")  # weight error
        for _ in range(4):
            await pilot.press("right")
        assert heatmap.column == 4
        await pilot.press("s")  # largest first in the new w4 run
        values = [row.values[4] for row in heatmap.rows]
        present = [v for v in values if v is not None]
        assert present == sorted(present, reverse=True) and values[-1] is None and values[0] == max(present)
        legend = str(app.screen.query_one("#heatmap-legend").render())
        assert f"by w4 #{again}, largest first" in legend
        await pilot.press("s", "s")
        assert [row.label for row in heatmap.rows][:2] == ["conv_in", "time_embedding.linear_1"]  # model order
        heatmap.move_cursor(0)
        await pilot.press("enter")
        assert isinstance(app.screen, LayerScreen)
        text = plain(app.screen.content())
        assert "conv_in" in text and "1,000 parameters" in text and "embedder: kept in full precision" in text
        assert "FP: full-precision variant" in text  # the fp32 run's column
        await pilot.press("escape")
        heatmap.move_cursor(2)
        await pilot.press("enter")
        text = plain(app.screen.content())
        assert "fisher_err: 4: 1.5e-6  8: 6.1e-9" in text and "score: 0.25" in text and "2.5e-7" in text
        await pilot.press("escape", "escape")
        assert not isinstance(app.screen, (LayerScreen, HeatmapScreen))


async def test_sample_view_draws_pngs_and_explains_missing_ones(demo, tmp_path):
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        await select_run(pilot, demo["w2"])
        await pilot.press("v")
        assert isinstance(app.screen, SamplesScreen)
        await wait_for(pilot, lambda: len(app.screen.query(SampleView)) == 2
                       and all(v.image is not None for v in app.screen.query(SampleView)), what="images")
        grid, comparison = app.screen.query(SampleView)
        assert grid.path.endswith("grid-w2.png") and comparison.path.endswith("comparison.png")
        assert grid.image.width <= 76 and grid.image.height >= 8
        await pilot.press("escape")

        await select_run(pilot, demo["mixed-a"])  # no grid, no comparison
        await pilot.press("v")
        await wait_for(pilot, lambda: len(app.screen.query(SampleView)) == 2, what="views")
        views = list(app.screen.query(SampleView))
        assert views[0].path is None and "no sample grid" in views[0].missing
        await pilot.press("escape")

        (tmp_path / "runs" / "grid-fp32.png").unlink()
        await select_run(pilot, demo["fp32"])
        await pilot.press("v")
        await wait_for(pilot, lambda: app.screen.query(SampleView) and app.screen.query(SampleView)[0].problem,
                       what="missing-file message")
        assert "file not found" in app.screen.query(SampleView)[0].problem


async def test_images_in_pixels_where_the_terminal_can_and_half_blocks_elsewhere(demo, monkeypatch):
    from textual_image.widget import TGPImage

    from qtui import images

    async with make_app().run_test(size=SIZE) as pilot:  # a terminal without Kitty or Sixel
        app = await started(pilot)
        await select_run(pilot, demo["w2"])
        await pilot.press("v")
        await wait_for(pilot, lambda: len(app.screen.query(SampleView)) == 2
                       and all(v.image is not None for v in app.screen.query(SampleView)), what="half-blocks")
        assert all(v.drawing == "halfblock" and v.pixels is None for v in app.screen.query(SampleView))
        await pilot.press("m", "m")  # auto -> halfblock -> pixels: not available here
        assert app.image_mode == "pixels"
        assert any("no Kitty or Sixel" in n.message for n in app._notifications)
        assert all(v.pixels is None for v in app.screen.query(SampleView))

    monkeypatch.setattr(images, "detected", "kitty")  # as probe() finds in Kitty
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        await select_run(pilot, demo["w2"])
        await pilot.press("v")
        await wait_for(pilot, lambda: len(app.screen.query(SampleView)) == 2
                       and all(v.pixels is not None for v in app.screen.query(SampleView)), what="pixels")
        assert all(isinstance(v.pixels, TGPImage) and v.image is None for v in app.screen.query(SampleView))
        await pilot.press("m")  # auto -> half-blocks
        await wait_for(pilot, lambda: all(v.image is not None and v.pixels is None
                                          for v in app.screen.query(SampleView)), what="switched to half-blocks")
        await pilot.press("m")  # -> pixels again
        await wait_for(pilot, lambda: all(v.pixels is not None for v in app.screen.query(SampleView)),
                       what="pixels again")


async def test_side_by_side_grid_of_chosen_runs(demo, tmp_path):
    import numpy as np

    from engine.grids import save_samples
    from qtui.components.runs_picker import RunsPicker

    for n, key in enumerate(("w8", "w4")):
        folder = tmp_path / "runs" / f"run-{demo[key]:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        save_samples(folder / "samples.safetensors", np.full((10, 16, 16), 60 * n, dtype=np.uint8), list(range(10)))
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        await select_run(pilot, demo["w4"])
        await pilot.press("v")
        await wait_for(pilot, lambda: len(app.screen.query(SampleView)) == 2, what="views")
        await pilot.press("c")
        assert isinstance(app.screen, RunsPicker)
        from textual.widgets import SelectionList

        picker = app.screen.query_one(SelectionList)
        assert picker.selected == [demo["w4"]]
        picker.select(demo["w8"])
        await pilot.press("enter")
        expected = tmp_path / "runs" / "comparisons" / f"digits-rtn-runs-{demo['w8']}-{demo['w4']}.png"
        await wait_for(pilot, lambda: app.screen.query("#comparison-view")
                       and Path(app.screen.query_one("#comparison-view").path).resolve() == expected.resolve()
                       and app.screen.query_one("#comparison-view").image is not None, what="the new grid")
        assert expected.exists()


async def test_export_what_is_on_screen(demo, tmp_path):
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        await pilot.press("f", "f", "f")  # done runs only
        app.runs_table.sort_by("fid")
        shown = list(app.runs_table.order)
        for ext, key in ((".csv", None), (".md", "ctrl+o"), (".tex", "ctrl+l")):
            await pilot.press("e")
            assert isinstance(app.screen, ExportScreen)
            if key:
                await pilot.press(key)
            await pilot.press("enter")
            path = tmp_path / "runs" / "exports" / f"results{ext}"
            await wait_for(pilot, path.exists, what=f"{path}")
        rows = list(csv.DictReader(open(tmp_path / "runs" / "exports" / "results.csv")))
        assert [int(r["id"]) for r in rows] == shown
        md = (tmp_path / "runs" / "exports" / "results.md").read_text().splitlines()
        assert len(md) == 2 + len(shown)
        assert "\\begin{tabular}" in (tmp_path / "runs" / "exports" / "results.tex").read_text()
        await pilot.press("e")
        app.screen.query_one("Input").value = str(tmp_path / "bad.xlsx")
        await pilot.press("enter")
        await wait_for(pilot, lambda: any("unknown format" in n.message for n in app._notifications),
                       what="error notification")


# ---------------------------------------------------------------- errors never crash
async def test_bad_experiments_toml_is_shown_and_the_app_keeps_working(demo, tmp_path):
    (tmp_path / "experiments.toml").write_text("[experiments.broken]\nmodel = \n")
    async with make_app().run_test(size=SIZE) as pilot:
        app = pilot.app
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorModal), what="error modal")
        assert "not valid TOML" in app.screen.message and "experiments.toml:2" in app.screen.message
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(app.runs_table.rows) == 7, what="runs")
        assert app.experiments_tree.error and "not valid TOML" in app.experiments_tree.error
        app.experiments_tree.focus()
        await pilot.press("l")  # launching without a catalogue explains itself
        assert any("not loaded" in n.message for n in app._notifications)
        write_catalogue(tmp_path)
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.catalogue is not None, what="reloaded catalogue")
        assert app.experiments_tree.error is None


async def test_missing_database_then_runs_from_elsewhere_appear_live(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_catalogue(tmp_path)
    async with make_app().run_test(size=SIZE) as pilot:
        app = pilot.app
        await wait_for(pilot, lambda: app.db_error and "no database" in app.db_error, what="db message")
        assert "no database" in str(app.runs_table.border_subtitle)
        store = Store.open(tmp_path / "runs")  # as `engine run` in another terminal would
        run_id = add_run(store, "digits-rtn", "w4", status="queued")
        await wait_for(pilot, lambda: run_id in app.runs_table.rows, what="new run")
        assert app.db_error is None and app.runs_table.rows[run_id].status == "queued"
        store.mark_running(run_id, pid=os.getpid())
        store.add_event(run_id, "sampling", 5, 20)
        await wait_for(pilot, lambda: app.progress.get(run_id) is not None, what="progress")
        assert app.runs_table.rows[run_id].status == "running"
        assert run_id in app.progress_panel.running
        store.put_metrics(run_id, {"fid": 9.5})
        store.finish(run_id, "done")
        await wait_for(pilot, lambda: app.runs_table.rows[run_id].status == "done", what="done")
        assert app.runs_table.rows[run_id].metric("fid") == 9.5 and not app.progress_panel.running
        other = add_run(store, "digits-rtn", "w2", status="queued")
        await wait_for(pilot, lambda: other in app.runs_table.rows, what="another run")
        store.finish(other, "failed", "RuntimeError: out of memory")
        await wait_for(pilot, lambda: app.runs_table.rows[other].status == "failed", what="failed")
        messages = [n.message for n in app._notifications]
        assert f"run #{run_id} digits-rtn/w4 done" in messages
        assert f"run #{other} digits-rtn/w2 failed: RuntimeError: out of memory" in messages
        store.close()


async def test_a_running_run_whose_process_died_is_shown_lost(demo, tmp_path):
    store = Store.open(tmp_path / "runs")
    run_id = add_run(store, "digits-rtn", "w8", status="running", pid=2**22 + 12345)
    store.db["runs"].update(run_id, {"host": __import__("socket").gethostname()})
    store.db.conn.commit()
    store.close()
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        await wait_for(pilot, lambda: app.runs_table.rows[run_id].status == "lost", what="lost status")
        assert run_id not in app.progress_panel.running


# ---------------------------------------------------------------- launching runs
async def test_launch_shows_progress_until_done(demo, monkeypatch):
    use_fake_worker(monkeypatch, "done", steps=30, delay=0.05)
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        app.experiments_tree.focus()
        app.experiments_tree.move_to("digits-rtn", "w4")
        await pilot.press("l", "ctrl+s")  # the launch dialog, confirmed
        await wait_for(pilot, lambda: len(app.runs_table.rows) == 8, what="queued run")
        run_id = max(app.runs_table.rows)
        seen = []
        deadline = time.monotonic() + 30
        while app.runs_table.rows[run_id].status != "done" and time.monotonic() < deadline:
            p = app.progress.get(run_id)
            if p is not None:
                seen.append((p.stage, p.done, p.total))
            await pilot.pause(0.05)
        assert app.runs_table.rows[run_id].status == "done"
        assert ("sampling" in {s for s, _, _ in seen}), seen
        assert app.runs_table.rows[run_id].metric("fid") == 5.0 + run_id
        assert "○ w4 done" in str(app.experiments_tree._node_index[("digits-rtn", "w4")].label.plain)


async def test_launch_dialog_overrides_previews_and_confirms(demo, monkeypatch, tmp_path):
    from textual.widgets import Input, SelectionList

    from qtui.components.launch_screen import LaunchScreen

    use_fake_worker(monkeypatch, "done", steps=3, delay=0.01)
    async with make_app().run_test(size=(120, 40)) as pilot:
        app = await started(pilot)
        await select_run(pilot, demo["w4"])
        await pilot.press("l")  # from the table: the selected run's experiment and variant
        screen = app.screen
        assert isinstance(screen, LaunchScreen)
        assert screen.query_one(SelectionList).selected == ["w4"]
        preview = lambda: str(screen.query_one("#launch-preview").render())  # noqa: E731
        assert "1 run of digits-rtn: w4" in preview() and "samples 64 " in preview()
        assert "The experiment's protocol" in preview()
        screen.query_one(SelectionList).select("w8")
        screen.query_one("#launch-samples", Input).value = "abc"
        await pilot.pause()
        assert "Samples: 'abc' is not an integer" in preview() and screen.query_one("#launch-go").disabled
        await pilot.press("ctrl+s")  # refused while an input is wrong
        assert isinstance(app.screen, LaunchScreen)
        screen.query_one("#launch-samples", Input).value = "16"
        screen.query_one("#launch-seed", Input).value = "3"
        screen.query_one("#launch-guidance", Input).value = "2.5"
        await pilot.pause()
        text = preview()
        assert "2 runs of digits-rtn: w8, w4" in text and "samples 16 (instead of 64)" in text
        assert "seed 3 (instead of 0)" in text and "guidance 2.5 (instead of 1.0)" in text
        assert "executor local" in text and "ranked apart" in text
        await pilot.press("ctrl+s")
        assert not isinstance(app.screen, LaunchScreen)
        await wait_for(pilot, lambda: len(app.runs_table.rows) == 9, what="two runs")
        new = sorted(app.runs_table.rows)[-2:]
        await wait_for(pilot, lambda: all(app.runs_table.rows[i].status == "done" for i in new), what="done")
    store = Store.open(tmp_path / "runs")
    for run_id, variant in zip(new, ("w8", "w4")):
        config = json.loads(store.get_run(run_id)["config"])
        assert config["variant"] == variant
        assert config["sampling"] == {"samples": 16, "steps": 5, "guidance": 2.5, "seed": 3, "batch_size": 250}
    store.close()
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        assert app.runs_table.rows[new[0]].samples == 16 and new[0] in app.runs_table.odd
        app.experiments_tree.focus()
        app.experiments_tree.move_to("digits-rtn")
        await pilot.press("l")  # from the tree: every variant of the experiment
        assert app.screen.query_one(SelectionList).selected == ["fp32", "w8", "w4", "w2"]
        await pilot.press("escape")
        assert not isinstance(app.screen, LaunchScreen) and len(app.runs_table.rows) == 9


async def test_marked_variants_queue_behind_the_concurrency_limit(demo, monkeypatch):
    use_fake_worker(monkeypatch, "done", steps=20, delay=0.05)
    async with make_app(max_parallel=1).run_test(size=SIZE) as pilot:
        app = await started(pilot)
        tree = app.experiments_tree
        tree.focus()
        tree.move_to("digits-rtn", "w8")
        await pilot.press("space")  # marks w8, moves to w4
        await pilot.press("space")  # marks w4
        assert tree.chosen() == ("digits-rtn", ["w8", "w4"])
        await pilot.press("l", "ctrl+s")  # the launch dialog, confirmed
        await wait_for(pilot, lambda: len(app.runs_table.rows) == 9, what="two new runs")
        new = sorted(app.runs_table.rows)[-2:]
        states = set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pair = tuple(app.runs_table.rows[i].status for i in new)
            states.add(pair)
            if pair == ("done", "done"):
                break
            await pilot.pause(0.05)
        assert ("running", "running") not in states  # one at a time
        assert ("running", "queued") in states
        assert pair == ("done", "done") and not tree.marks


async def test_cancel_a_running_run(demo, monkeypatch):
    use_fake_worker(monkeypatch, "hang", steps=5, delay=0.05)
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        app.experiments_tree.focus()
        app.experiments_tree.move_to("digits-rtn", "w2")
        await pilot.press("l", "ctrl+s")  # the launch dialog, confirmed
        await wait_for(pilot, lambda: len(app.runs_table.rows) == 8
                       and app.runs_table.rows[max(app.runs_table.rows)].status == "running", what="running")
        run_id = max(app.runs_table.rows)
        pid = app.runs_table.rows[run_id].pid
        await select_run(pilot, run_id)
        await pilot.press("c")  # asks for confirmation
        await pilot.pause(0.3)
        assert app.runs_table.rows[run_id].status == "running"
        await pilot.press("c")
        await wait_for(pilot, lambda: app.runs_table.rows[run_id].status == "cancelled", what="cancelled")
        assert not pid_alive(pid)


async def test_cancel_kills_a_worker_stuck_in_a_long_operation_after_the_grace(demo, monkeypatch, tmp_path):
    """`c c` on a worker that cannot act on SIGTERM (inside a long operation): killed once the
    1 s grace of qtui.toml is over, and recorded cancelled."""
    (tmp_path / "qtui.toml").write_text("[engine]\ncancel_grace_s = 1\n")
    use_fake_worker(monkeypatch, "stuck", steps=2, delay=0.05)
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        app.experiments_tree.focus()
        app.experiments_tree.move_to("digits-rtn", "w2")
        await pilot.press("l", "ctrl+s")
        await wait_for(pilot, lambda: len(app.runs_table.rows) == 8
                       and app.runs_table.rows[max(app.runs_table.rows)].status == "running", what="running")
        run_id = max(app.runs_table.rows)
        pid = app.runs_table.rows[run_id].pid
        await select_run(pilot, run_id)
        await pilot.press("c")
        start = time.monotonic()  # before the SIGTERM that the second press sends
        await pilot.press("c")
        while pid_alive(pid) and time.monotonic() - start < 10:
            await pilot.pause(0.02)
        gone = time.monotonic() - start
        assert 1 <= gone <= 3, gone
        await wait_for(pilot, lambda: app.runs_table.rows[run_id].status == "cancelled", what="cancelled")
        assert "killed" in app.runs_table.rows[run_id].error
        await wait_for(pilot, lambda: any(n.message == f"cancelled run #{run_id} (its worker ignored SIGTERM: killed)"
                                          for n in app._notifications), what="the notice")


async def test_a_killed_worker_gets_one_status_and_a_plain_reason(demo, monkeypatch):
    import signal

    use_fake_worker(monkeypatch, "hang", steps=5, delay=0.05)
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        app.experiments_tree.focus()
        app.experiments_tree.move_to("digits-rtn", "w2")
        await pilot.press("l", "ctrl+s")
        await wait_for(pilot, lambda: len(app.runs_table.rows) == 8
                       and app.runs_table.rows[max(app.runs_table.rows)].status == "running", what="running")
        run_id = max(app.runs_table.rows)
        await wait_for(pilot, lambda: app.progress.get(run_id) and app.progress[run_id].done == 5, what="step 5")
        os.kill(app.runs_table.rows[run_id].pid, signal.SIGKILL)
        seen = set()
        deadline = time.monotonic() + 15
        while app.runs_table.rows[run_id].status != "failed" and time.monotonic() < deadline:
            seen.add(app.runs_table.rows[run_id].status)
            await pilot.pause(0.02)
        run = app.runs_table.rows[run_id]
        assert run.status == "failed" and "lost" not in seen
        assert run.error == "killed by SIGKILL (out of memory?) during sampling 5/5"
        messages = [n.message for n in app._notifications if f"#{run_id}" in n.message]
        assert messages[-1] == f"run #{run_id} digits-rtn/w2 failed: {run.error}"
        assert not any("lost" in m for m in messages)


async def test_rerun_a_failed_run_and_the_failed_runs_of_an_experiment(demo, monkeypatch):
    use_fake_worker(monkeypatch, "done", steps=3, delay=0.01)
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        await select_run(pilot, demo["mixed-b"])  # cancelled
        await pilot.press("r")  # asks first
        await pilot.pause(0.3)
        assert len(app.runs_table.rows) == 7 and any("press r again" in n.message for n in app._notifications)
        await pilot.press("r")
        await wait_for(pilot, lambda: len(app.runs_table.rows) == 8, what="re-run")
        copy = max(app.runs_table.rows)
        assert (app.runs_table.rows[copy].experiment, app.runs_table.rows[copy].variant) == ("digits-mixed", "conv8-attn4")
        await wait_for(pilot, lambda: app.runs_table.rows[copy].status == "done", what="re-run done")

        await select_run(pilot, demo["w4"])  # digits-rtn: its latest w2 failed
        await pilot.press("R", "R")
        await wait_for(pilot, lambda: len(app.runs_table.rows) == 9, what="re-run of failed runs")
        again = max(app.runs_table.rows)
        assert app.runs_table.rows[again].variant == "w2"
        await wait_for(pilot, lambda: app.runs_table.rows[again].status == "done", what="done")
        await pilot.press("R", "R")  # nothing failed any more
        await wait_for(pilot, lambda: any("no failed runs" in n.message for n in app._notifications),
                       what="nothing to re-run")
        assert len(app.runs_table.rows) == 9


async def test_quitting_leaves_runs_running_and_the_queue_goes_on(demo, monkeypatch, tmp_path):
    """Quitting stops neither the running run nor the queue: the waiting run stays queued for
    the scheduler, which starts it when the first one ends (here: cancelled after a restart)."""
    use_fake_worker(monkeypatch, "hang", steps=5, delay=0.05)
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        tree = app.experiments_tree
        tree.focus()
        tree.move_to("digits-rtn", "w8")
        await pilot.press("space", "space", "l", "ctrl+s")  # w8 runs, w4 waits behind it
        await wait_for(pilot, lambda: len(app.runs_table.rows) == 9
                       and app.runs_table.rows[max(app.runs_table.rows) - 1].status == "running", what="running")
        running, waiting = max(app.runs_table.rows) - 1, max(app.runs_table.rows)
        pid = app.runs_table.rows[running].pid
        await pilot.press("q")
    assert pid_alive(pid)
    store = Store.open(tmp_path / "runs")
    assert store.get_run(running)["status"] == "running"
    assert store.get_run(waiting)["status"] == "queued"
    from engine.queue_store import live_schedulers

    assert live_schedulers(store), "the scheduler outlives qtui"
    store.close()
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        assert app.runs_table.rows[running].status == "running"
        await wait_for(pilot, lambda: running in app.progress, what="reattached progress")
        await select_run(pilot, running)
        await pilot.press("c", "c")
        await wait_for(pilot, lambda: app.runs_table.rows[running].status == "cancelled", what="cancelled")
        await wait_for(pilot, lambda: app.runs_table.rows[waiting].status == "running", what="the next one started")
        await select_run(pilot, waiting)
        await pilot.press("c", "c")
        await wait_for(pilot, lambda: app.runs_table.rows[waiting].status == "cancelled", what="cancelled too")
    assert not pid_alive(pid)


# ---------------------------------------------------------------- end to end with the real worker
def test_launch_a_real_tiny_experiment(request, tmp_path, monkeypatch):
    """The real engine worker on a tiny model: progress reaches done, metrics and a grid."""
    tiny = request.getfixturevalue("tiny_experiments")
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.chdir(tmp_path)

    async def scenario():
        app = QtuiApp(tmp_path / "runs", tiny, poll_interval=0.2)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.catalogue is not None, what="catalogue")
            app.experiments_tree.focus()
            app.experiments_tree.move_to("tiny", "A")
            await pilot.press("l", "ctrl+s")  # the launch dialog, confirmed
            await wait_for(pilot, lambda: len(app.runs_table.rows) == 1, what="run")
            run_id = next(iter(app.runs_table.rows))
            stages = set()
            deadline = time.monotonic() + 300
            while app.runs_table.rows[run_id].status in ("queued", "running") and time.monotonic() < deadline:
                if run_id in app.progress:
                    stages.add(app.progress[run_id].stage)
                await pilot.pause(0.1)
            run = app.runs_table.rows[run_id]
            assert run.status == "done", run.error
            assert run.metric("fid") is not None and run.metric("mean_bits") is not None
            assert stages & {"load", "quantize", "sampling", "metrics", "save"}
            await select_run(pilot, run_id)
            await pilot.press("v")
            await wait_for(pilot, lambda: app.screen.query(SampleView)
                           and app.screen.query(SampleView)[0].image is not None, what="grid", timeout=20)

    asyncio.run(scenario())
