"""qtui's queue screen on the persistent queue: order, executor, state; reorder and cancel."""

from __future__ import annotations

import time

import pytest

from engine.executor import cancel_run, pid_alive
from engine.queue_store import queued_runs
from engine.store import Store
from qtui.app import QtuiApp
from qtui.components.queue_screen import QueueScreen
from qtui_fake_worker import use_fake_worker
from qtui_helpers import fill_demo, write_catalogue

pytestmark = pytest.mark.anyio
SIZE = (100, 30)


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def wait_for(pilot, condition, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out waiting for {what}: {[n.message for n in pilot.app._notifications]}")


async def test_queue_screen_reorders_and_cancels(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NO_COLOR", raising=False)
    write_catalogue(tmp_path)
    fill_demo(tmp_path / "runs")
    use_fake_worker(monkeypatch, "hang", steps=5, delay=0.05)
    app = QtuiApp("runs", "experiments.toml", poll_interval=0.1)
    store = Store.open(tmp_path / "runs")
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.loaded and app.catalogue is not None, what="start-up")
            tree = app.experiments_tree
            tree.focus()
            tree.move_to("digits-rtn", "fp32")
            await pilot.press("space", "space", "space", "l")  # fp32, w8, w4: one runs, two wait
            await wait_for(pilot, lambda: len(queued_runs(store)) == 2 and store.runs(status="running"),
                           what="one running, two waiting")
            running = store.runs(status="running")[0]["id"]
            first, second = [r["id"] for r in queued_runs(store)]
            await pilot.press("u")
            screen = app.screen
            assert isinstance(screen, QueueScreen)
            await wait_for(pilot, lambda: len(screen.rows) == 3, what="three rows")
            cells = {run_id: c for run_id, c in screen.rows}
            assert cells[running][0] == "-" and cells[running][5] == "running" and cells[running][3] == "local"
            assert [cells[first][0], cells[second][0]] == ["1", "2"]
            assert cells[first][5] == cells[second][5] == "waiting"
            await pilot.press("down", "down", "K")  # the second waiting run goes first
            await wait_for(pilot, lambda: [r["id"] for r in queued_runs(store)] == [second, first], what="reordered")
            await wait_for(pilot, lambda: [r for r, _ in screen.rows] == [running, second, first], what="shown")
            assert screen.selected() == second  # the cursor followed it
            await pilot.press("c", "c")
            await wait_for(pilot, lambda: store.get_run(second)["status"] == "cancelled", what="cancelled")
            await wait_for(pilot, lambda: [r for r, _ in screen.rows] == [running, first], what="gone from the queue")
            await pilot.press("escape")
            assert not isinstance(app.screen, QueueScreen)
    finally:
        pid = store.get_run(running)["pid"]
        for run_id in (first, running):
            cancel_run(store, run_id)
        assert not pid_alive(pid)
