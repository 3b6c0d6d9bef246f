"""Everything about one run: what it is, how it was run, what it measured, where it came
from, how it ended, its config as TOML and the end of its log.

The run's stored row, metrics, layers and artifacts are read in a thread (`Reader`), its
`worker.log` too; the screen only lays them out. Escape goes back.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Static

from qtui.components.key_footer import KeyFooter
from qtui.log_tail import format_lines, log_path
from qtui.model import RunRow, format_duration, parse_time
from qtui.protocol import SAMPLING_KEYS, describe_protocol, protocol_key
from qtui.reader import Reader
from qtui.toml_text import to_toml
from qtui.toml_text import value as to_inline

LOG_BYTES = 256 * 1024
LOG_LINES = 400
KNOWN_COLUMNS = {
    "id", "experiment", "variant", "status", "config", "config_hash", "created_at", "started_at",
    "finished_at", "heartbeat_at", "error", "git_commit", "host", "pid", "executor", "versions", "folder",
    # the scheduler's bookkeeping (engine.queue_store): how a run waits and is claimed, not what it is
    "queue_pos", "batch", "launch", "claimed_by", "claimed_at", "cancel_requested", "ingested",
    "protocol",  # shown under Protocol
}


def number(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e6:
            return f"{value:.1f}"
        if 1e-3 <= abs(value) < 1e6:
            return f"{value:.6g}"
        return f"{value:.4e}"
    return str(value)


def role_bits(layers: list[dict]) -> str:
    """`conv: 35 × W4 · attention: 28 × W8 · linear: 13 × FP` from the layer rows."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for layer in layers:
        bits = layer.get("bits")
        counts[layer.get("role") or "?"]["FP" if bits is None else f"W{bits}"] += 1
    parts = []
    for role, c in counts.items():
        parts.append(f"{role}: " + ", ".join(f"{n} × {b}" for b, n in sorted(c.items())))
    return " · ".join(parts)


def read_log(path: Path) -> tuple[list[str], int]:
    """The last lines of a log as shown in the log pane, and how many bytes were skipped."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            handle.seek(max(0, size - LOG_BYTES))
            data = handle.read()
    except OSError as exc:
        return [f"(no log: {exc.strerror or exc}: {path})"], 0
    skipped = max(0, size - LOG_BYTES)
    if skipped and b"\n" in data:
        data = data.split(b"\n", 1)[1]
    lines = [text for text, _ in format_lines(data.decode("utf-8", "replace").splitlines())]
    return lines[-LOG_LINES:], skipped


def pairs(rows: list[tuple[str, RenderableType | str]]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for name, value in rows:
        table.add_row(name, value if not isinstance(value, str) else Text(value))
    return table


def heading(text: str) -> Text:
    return Text(f"\n{text}", style="bold underline")


class DetailsScreen(Screen[None]):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back", tooltip="Back to the runs"),
        Binding("home", "scroll('home')", "Top", show=False, tooltip="Scroll to the top"),
        Binding("end", "scroll('end')", "Log", tooltip="Scroll to the end of the log"),
    ]

    def __init__(self, runs_dir: Path, run: RunRow, others: list[RunRow] = ()) -> None:
        super().__init__()
        self.runs_dir, self.run, self.others = Path(runs_dir), run, list(others)
        self.record: dict | None = None
        self.sections: dict[str, RenderableType] = {}

    def compose(self) -> ComposeResult:
        self.sub_title = f"#{self.run.id} {self.run.experiment}/{self.run.variant}"
        with VerticalScroll(id="details"):
            yield Static(Text(f"Run #{self.run.id} {self.run.experiment}/{self.run.variant}: loading…",
                              style="bold"), id="details-body")
        yield KeyFooter(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self.query_one("#details").focus()
        self.load()

    def action_scroll(self, where: str) -> None:
        box = self.query_one("#details")
        (box.scroll_home if where == "home" else box.scroll_end)(animate=False)

    @work(thread=True, exclusive=True, exit_on_error=False)
    def load(self) -> None:
        try:
            reader = Reader(self.runs_dir)
            try:
                record = reader.run_record(self.run.id)
                metrics = reader.metrics(self.run.id)
                layers = reader.layers(self.run.id)
                artifacts = reader.artifacts(self.run.id)
            finally:
                reader.close()
        except Exception as exc:
            self.app.call_from_thread(self._show_problem, f"cannot read run #{self.run.id}: {exc}")
            return
        if record is None:
            self.app.call_from_thread(self._show_problem, f"run #{self.run.id} is no longer in the database")
            return
        log, skipped = read_log(log_path(self.runs_dir, record.get("folder"), self.run.id))
        sections = self.build(record, metrics, layers, artifacts, log, skipped)
        self.app.call_from_thread(self._show, record, sections)

    def _show_problem(self, message: str) -> None:
        self.query_one("#details-body", Static).update(Text(message, style="bold red"))

    def _show(self, record: dict, sections: dict[str, RenderableType]) -> None:
        self.record, self.sections = record, sections
        self.query_one("#details-body", Static).update(Group(*sections.values()))

    # ---------------------------------------------------------------- content
    def build(self, record: dict, metrics: dict, layers: list[dict], artifacts: list[dict],
              log: list[str], skipped: int) -> dict[str, RenderableType]:
        try:
            config = json.loads(record.get("config") or "{}")
        except ValueError:
            config = {}
        run = self.run
        out: dict[str, RenderableType] = {}
        title = Text(f"Run #{run.id} {run.experiment}/{run.variant}", style="bold")
        title.append(f"  {record.get('status')}", style="bold " + {
            "done": "green", "failed": "red", "running": "yellow", "cancelled": "bright_black"}.get(
            record.get("status") or "", ""))
        if run.status == "lost":
            title.append("  (lost: its worker process is gone)", style="bold magenta")
        out["title"] = title

        what = [("Description", config.get("description") or "—"),
                ("Quantization", run.quant or str(config.get("method") or "—"))]
        if config.get("params"):
            what.append(("Method", f"{config.get('method')} {to_inline(config['params'])}"))
        if layers:
            what.append(("Layers", f"{len(layers)}: {role_bits(layers)}"))
        out["what"] = Group(heading("What"), pairs(what))

        sampling = config.get("sampling") or {}
        model, feature = config.get("model") or {}, config.get("feature_model") or {}
        proto = [(k.capitalize(), number(sampling.get(k))) for k in SAMPLING_KEYS]
        proto.append(("Batch size", number(sampling.get("batch_size"))))
        proto.append(("Model", f"{model.get('id', '—')}  {model.get('path', '')}".strip()))
        proto.append(("Feature model", f"{feature.get('id', '—')}  {feature.get('path', '')}".strip()))
        if config.get("eval"):
            proto.append(("Evaluation", to_inline(config["eval"])))
        key = protocol_key(config)
        same = [r for r in self.others if r.experiment == run.experiment and r.id != run.id]
        alike = sum(1 for r in same if r.protocol == key)
        proto.append(("Protocol", f"{key or '—'}  {describe_protocol(config)}"))
        proto.append(("Comparable", f"{alike} other run(s) of {run.experiment} share this protocol; "
                                    f"{len(same) - alike} do not (they are ranked apart)"))
        out["protocol"] = Group(heading("Protocol"), pairs(proto))

        if metrics:
            shown = [(name, number(value)) for name, value in sorted(metrics.items()) if not name.endswith("_s")]
            out["metrics"] = Group(heading(f"Metrics ({len(metrics)})"), pairs(shown))
        times = [("Created", record.get("created_at") or "—"), ("Started", record.get("started_at") or "—"),
                 ("Finished", record.get("finished_at") or "—")]
        start, end = parse_time(record.get("started_at")), parse_time(record.get("finished_at"))
        if start is not None and end is not None:
            times.append(("Elapsed", format_duration(end - start)))
        for name, value in sorted(metrics.items()):
            if name.endswith("_s") and value is not None:
                times.append((name, f"{value:.2f} s"))
        out["timings"] = Group(heading("Timings"), pairs(times))

        try:
            versions = json.loads(record.get("versions") or "{}")
        except ValueError:
            versions = {}
        origin = [("Commit", record.get("git_commit") or "— (not recorded)"),
                  ("Versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or "—"),
                  ("Host", f"{record.get('host') or '—'}  pid {record.get('pid') or '—'}"),
                  ("Executor", record.get("executor") or "—")]
        for name in sorted(set(record) - KNOWN_COLUMNS):  # job ids, nodes, GPUs, ... when stored
            if record[name] not in (None, ""):
                origin.append((name, str(record[name])))
        origin += [("Folder", str(self.runs_dir / (record.get("folder") or ""))),
                   ("Config hash", record.get("config_hash") or "—")]
        out["origin"] = Group(heading("Provenance"), pairs(origin))

        if record.get("error"):
            out["error"] = Group(heading("Error"), Text(record["error"], style="red"))
        if artifacts:
            out["artifacts"] = Group(heading("Artifacts"),
                                     pairs([(a["kind"], a["path"]) for a in artifacts]))
        out["config"] = Group(heading("Config (TOML)"), Text(to_toml(config) or "(no config stored)"))
        where = log_path(self.runs_dir, record.get("folder"), run.id)
        note = f"Log: {where}" + (f" (last {len(log)} lines; {skipped} bytes before them)" if skipped else "")
        body = Text("\n".join(log) or "(empty)")
        out["log"] = Group(heading(note), body)
        return out
