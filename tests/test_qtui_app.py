"""The real qtui app, driven headless with Pilot, on databases the tests fill themselves.

Runs are launched through the engine's real executor and run queue; only the worker module
is swapped for `qtui_fake_worker` (same command line, same store writes, no torch).
"""

from __future__ import annotations

import asyncio
import csv
import os
import time

import pytest

from engine.executor import pid_alive
from engine.store import Store
from qtui.app import QtuiApp
from qtui.columns import COLUMNS, sort_rows
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
        assert "○ w2 failed" in labels and "○ fp32 done" in labels
        assert "7/7" in str(table.border_title)


async def test_sort_by_every_column_both_ways_from_the_keyboard(demo):
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        table = app.runs_table
        rows = list(table.rows.values())
        columns = [table.columns[i] for i in table.shown]
        assert [c.key for c in columns] == [c.key for c in COLUMNS]  # all shown: some runs have CLIP
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
        assert len(table.order) == 7 and table.column_index("experiment") == 1
        tree.move_to("digits-mixed", "attn8-conv4")
        await pilot.pause()
        await pilot.click(tree, offset=(12, tree.cursor_line + 1))  # a click filters too
        assert {table.rows[i].experiment for i in table.order} == {"digits-mixed"}
        tree.move_cursor(tree.root)
        await pilot.press("enter")
        assert table.best["fid"] == 3.21 and table.best["acc"] == 0.91
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
        await pilot.pause()
        assert log.scroll_y == log.max_scroll_y > 0  # follows the end


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
        await pilot.press("q")
        assert heatmap.quantity == "weight_err"
        await pilot.press("q")
        assert heatmap.quantity == "sensitivity"  # no Fisher information in these runs
        await pilot.press("b")
        assert len(heatmap.rows) == 6 and heatmap.rows[2].label == "▸ down_blocks.0"
        await pilot.press("down", "down", "enter")  # unfold the block under the cursor
        assert len(heatmap.rows) == 11
        legend = str(app.screen.query_one("#heatmap-legend").render())
        assert "sensitivity" in legend
        await pilot.press("escape")
        assert not isinstance(app.screen, HeatmapScreen)


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
        await pilot.press("l")
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
        await pilot.press("l")
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
        await pilot.press("l")
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


async def test_rerun_a_failed_run_and_the_failed_runs_of_an_experiment(demo, monkeypatch):
    use_fake_worker(monkeypatch, "done", steps=3, delay=0.01)
    async with make_app().run_test(size=SIZE) as pilot:
        app = await started(pilot)
        await select_run(pilot, demo["mixed-b"])  # cancelled
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
        await pilot.press("space", "space", "l")  # w8 runs, w4 waits behind it
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
            await pilot.press("l")
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
