"""qtui: a terminal experiment manager for quantizing diffusion models.

The app shows the experiments of `experiments.toml` and every run of the engine's database,
launches and cancels runs through the engine's run queue, streams progress and logs, and
compares results. Three threads do the work: the poller reads the database, the launcher
writes it (and starts worker subprocesses), the log tailer follows one log file. The UI
thread only applies what they post. Nothing heavy is imported at start-up: the engine's
modules are imported inside those threads.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.worker import Worker, WorkerState

from qtui.columns import DEFAULT_LAYOUT, columns_for, metric_names
from qtui.components.error_modal import ErrorModal
from qtui.components.experiments_tree import ExperimentsTree
from qtui.components.key_footer import KeyFooter
from qtui.components.log_pane import LogPane
from qtui.components.progress_panel import ProgressPanel
from qtui.components.results_table import RunsTable
from qtui.components.results_table import prepare as prepare_cells
from qtui.launcher import Launcher
from qtui.log_tail import LogTailer, log_path
from qtui.messages import ExperimentChosen, LogLines, Notice, RunHighlighted, SnapshotReady
from qtui.model import STATUSES
from qtui.poller import PollerThread

STATUS_FILTERS = (None, *STATUSES)
CONFIRM_SECONDS = 3.0
# App actions that work on the main screen only: elsewhere their keys are free (and `q` never
# quits from another screen; escape goes back everywhere).
MAIN_SCREEN_ACTIONS = frozenset({
    "cycle_status", "heatmap", "samples", "export", "rerun_failed", "reload", "toggle_tree",
    "launch", "cancel_run", "rerun", "details", "quit_main", "columns", "queue", "mark", "compare", "plot",
})


class QtuiApp(App[None]):
    TITLE = "qtui"
    CSS_PATH = [
        "app.tcss",
        "components/error_modal.tcss",
        "components/export_screen.tcss",
        "components/screens.tcss",
    ]
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]
    BINDINGS = [
        Binding("l", "launch", "Launch", tooltip="Launch dialog: the variants chosen in the tree (or the "
                "selected run's), with samples, seed, steps and guidance to override"),
        Binding("i", "details", "Details", tooltip="Everything about the selected run: config, protocol, "
                "bits, commit, timings, error and log (enter in the table too)"),
        Binding("h", "heatmap", "Heatmap", tooltip="Per-layer heatmap of the selected run's experiment"),
        Binding("v", "samples", "Samples", tooltip="Sample grid of the selected run and its side-by-side grid"),
        Binding("f", "cycle_status", "Status", tooltip="Filter the runs by status (cycles: any, queued, "
                "running, done, failed, cancelled, lost)"),
        Binding("o", "columns", "Columns", tooltip="Choose, hide and reorder the table's columns (any "
                "stored metric can be one); kept in RUNS_DIR/qtui-settings.json"),
        Binding("x", "mark", "Mark", show=False, tooltip="Mark or unmark the selected run for comparison (C compares the marked runs)"),
        Binding("C", "compare", "Compare", show=False, tooltip="Compare the marked runs (or the selected run with its "
                "experiment's reference variant of the same protocol): metrics, paired differences, layers, samples"),
        Binding("p", "plot", "Plots", show=False, tooltip="Plots of the selected run's experiment: Pareto front of FID or CLIP "
                "against size or bits, Fisher against measured sensitivity"),
        Binding("e", "export", "Export", tooltip="Export the table as shown to CSV, Markdown, LaTeX or JSON"),
        Binding("R", "rerun_failed", "Rerun failed", show=False, tooltip="Re-run the failed runs of the experiment "
                "(press twice)"),
        Binding("u", "queue", "Queue", show=False, tooltip="The queue: order, executor, GPU or Slurm job and "
                "state; reorder (K/J) or cancel (c c) waiting runs"),
        Binding("question_mark", "toggle_keys", "Keys", tooltip="This list of keys"),
        Binding("q", "quit_main", "Quit", tooltip="Quit (main screen only; ctrl+q anywhere); running runs go on"),
        Binding("escape", "back", "Back", show=False, tooltip="Back: close this screen; on the main "
                "screen, clear the experiment and status filters"),
        Binding("ctrl+r", "reload", "Reload toml", show=False, tooltip="Reload experiments.toml"),
        Binding("t", "toggle_tree", "Tree", show=False, tooltip="Show or hide the experiments tree"),
        Binding("tab", "focus_next", "Next pane", show=False, tooltip="Move to the next pane"),
    ]

    def __init__(
        self,
        runs_dir: str | Path = "runs",
        experiments: str | Path = "experiments.toml",
        max_parallel: int = 1,
        executor=None,
        poll_interval: float = 0.5,
        image_mode: str = "auto",
    ) -> None:
        super().__init__()
        self.image_mode = image_mode  # qtui.images.MODES: how the samples screen draws pictures
        self.runs_dir = Path(runs_dir)
        self.experiments_path = Path(experiments)
        self.max_parallel = max_parallel
        self.executor = executor
        self.poll_interval = poll_interval
        self.catalogue = None
        self.progress: dict = {}
        self.snapshots = 0  # snapshots applied so far (tests and the benchmark wait on it)
        self.loaded = False  # a complete view of the database (runs and metrics) is applied
        self.db_error: str | None = None
        self._confirm: tuple[str, object, float] | None = None
        self.marked: list[int] = []  # runs marked for comparison (x), in marking order
        from qtui.settings import load_settings

        self.settings, self.settings_problem = load_settings(self.runs_dir)
        layout = self.settings.get("columns")
        self.layout = layout if isinstance(layout, list) else list(DEFAULT_LAYOUT)
        self._columns = columns_for(self.layout)  # the table's, for the poller to format cells
        # The poller starts reading now, while Textual starts up; it posts once attached.
        self.poller = PollerThread(self.runs_dir, interval=poll_interval,
                                   prepare=lambda runs: prepare_cells(runs, self._columns))
        self.poller.start()
        self.launcher: Launcher | None = None
        self.tailer: LogTailer | None = None

    # ---------------------------------------------------------------- layout and start-up
    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            yield ExperimentsTree(self.experiments_path.name, id="tree")
            with Vertical(id="right"):
                yield RunsTable(self.layout, id="runs")
                yield ProgressPanel(id="progress")
                yield LogPane(id="log")
        yield KeyFooter(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self.runs_table = self.query_one(RunsTable)
        self.experiments_tree = self.query_one(ExperimentsTree)
        self.progress_panel = self.query_one(ProgressPanel)
        self.log_pane = self.query_one(LogPane)
        self.experiments_tree.border_title = "Experiments"
        self.runs_table.focus()
        self._columns = self.runs_table.columns
        if self.settings_problem:
            self.notify(self.settings_problem, severity="warning", timeout=8)
        self._retitle()
        self.progress_panel.show({}, {}, 0)
        self.load_catalogue()
        self.poller.attach(lambda snapshot: self.post_message(SnapshotReady(snapshot)))
        self.tailer = LogTailer(lambda run_id, lines, reset: self.post_message(LogLines(run_id, lines, reset)))
        self.launcher = Launcher(
            self.runs_dir,
            notify=lambda text, error: self.post_message(Notice(text, error)),
            max_parallel=self.max_parallel,
            executor=self.executor,
            on_change=lambda: self.poller.poke(),
            experiments=self.experiments_path,
        )
        for thread in (self.tailer, self.launcher):
            thread.start()

    def on_unmount(self) -> None:
        for thread in (self.launcher, self.poller, self.tailer):
            if thread is not None:
                thread.stop()
        if self.launcher is not None and self.launcher.is_alive():
            self.launcher.join(timeout=10)  # finishes the command it is executing

    @work(thread=True, exclusive=True, group="catalogue", exit_on_error=False)
    def load_catalogue(self) -> None:
        from engine.config import load_catalogue
        from engine.errors import ConfigError

        try:
            catalogue, error = load_catalogue(self.experiments_path), None
        except ConfigError as exc:
            catalogue, error = None, str(exc)
        self.call_from_thread(self._catalogue_loaded, catalogue, error)

    def _catalogue_loaded(self, catalogue, error: str | None) -> None:
        self.catalogue = catalogue
        self.experiments_tree.set_catalogue(catalogue, error)
        if error is None:
            return
        if not self.experiments_path.exists():
            self.notify(f"{error}. Runs in the database are still shown.", severity="warning", timeout=8)
        else:
            self.push_screen(ErrorModal("experiments.toml could not be loaded", error))

    # ---------------------------------------------------------------- background messages
    def on_snapshot_ready(self, message: SnapshotReady) -> None:
        snap = message.snapshot
        try:
            with self.batch_update():
                if snap.error is not None:
                    self._database_problem(snap.error)
                if snap.runs or snap.removed or snap.reset:
                    if not snap.reset:
                        self._announce_finished(snap.runs)
                    self.runs_table.apply(snap.runs, snap.removed, snap.reset, snap.prepared)
                    self.experiments_tree.update_runs(snap.runs, snap.reset)
                    selected = self.runs_table.selected
                    if selected is not None and any(r.id == selected.id for r in snap.runs):
                        self.log_pane.describe(selected)
                if snap.progress is not None:
                    self.progress = snap.progress
                self._show_progress()
                self._retitle()
            self.snapshots += 1
            self.loaded = self.loaded or not (snap.partial or snap.error)
        finally:
            if self.poller is not None:
                self.poller.applied.set()

    def _announce_finished(self, runs) -> None:
        """A run that was queued or running and now failed, got lost or finished: say so."""
        for run in runs:
            before = self.runs_table.rows.get(run.id)
            if before is None or before.status not in ("queued", "running") or run.status == before.status:
                continue
            name = f"run #{run.id} {run.experiment}/{run.variant}"
            if run.status in ("failed", "lost"):
                reason = run.error or "its worker process is gone without reporting"
                self.notify(f"{name} {run.status}: {reason}", severity="error", timeout=10)
            elif run.status == "done":
                self.notify(f"{name} done")

    def _database_problem(self, error: str) -> None:
        if error and error != self.db_error:
            self.notify(error, title="Database", severity="warning" if "no database" in error else "error",
                        timeout=8)
        self.db_error = error or None
        self.runs_table.border_subtitle = Text(error, style="bold red") if error else ""

    def _show_progress(self) -> None:
        rows = self.runs_table.rows.values()
        running = {r.id: r for r in rows if r.status == "running"}
        queued = sum(1 for r in rows if r.status == "queued")
        self.progress_panel.show(running, self.progress, queued)

    def on_log_lines(self, message: LogLines) -> None:
        try:
            self.log_pane.add_lines(message.run_id, message.lines, message.reset)
        finally:
            if self.tailer is not None:
                self.tailer.applied.set()

    def on_notice(self, message: Notice) -> None:
        self.notify(message.text, severity="error" if message.error else "information",
                    timeout=10 if message.error else 4)

    def on_run_highlighted(self, message: RunHighlighted) -> None:
        run = self.runs_table.rows.get(message.run_id) if message.run_id is not None else None
        self.log_pane.follow(run)
        if self.tailer is not None:
            path = None if run is None else log_path(self.runs_dir, run.folder, run.id)
            self.tailer.follow(None if run is None else run.id, path)

    def on_experiment_chosen(self, message: ExperimentChosen) -> None:
        self.runs_table.set_filter(experiment=message.experiment)
        self._retitle()

    def on_runs_table_sort_changed(self) -> None:
        self._retitle()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            error = event.worker.error
            self.push_screen(ErrorModal(f"{event.worker.name} failed", f"{type(error).__name__}: {error}"))

    def _retitle(self) -> None:
        table = self.runs_table
        experiment = table.filter_experiment or "all experiments"
        status = table.filter_status or "any status"
        table.border_title = Text(f"Runs · {experiment} · {status} · {len(table.order)}/{len(table.rows)}")
        arrow = "▼" if table.descending else "▲"
        label = next((c.label for c in table.columns if c.key == table.sort_key), table.sort_key)
        note = f"sort {label} {arrow} · best in bold per experiment and protocol"
        if table.odd:
            note = f"{len(table.odd)} with another protocol (italic n) · " + note
        if self.marked:
            note = "marked " + " ".join(f"#{i}" for i in self.marked) + " (C compares) · " + note
        floor = self._fid_floor(table.filter_experiment)
        if floor is not None:
            note = f"FID floor {floor:.2f} · " + note
        if not self.db_error:
            table.border_subtitle = Text(note)

    def _fid_floor(self, experiment: str | None) -> float | None:
        if experiment is None:
            return None
        for run_id in self.runs_table.order:
            value = self.runs_table.rows[run_id].metric("fid_floor")
            if value is not None:
                return value
        return None

    # ---------------------------------------------------------------- actions
    def _confirmed(self, action: str, target: object, prompt: str) -> bool:
        """Destructive actions need the same key twice within a few seconds."""
        now = time.monotonic()
        if self._confirm and self._confirm[:2] == (action, target) and now - self._confirm[2] < CONFIRM_SECONDS:
            self._confirm = None
            return True
        self._confirm = (action, target, now)
        self.notify(prompt, severity="warning", timeout=CONFIRM_SECONDS)
        return False

    async def action_quit_main(self) -> None:
        await self.action_quit()

    async def action_quit(self) -> None:
        """Quit; running runs keep running and the scheduler goes on starting queued ones."""
        self.exit()

    def action_launch(self) -> None:
        """The launch dialog for the variants chosen in the tree or, from the table, for the
        selected run's experiment and variant."""
        from qtui.components.launch_screen import LaunchScreen

        experiment, variants = self.experiments_tree.chosen()
        run = self.runs_table.selected
        if not self.experiments_tree.has_focus and run is not None and self.catalogue is not None \
                and run.experiment in self.catalogue.experiments:
            experiment = run.experiment
            known = self.catalogue.experiments[experiment].variants
            variants = [run.variant] if run.variant in known else list(known)
        if self.catalogue is None:
            self.notify("experiments.toml is not loaded: fix it and press ctrl+r", severity="error")
        elif experiment is None:
            self.notify("move the tree cursor to an experiment or variant to launch", severity="warning")
        elif experiment not in self.catalogue.experiments:
            self.notify(f"{experiment} is not in {self.experiments_path.name}: nothing to launch", severity="warning")
        else:
            self.push_screen(LaunchScreen(self.catalogue.experiments[experiment], variants), self._launch_chosen)

    def _launch_chosen(self, request) -> None:
        if request is None or self.catalogue is None or request.experiment not in self.catalogue.experiments:
            return
        self.launcher.launch(self.catalogue.experiments[request.experiment], request.variants,
                             request.overrides, request.executor)
        self.experiments_tree.clear_marks(request.experiment)

    def action_cancel_run(self) -> None:
        run = self.runs_table.selected
        if run is None:
            return
        if run.status not in ("queued", "running", "lost"):
            self.notify(f"run #{run.id} is {run.status}: nothing to cancel", severity="warning")
        elif self._confirmed("cancel", run.id, f"press c again to cancel run #{run.id}"):
            self.launcher.cancel(run.id)

    def action_rerun(self) -> None:
        run = self.runs_table.selected
        if run is None:
            return
        if run.status == "running":
            self.notify(f"run #{run.id} is running; cancel it first", severity="warning")
        elif self._confirmed("rerun", run.id, f"press r again to re-run run #{run.id} "
                             f"({run.experiment}/{run.variant}) with its stored config"):
            self.launcher.rerun(run.id)

    def action_rerun_failed(self) -> None:
        selected = self.runs_table.selected
        experiment = self.runs_table.filter_experiment or (selected.experiment if selected else None)
        if experiment is None:
            self.notify("choose an experiment (enter in the tree) or a run first", severity="warning")
        elif self._confirmed("rerun_failed", experiment, f"press R again to re-run the failed runs of {experiment}"):
            self.launcher.rerun_failed(experiment)

    def action_cycle_status(self) -> None:
        current = STATUS_FILTERS.index(self.runs_table.filter_status)
        self.runs_table.set_filter(status=STATUS_FILTERS[(current + 1) % len(STATUS_FILTERS)])
        self._retitle()

    def action_heatmap(self) -> None:
        from qtui.components.heatmap_screen import HeatmapScreen

        selected = self.runs_table.selected
        experiment = self.runs_table.filter_experiment or (selected.experiment if selected else None)
        if experiment is None:
            self.notify("no run selected: nothing to draw", severity="warning")
            return
        runs = [r for r in self.runs_table.rows.values() if r.experiment == experiment]
        order = []
        if self.catalogue is not None and experiment in self.catalogue.experiments:
            order = list(self.catalogue.experiments[experiment].variants)
        prefer = selected.id if selected is not None and selected.experiment == experiment else None
        self.push_screen(HeatmapScreen(self.runs_dir, experiment, runs, order, prefer))

    def action_details(self) -> None:
        from qtui.components.details_screen import DetailsScreen

        run = self.runs_table.selected
        if run is None:
            self.notify("no run selected", severity="warning")
            return
        others = [r for r in self.runs_table.rows.values() if r.experiment == run.experiment]
        self.push_screen(DetailsScreen(self.runs_dir, run, others))

    def action_samples(self) -> None:
        from qtui.components.samples_screen import SamplesScreen

        run = self.runs_table.selected
        if run is None:
            self.notify("no run selected", severity="warning")
            return
        others = [r for r in self.runs_table.rows.values() if r.experiment == run.experiment]
        self.push_screen(SamplesScreen(self.runs_dir, run, others))

    def action_mark(self) -> None:
        run = self.runs_table.selected
        if run is None:
            self.notify("no run selected", severity="warning")
            return
        if run.id in self.marked:
            self.marked.remove(run.id)
        else:
            self.marked.append(run.id)
        self.notify(f"{'marked' if run.id in self.marked else 'unmarked'} run #{run.id}; "
                    f"{len(self.marked)} marked" + (" (C compares them)" if len(self.marked) > 1 else ""))
        self._retitle()

    def compare_choice(self) -> tuple[list, str | None]:
        """The runs C compares: the marked ones, else the selected run and its experiment's
        reference variant run of the same protocol; or why there are none."""
        rows = self.runs_table.rows
        if self.marked:
            runs = [rows[i] for i in self.marked if i in rows]
            return (runs, None) if len(runs) >= 2 else ([], "mark at least two runs (x) to compare them")
        run = self.runs_table.selected
        if run is None:
            return [], "no run selected"
        names = []
        if self.catalogue is not None and run.experiment in self.catalogue.experiments:
            experiment = self.catalogue.experiments[run.experiment]
            names = [experiment.reference_variant, *experiment.variants]
        peers = [r for r in rows.values() if r.experiment == run.experiment and r.protocol == run.protocol
                 and r.status == "done" and r.id != run.id]
        for name in names:
            same = [r for r in peers if r.variant == name]
            if same:
                return [max(same, key=lambda r: r.id), run], None
        return [], (f"no done reference run of {run.experiment} with run #{run.id}'s protocol: "
                    "mark runs with x to compare them")

    def action_compare(self) -> None:
        from qtui.components.compare_screen import CompareScreen

        runs, problem = self.compare_choice()
        if problem:
            self.notify(problem, severity="warning")
            return
        self.push_screen(CompareScreen(self.runs_dir, runs))

    def action_plot(self) -> None:
        from qtui.components.plot_screen import PlotScreen

        selected = self.runs_table.selected
        experiment = self.runs_table.filter_experiment or (selected.experiment if selected else None)
        if experiment is None:
            self.notify("no run selected: nothing to plot", severity="warning")
            return
        runs = [r for r in self.runs_table.rows.values() if r.experiment == experiment]
        self.push_screen(PlotScreen(self.runs_dir, experiment, runs, selected.id if selected else None))

    def action_columns(self) -> None:
        from qtui.components.columns_screen import ColumnsScreen

        metrics = metric_names(self.runs_table.rows.values())
        self.push_screen(ColumnsScreen(self.runs_table.column_layout, metrics), self._columns_chosen)

    def _columns_chosen(self, layout: list[str] | None) -> None:
        if layout is None:
            return
        from qtui.settings import save_settings

        self.runs_table.set_layout(layout)
        self._columns = self.runs_table.columns
        self._retitle()
        try:
            path = save_settings(self.runs_dir, {"columns": self.runs_table.column_layout})
        except (OSError, ValueError) as exc:
            self.notify(f"columns not saved: {exc}", severity="error", timeout=8)
            return
        self.notify(f"columns saved in {path}")

    def action_queue(self) -> None:
        from qtui.components.queue_screen import QueueScreen

        self.push_screen(QueueScreen(self.runs_dir))

    def action_export(self) -> None:
        from qtui.components.export_screen import ExportScreen

        default = str(self.runs_dir / "exports" / "results.csv")
        self.push_screen(ExportScreen(default, len(self.runs_table.order)), self._export_to)

    def _export_to(self, path: str | None) -> None:
        if path:
            self.export_table(path, list(self.runs_table.order))

    @work(thread=True, exclusive=True, group="export", exit_on_error=False)
    def export_table(self, path: str, run_ids: list[int]) -> None:
        from qtui.export import export_runs

        try:
            written = export_runs(self.runs_dir, path, run_ids)
        except Exception as exc:  # no database, unknown extension, unwritable path
            self.call_from_thread(self.notify, f"export failed: {exc}", severity="error", timeout=10)
            return
        self.call_from_thread(self.notify, f"exported {len(run_ids)} runs to {written}")

    def action_reload(self) -> None:
        self.load_catalogue()
        self.notify(f"reloading {self.experiments_path}")

    def notify(self, message: str, *, title: str = "", severity="information",
               timeout: float | None = None, markup: bool = False) -> None:
        """Notifications are plain text: run errors and paths contain brackets."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """Main-screen actions are hidden and disabled while another screen is shown."""
        if action in MAIN_SCREEN_ACTIONS and len(self.screen_stack) > 1:
            return False
        return True

    def action_toggle_keys(self) -> None:
        from qtui.components.keys_screen import KeysScreen

        if isinstance(self.screen, KeysScreen):
            self.screen.dismiss()
        else:
            self.push_screen(KeysScreen(self.screen, MAIN_SCREEN_ACTIONS))

    def action_back(self) -> None:
        """Escape: close the screen on top; on the main screen, clear the filters."""
        if len(self.screen_stack) > 1:
            self.pop_screen()
            return
        table = self.runs_table
        if table.filter_experiment is not None or table.filter_status is not None:
            table.set_filter(experiment=None, status=None)
            self._retitle()

    def action_toggle_tree(self) -> None:
        self.experiments_tree.display = not self.experiments_tree.display
        if not self.experiments_tree.display:
            self.runs_table.focus()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qtui", description="Terminal experiment manager for quantized diffusion models")
    parser.add_argument("--runs-dir", default="runs", help="directory of the run database (default: ./runs)")
    parser.add_argument("--experiments", default="experiments.toml", help="experiment catalogue (default: ./experiments.toml)")
    parser.add_argument("--max-parallel", type=int, default=1, help="runs at once from this qtui (default: 1)")
    parser.add_argument("--images", choices=("auto", "pixels", "halfblock"), default="auto",
                        help="how to draw sample grids: real pixels where the terminal shows Kitty or Sixel "
                             "images (auto), or coloured half-blocks (default: auto; m switches)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_parallel < 1:
        print("qtui: --max-parallel must be at least 1", file=sys.stderr)
        return 2
    runs_dir = Path(args.runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        print(f"qtui: {runs_dir} is not a directory", file=sys.stderr)
        return 2
    from engine.db_check import check_database  # sqlite3 only: cheap at start-up
    from engine.errors import DamagedDatabase

    try:
        check_database(runs_dir / "qtui.db")
    except DamagedDatabase as exc:
        print(f"qtui: error: {exc}", file=sys.stderr)
        return 2
    from engine.store_access import write_problem

    problem = write_problem(runs_dir)
    if problem:  # qtui queues, cancels and reruns: it needs to write (engine list/show/export only read)
        print(f"qtui: {problem} (`engine list`, `show` and `export` can read it)", file=sys.stderr)
        return 2
    if args.images != "halfblock" and sys.stdout.isatty():
        from qtui import images

        images.probe()  # only possible before Textual takes over the terminal
    QtuiApp(runs_dir, args.experiments, args.max_parallel, image_mode=args.images).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
