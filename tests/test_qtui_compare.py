"""The compare view (C, marks with x) and the plot screen (p), driven through Pilot, and the
pure functions behind them (Pareto front, the protocol message)."""

from __future__ import annotations

import time

import pytest

from engine.store import Store
from qtui.app import MAIN_SCREEN_ACTIONS, QtuiApp
from qtui.components.compare_screen import CompareScreen
from qtui.components.heatmap import Heatmap
from qtui.components.plot_screen import PlotScreen, PlotView
from qtui.components.sample_view import SampleView
from qtui.plot_data import Point, pareto_front, protocol_message
from qtui_helpers import add_run, config_for, fake_layers, fill_demo, metrics_for, write_catalogue, write_eval

SIZE = (100, 40)
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NO_COLOR", raising=False)
    write_catalogue(tmp_path)
    return fill_demo(tmp_path / "runs")


async def wait_for(pilot, condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        await pilot.pause(0.05)
    notes = [n.message for n in pilot.app._notifications]
    raise AssertionError(f"timed out waiting for {what}; notifications: {notes}")


async def select(pilot, run_id: int) -> QtuiApp:
    app = pilot.app
    await wait_for(pilot, lambda: app.loaded and app.catalogue is not None and run_id in app.runs_table.order,
                   what="runs")
    app.runs_table.focus()
    assert app.runs_table.select_run(run_id)
    await pilot.pause()
    return app


def screen_text(widget) -> str:
    from rich.console import Console

    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    content = widget.text() if isinstance(widget, PlotView) else widget.content
    console.print(content if not isinstance(content, str) else content)
    return console.export_text()


# ---------------------------------------------------------------- pure functions
def test_pareto_front_keeps_only_undominated_points():
    pts = [Point(1.0, 3.0, "fp"), Point(0.25, 3.3, "w8"), Point(0.25, 5.0, "w8 bad"),
           Point(0.13, 4.9, "w4"), Point(0.3, 6.0, "big and bad"), Point(0.07, 41.7, "w2"),
           Point(0.13, 4.9, "w4 twin")]
    front = pareto_front(pts, lower_is_better=True)
    assert [p.label for p in front] == ["w2", "w4", "w4 twin", "w8", "fp"]
    # higher is better (CLIP): the largest model with the best score dominates the worse ones
    clip = [Point(1.0, 0.31, "fp"), Point(0.5, 0.32, "w8"), Point(0.2, 0.30, "w4"), Point(0.6, 0.25, "odd")]
    assert [p.label for p in pareto_front(clip, lower_is_better=False)] == ["w4", "w8"]
    assert pareto_front([], True) == []


def test_protocol_message_says_what_differs():
    from engine.protocol import differences

    a = config_for("e", "fp", None, samples=1000)
    b = config_for("e", "fp", None, samples=100)
    assert protocol_message(differences(b, a)) == "not the same protocol: samples 100 vs 1000"


# ---------------------------------------------------------------- compare view
async def test_compare_selected_run_with_reference_paired_differences_and_verdicts(demo):
    from engine.paired_runs import compare_runs

    async with QtuiApp("runs", "experiments.toml", poll_interval=0.1).run_test(size=SIZE) as pilot:
        app = await select(pilot, demo["w4"])
        await pilot.press("C")
        await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen.paired is not None,
                       what="paired differences")
        screen = app.screen
        assert [r.id for r in screen.runs] == [demo["fp32"], demo["w4"]]  # the reference first
        assert screen.same_protocol
        (label, diffs), = screen.paired
        assert label == "w4 − fp32"
        store = Store.open("runs")
        expected = compare_runs(store, demo["w4"], demo["fp32"])
        store.close()
        assert diffs["fid"].diff == pytest.approx(expected["fid"].diff)
        assert diffs["fid"].verdict == "worse" and diffs["fid"].low > 0  # w4 drifts away from fp32
        assert diffs["prompt_acc"].verdict == "worse"
        assert diffs["clip_score"].verdict == "worse" and diffs["clip_score"].high < 0  # lower CLIP is worse
        text = screen_text(screen.query_one("#compare-paired"))
        assert "d FID" in text and "d accuracy" in text and "d CLIP" in text and "worse" in text
        assert f"{expected['fid'].diff:+.4g}" in text
        metrics = screen_text(screen.query_one("#compare-metrics"))
        assert "3.21" in metrics and "4.85" in metrics and "FID" in metrics
        # layers as a heatmap with the two runs as columns, samples side by side
        await wait_for(pilot, lambda: screen.query(Heatmap) and screen.query(SampleView), what="layers and samples")
        assert [label for _, label in screen.query_one(Heatmap).matrix.runs] == ["fp32", "w4"]
        view = screen.query_one(SampleView)
        assert view.path and view.path.endswith(f"digits-rtn-runs-{demo['fp32']}-{demo['w4']}.png")
        await pilot.press("escape")
        assert not isinstance(app.screen, CompareScreen)


async def test_marked_runs_are_compared_against_the_first_marked(demo):
    async with QtuiApp("runs", "experiments.toml", poll_interval=0.1).run_test(size=SIZE) as pilot:
        app = await select(pilot, demo["w8"])
        await pilot.press("x")
        app.runs_table.select_run(demo["w2"])
        await pilot.press("x")
        app.runs_table.select_run(demo["fp32"])
        await pilot.press("x", "x", "x")  # marked, unmarked, marked again: last
        assert app.marked == [demo["w8"], demo["w2"], demo["fp32"]]
        assert "marked" in str(app.runs_table.border_subtitle)
        await pilot.press("C")
        await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen.paired is not None,
                       what="paired differences")
        rows = dict(app.screen.paired)
        assert rows["w2 − w8"]["fid"].verdict == "worse"
        assert rows["fp32 − w8"]["fid"].verdict == "no significant difference"  # w8 is nearly exact
        assert "no significant difference" in screen_text(app.screen.query_one("#compare-paired"))


async def test_runs_of_different_protocols_get_a_plain_message_and_no_paired_differences(demo, tmp_path):
    store = Store.open(tmp_path / "runs")
    bits = {"conv": 4, "attention": 4, "linear": 4}
    short = add_run(store, "digits-rtn", "w4", metrics=metrics_for(5.9, 0.8, 4.0, 600_000, 4.8),
                    config=config_for("digits-rtn", "w4", bits, samples=100))
    write_eval(tmp_path / "runs", store.run_folder(short), "w4", n=100)
    store.close()
    async with QtuiApp("runs", "experiments.toml", poll_interval=0.1).run_test(size=SIZE) as pilot:
        app = await select(pilot, short)
        await pilot.press("x")
        app.runs_table.select_run(demo["fp32"])
        await pilot.press("x", "C")
        await wait_for(pilot, lambda: isinstance(app.screen, CompareScreen) and app.screen.same_protocol is not None,
                       what="the protocols checked")
        screen = app.screen
        assert screen.same_protocol is False
        assert f"#{short} and #{demo['fp32']}: not the same protocol: samples 100 vs 64" in screen.protocol_note
        assert "not the same protocol: samples 100 vs 64" in screen_text(screen.query_one("#compare-protocol"))
        await pilot.pause(0.5)
        assert screen.paired is None and "d FID" not in screen_text(screen.query_one("#compare-paired"))
        metrics = screen_text(screen.query_one("#compare-metrics"))
        assert "100" in metrics and "64" in metrics and "5.9" in metrics  # side by side all the same


async def test_compare_needs_two_marked_runs_or_a_reference(demo):
    async with QtuiApp("runs", "experiments.toml", poll_interval=0.1).run_test(size=SIZE) as pilot:
        app = await select(pilot, demo["mixed-a"])
        await pilot.press("C")  # digits-mixed has no other done run of its protocol
        await pilot.pause()
        assert not isinstance(app.screen, CompareScreen)
        assert any("no done reference run" in n.message for n in app._notifications)


# ---------------------------------------------------------------- plot screen
async def test_pareto_plot_marks_the_front_and_toggles_metric_and_size(demo, tmp_path):
    store = Store.open(tmp_path / "runs")
    bits = {"conv": 8, "attention": 8, "linear": 8}
    worse = add_run(store, "digits-rtn", "w8", metrics=metrics_for(5.5, 0.80, 8.0, 1_170_000, 4.9),
                    config=config_for("digits-rtn", "w8", bits))  # dominated by w4: bigger and worse
    add_run(store, "digits-rtn", "w8", metrics=metrics_for(1.0, 0.99, 8.0, 1_170_000, 4.9),
            config=config_for("digits-rtn", "w8", bits, samples=100))  # another protocol: left out
    store.close()
    async with QtuiApp("runs", "experiments.toml", poll_interval=0.1).run_test(size=SIZE) as pilot:
        app = await select(pilot, demo["w4"])
        await pilot.press("p")
        await wait_for(pilot, lambda: isinstance(app.screen, PlotScreen) and app.screen.points, what="the plot")
        screen = app.screen
        assert len(screen.points) == 5
        assert [p.label for p in screen.front] == ["w2", "w4", f"w8 #{demo['w8']}", "fp32"]
        assert f"w8 #{worse}" not in [p.label for p in screen.front]
        plot = screen_text(screen.query_one("#plot"))
        assert "fp32" in plot and "w2" in plot and "size ratio" in plot
        assert "1 of other protocols left out" in screen_text(screen.query_one("#plot-title"))
        await pilot.press("m")  # prompt accuracy: higher is better
        assert screen.quality == "prompt_acc"
        assert [p.label for p in screen.front] == ["w2", "w4", f"w8 #{demo['w8']}", "fp32"]
        await pilot.press("b")
        assert screen.size_axis == "mean_bits" and "bits per weight" in screen_text(screen.query_one("#plot"))
        await pilot.press("escape")
        assert not isinstance(app.screen, PlotScreen)


async def test_fisher_against_sensitivity_with_spearman(demo, tmp_path):
    store = Store.open(tmp_path / "runs")
    layers = fake_layers({"conv": 4, "attention": 8, "linear": 8})
    for i, layer in enumerate(layers):
        layer["fisher"] = 10.0 ** (-(i % 5)) if i != 3 else None
    fisher = add_run(store, "digits-rtn", "w4", metrics={**metrics_for(4.5, 0.87, 5.0, 700_000, 4.8),
                                                         "fisher_spearman": 0.734},
                     layers=layers, config=config_for("digits-rtn", "w4", {"conv": 4}))
    store.close()
    async with QtuiApp("runs", "experiments.toml", poll_interval=0.1).run_test(size=SIZE) as pilot:
        app = await select(pilot, demo["w4"])
        await pilot.press("p", "f")
        await wait_for(pilot, lambda: isinstance(app.screen, PlotScreen) and app.screen.fisher_layers is not None,
                       what="the Fisher run's layers")
        await pilot.pause()
        screen = app.screen
        assert screen.fisher.id == fisher
        assert f"#{fisher} w4  (Spearman 0.734)" in screen_text(screen.query_one("#plot-title"))
        with_both = sum(1 for layer in layers if layer["fisher"] and layer["sensitivity"])
        assert f"{with_both} layers" in screen_text(screen.query_one("#plot-note"))
        assert "Fisher information (log)" in screen_text(screen.query_one("#plot"))


async def test_keys_list_describes_mark_compare_and_plot(demo):
    from qtui.components.keys_screen import KeysScreen, key_rows

    async with QtuiApp("runs", "experiments.toml", poll_interval=0.1).run_test(size=SIZE) as pilot:
        app = await select(pilot, demo["w4"])
        keys = {key: text for _, rows in key_rows(app.screen) for key, text in rows}
        assert "Mark or unmark" in keys["x"] and "Compare the marked runs" in keys["C"]
        assert "Pareto" in keys["p"]
        await pilot.press("question_mark")
        assert isinstance(app.screen, KeysScreen)
        await pilot.press("escape", "p")
        await wait_for(pilot, lambda: isinstance(app.screen, PlotScreen), what="the plot screen")
        groups = dict(key_rows(app.screen, MAIN_SCREEN_ACTIONS))
        assert "Fisher" in dict(groups["Plots"])["f"] and "x" not in dict(groups["Everywhere"])
