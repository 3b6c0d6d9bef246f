"""The launch dialog: which variants of an experiment to run, with which settings, where.

The variants chosen in the tree (or the selected run's) come ticked; samples, seed, sampler
steps and guidance may be overridden for this launch (empty: the experiment's value). The
preview says exactly what will be queued, and whether those runs share the experiment's
protocol (if not, they are ranked apart from its other runs). Ctrl+s or the Launch button
queues them, escape cancels.

Executors: only "local" today. The scale-out work adds its executors to `EXECUTORS`; the
dialog's choice travels in `LaunchRequest.executor` to the launcher.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, SelectionList, Static

from qtui.run_info import quant_label

EXECUTORS = {"local": "this machine, one worker process per run"}
# Field, label, type, minimum: the experiment's sampling keys a launch may override.
OVERRIDES = (("samples", "Samples", int, 1), ("seed", "Seed", int, 0), ("steps", "Steps", int, 1),
             ("guidance", "Guidance", float, 0.0))


@dataclass
class LaunchRequest:
    experiment: str
    variants: list[str]
    overrides: dict = field(default_factory=dict)  # sampling keys -> values differing from the experiment's
    executor: str = "local"


def parse_overrides(experiment, texts: dict[str, str]) -> tuple[dict, list[str]]:
    """The overrides typed in the dialog (only those that differ from the experiment's
    settings) and the problems with them, one line each."""
    out, problems = {}, []
    for key, label, kind, minimum in OVERRIDES:
        text = texts.get(key, "").strip()
        if not text:
            continue
        try:
            value = kind(text)
        except ValueError:
            problems.append(f"{label}: {text!r} is not {'an integer' if kind is int else 'a number'}")
            continue
        if value < minimum or (kind is float and value != value):
            problems.append(f"{label}: must be at least {minimum}, got {text}")
            continue
        if value != getattr(experiment, key):
            out[key] = value
    return out, problems


def describe_launch(experiment, variants: list[str], overrides: dict, executor: str) -> Text:
    text = Text()
    if not variants:
        return Text("No variant ticked: nothing to launch.", style="bold yellow")
    text.append(f"{len(variants)} run{'s' if len(variants) != 1 else ''} of {experiment.name}: ", style="bold")
    text.append(", ".join(variants))
    parts = []
    for key, label, _, _ in OVERRIDES:
        value = overrides.get(key, getattr(experiment, key))
        part = f"{label.lower()} {value}"
        if key in overrides:
            part += f" (instead of {getattr(experiment, key)})"
        parts.append(part)
    text.append("\n" + " · ".join(parts) + f" · executor {executor} ({EXECUTORS.get(executor, '?')})")
    if overrides:
        text.append("\nAnother protocol than the experiment's: these runs are ranked apart from its other runs.",
                    style="yellow")
    else:
        text.append("\nThe experiment's protocol: comparable with its other runs.", style="dim")
    return text


class LaunchScreen(ModalScreen[LaunchRequest | None]):
    BINDINGS = [
        Binding("escape", "cancel", "Cancel", tooltip="Close without launching"),
        Binding("ctrl+s", "launch", "Launch", priority=True, tooltip="Queue the runs shown in the preview"),
    ]

    def __init__(self, experiment, chosen: list[str]) -> None:
        super().__init__()
        self.experiment, self.chosen = experiment, set(chosen)

    def compose(self) -> ComposeResult:
        e = self.experiment
        with Vertical(id="launch-box"):
            title = Text(f"Launch {e.name}", style="bold")
            if e.description:
                title.append(f"  {e.description}", style="dim")
            yield Static(title, id="launch-title")
            with VerticalScroll(id="launch-scroll"):
                items = []
                for name, v in e.variants.items():
                    label = Text(f"{name:<12} ", style="bold")
                    label.append(quant_label({"method": v.method, "params": v.params}))
                    if v.description:
                        label.append(f"  {v.description}", style="dim")
                    items.append((label, name, name in self.chosen))
                yield Label("Variants (space ticks)")
                yield SelectionList[str](*items, id="launch-variants")
                with Horizontal(id="launch-fields"):
                    for key, label, _, _ in OVERRIDES:
                        with Vertical(classes="launch-field"):
                            yield Label(label)
                            yield Input(placeholder=str(getattr(e, key)), id=f"launch-{key}")
                    with Vertical(classes="launch-field"):
                        yield Label("Executor")
                        yield Select([(name, name) for name in EXECUTORS],
                                     value="local", allow_blank=False, id="launch-executor")
                yield Static("", id="launch-preview")
            with Horizontal(id="launch-buttons"):
                yield Button("Launch (ctrl+s)", variant="primary", id="launch-go")
                yield Button("Cancel (escape)", id="launch-cancel")

    def on_mount(self) -> None:
        self.query_one(SelectionList).focus()
        self.update_preview()

    def request(self) -> tuple[LaunchRequest, list[str]]:
        variants = list(self.query_one(SelectionList).selected)
        order = list(self.experiment.variants)
        variants.sort(key=order.index)
        texts = {key: self.query_one(f"#launch-{key}", Input).value for key, *_ in OVERRIDES}
        overrides, problems = parse_overrides(self.experiment, texts)
        executor = self.query_one("#launch-executor", Select).value
        return LaunchRequest(self.experiment.name, variants, overrides, str(executor)), problems

    def update_preview(self) -> None:
        request, problems = self.request()
        text = describe_launch(self.experiment, request.variants, request.overrides, request.executor)
        for problem in problems:
            text.append(f"\n{problem}", style="bold red")
        self.query_one("#launch-preview", Static).update(text)
        self.query_one("#launch-go", Button).disabled = bool(problems or not request.variants)

    def on_input_changed(self) -> None:
        self.update_preview()

    def on_selection_list_selected_changed(self) -> None:
        self.update_preview()

    def on_select_changed(self) -> None:
        self.update_preview()

    def on_input_submitted(self) -> None:
        self.action_launch()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "launch-go":
            self.action_launch()
        else:
            self.action_cancel()

    def action_launch(self) -> None:
        request, problems = self.request()
        if problems or not request.variants:
            self.update_preview()
            return
        self.dismiss(request)

    def action_cancel(self) -> None:
        self.dismiss(None)
