"""Snapshot tests: the look of qtui at 80x24 and 160x50 on a fixed database.

Update after an intended change with `pytest tests/test_qtui_snapshots.py --snapshot-update`
and look at the SVGs in tests/__snapshots__/.
"""

from __future__ import annotations

import pytest

from qtui.app import QtuiApp
from qtui.components.heatmap import Heatmap
from qtui.components.sample_view import SampleView
from qtui_helpers import fill_demo, write_catalogue

SIZES = [(80, 24), (160, 50)]


@pytest.fixture
def demo(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.chdir(tmp_path)  # paths on screen are relative: the same in every run
    write_catalogue(tmp_path)
    return fill_demo(tmp_path / "runs")


def app() -> QtuiApp:
    return QtuiApp("runs", "experiments.toml", poll_interval=0.1)


async def until(pilot, condition) -> None:
    for _ in range(300):
        if condition():
            await pilot.pause(0.1)
            return
        await pilot.pause(0.05)
    raise AssertionError("the app did not get there")


async def loaded(pilot) -> None:
    a = pilot.app
    await until(pilot, lambda: a.loaded and a.catalogue is not None and a.log_pane.lines)


@pytest.mark.parametrize("size", SIZES)
def test_main_screen(snap_compare, demo, size):
    async def run_before(pilot):
        await loaded(pilot)
        pilot.app.runs_table.sort_by("fid")
        pilot.app.runs_table.select_run(demo["w4"])
        await until(pilot, lambda: pilot.app.log_pane.run_id == demo["w4"] and pilot.app.log_pane.lines)

    assert snap_compare(app(), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_heatmap_screen(snap_compare, demo, size):
    async def run_before(pilot):
        await loaded(pilot)
        pilot.app.runs_table.select_run(demo["w4"])
        await pilot.press("h")
        await until(pilot, lambda: pilot.app.screen.query(Heatmap))
        await pilot.press("down", "down", "down")

    assert snap_compare(app(), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_details_screen(snap_compare, demo, size):
    async def run_before(pilot):
        from qtui.components.details_screen import DetailsScreen

        await loaded(pilot)
        pilot.app.runs_table.select_run(demo["w4"])
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(pilot.app.screen, DetailsScreen) and pilot.app.screen.sections)

    assert snap_compare(app(), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_heatmap_sorted_with_layer_details(snap_compare, demo, size):
    async def run_before(pilot):
        await loaded(pilot)
        pilot.app.runs_table.select_run(demo["w4"])
        await pilot.press("h")
        await until(pilot, lambda: pilot.app.screen.query(Heatmap))
        await pilot.press("n", "right", "right", "s", "down", "enter")

    assert snap_compare(app(), terminal_size=size, run_before=run_before)


def test_samples_screen(snap_compare, demo):
    async def run_before(pilot):
        await loaded(pilot)
        pilot.app.runs_table.select_run(demo["w2"])
        await pilot.press("v")
        await until(pilot, lambda: len(pilot.app.screen.query(SampleView)) == 2
                    and all(v.image for v in pilot.app.screen.query(SampleView)))

    assert snap_compare(app(), terminal_size=(80, 24), run_before=run_before)


def test_bad_catalogue_modal(snap_compare, demo, tmp_path):
    (tmp_path / "experiments.toml").write_text("[experiments.broken]\nmodel = \n")

    async def run_before(pilot):
        await until(pilot, lambda: pilot.app.loaded and pilot.app.experiments_tree.error)

    assert snap_compare(app(), terminal_size=(80, 24), run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_compare_screen(snap_compare, demo, size):
    async def run_before(pilot):
        from qtui.components.compare_screen import CompareScreen

        await loaded(pilot)
        pilot.app.runs_table.select_run(demo["w4"])
        await pilot.press("C")
        screen = lambda: pilot.app.screen  # noqa: E731
        await until(pilot, lambda: isinstance(screen(), CompareScreen) and screen().paired is not None
                    and screen().query(Heatmap) and all(v.image for v in screen().query(SampleView))
                    and screen().query(SampleView))

    assert snap_compare(app(), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_plot_screen(snap_compare, demo, size):
    async def run_before(pilot):
        from qtui.components.plot_screen import PlotScreen

        await loaded(pilot)
        pilot.app.runs_table.select_run(demo["w4"])
        await pilot.press("p")
        await until(pilot, lambda: isinstance(pilot.app.screen, PlotScreen) and pilot.app.screen.points)

    assert snap_compare(app(), terminal_size=size, run_before=run_before)


def test_compare_screen_other_protocol(snap_compare, demo, tmp_path):
    from engine.store import Store
    from qtui_helpers import add_run, config_for, metrics_for, write_eval

    store = Store.open(tmp_path / "runs")
    bits = {"conv": 4, "attention": 4, "linear": 4}
    short = add_run(store, "digits-rtn", "w4", metrics=metrics_for(5.9, 0.8, 4.0, 600_000, 4.8),
                    config=config_for("digits-rtn", "w4", bits, samples=100))
    write_eval(tmp_path / "runs", store.run_folder(short), "w4", n=100)
    store.close()

    async def run_before(pilot):
        from qtui.components.compare_screen import CompareScreen

        await loaded(pilot)
        pilot.app.runs_table.select_run(short)
        await pilot.press("x")
        pilot.app.runs_table.select_run(demo["fp32"])
        await pilot.press("x", "C")
        await until(pilot, lambda: isinstance(pilot.app.screen, CompareScreen)
                    and pilot.app.screen.same_protocol is not None and pilot.app.screen.query(Heatmap))
        pilot.app.clear_notifications()  # the mark toasts would time out at a machine-dependent moment
        await pilot.pause(0.1)

    assert snap_compare(app(), terminal_size=(80, 24), run_before=run_before)


def test_fisher_plot(snap_compare, demo, tmp_path):
    from engine.store import Store
    from qtui_helpers import add_run, config_for, fake_layers, metrics_for

    store = Store.open(tmp_path / "runs")
    layers = fake_layers({"conv": 4, "attention": 8, "linear": 8})
    for i, layer in enumerate(layers):
        layer["fisher"] = (layer["sensitivity"] or 0) * (1 + (i * 37 % 11) / 5) * 1e-3
    add_run(store, "digits-rtn", "w4", metrics={**metrics_for(4.5, 0.87, 5.0, 700_000, 4.8), "fisher_spearman": 0.81},
            layers=layers, config=config_for("digits-rtn", "w4", {"conv": 4}))
    store.close()

    async def run_before(pilot):
        from qtui.components.plot_screen import PlotScreen

        await loaded(pilot)
        pilot.app.runs_table.select_run(demo["w4"])
        await pilot.press("p", "f")
        await until(pilot, lambda: isinstance(pilot.app.screen, PlotScreen)
                    and pilot.app.screen.fisher_layers is not None)

    assert snap_compare(app(), terminal_size=(80, 24), run_before=run_before)
