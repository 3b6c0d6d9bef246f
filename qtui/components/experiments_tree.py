"""The experiments of `experiments.toml` with their variants and each variant's latest run.

Experiments that exist only in the database (removed from the file, or from another
catalogue) are listed too, dimmed, so their runs can still be filtered. Space marks variants
to launch together; enter (or a click) filters the runs table by the experiment of the node
(on the root: all experiments).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from rich.text import Text
from textual.binding import Binding
from textual.widgets import Tree
from textual.widgets.tree import TreeNode

from qtui.messages import ExperimentChosen
from qtui.model import RunRow
from qtui.run_info import quant_label

STATUS_STYLES = {
    "queued": "blue",
    "running": "yellow",
    "done": "green",
    "failed": "red",
    "cancelled": "bright_black",
    "lost": "magenta",
}


@dataclass(frozen=True)
class NodeData:
    kind: str  # "root", "experiment", "variant" or "error"
    experiment: str | None = None
    variant: str | None = None


class ExperimentsTree(Tree[NodeData]):
    BINDINGS = [
        Binding("space", "mark", "Mark", tooltip="Mark the variant (or all variants of the experiment) "
                "to launch together"),
        Binding("enter", "select_cursor", "Filter", tooltip="Show only the runs of this experiment "
                "(on the root: all)"),
    ]

    def __init__(self, label: str = "experiments.toml", **kwargs) -> None:
        super().__init__(label, NodeData("root"), **kwargs)
        self.auto_expand = False
        self.guide_depth = 2
        self.catalogue = None
        self.error: str | None = None
        self.marks: set[tuple[str, str]] = set()
        self.latest: dict[tuple[str, str], RunRow] = {}
        self.seen: dict[int, str] = {}  # run id -> experiment
        self.counts: Counter[str] = Counter()
        self.root_name = label
        self._node_index: dict[tuple[str, str | None], TreeNode[NodeData]] = {}

    # ---------------------------------------------------------------- content
    def set_catalogue(self, catalogue, error: str | None = None) -> None:
        """Show a loaded `engine.config.Catalogue` (or the error that stopped it loading)."""
        self.catalogue, self.error = catalogue, error
        self.marks = {m for m in self.marks if catalogue and self._in_catalogue(*m)}
        self._rebuild()

    def update_runs(self, runs: list[RunRow], reset: bool = False) -> None:
        """Take note of new or changed runs: counts and each variant's latest run."""
        if reset:
            self.latest.clear()
            self.seen.clear()
        structure_changed = reset
        for run in runs:
            self.seen[run.id] = run.experiment
            key = (run.experiment, run.variant)
            previous = self.latest.get(key)
            if previous is None or run.id >= previous.id:
                self.latest[key] = run
            structure_changed = structure_changed or key not in self._node_index
        self.counts = Counter(self.seen.values())
        if structure_changed:
            self._rebuild()
        else:
            self._relabel()

    def bits_label(self, experiment: str, variant: str) -> str:
        """The variant's bits per role ("conv W4, attention W8"), from the catalogue."""
        if not self._in_catalogue(experiment, variant):
            return ""
        exp = self.catalogue.experiments[experiment]
        v = exp.variants[variant]
        options = getattr(exp, "options", None)
        dtype = getattr(options, "dtype", None)
        return quant_label({"method": v.method, "params": v.params, "model_options": {"dtype": dtype}})

    def _in_catalogue(self, experiment: str, variant: str | None = None) -> bool:
        if self.catalogue is None or experiment not in self.catalogue.experiments:
            return False
        return variant is None or variant in self.catalogue.experiments[experiment].variants

    def _structure(self) -> dict[str, list[str]]:
        """Experiment -> variants: the catalogue's first, then any only in the database."""
        out: dict[str, list[str]] = {}
        if self.catalogue is not None:
            for name, experiment in self.catalogue.experiments.items():
                out[name] = list(experiment.variants)
        for experiment, variant in sorted(self.latest):
            variants = out.setdefault(experiment, [])
            if variant not in variants:
                variants.append(variant)
        return out

    def _rebuild(self) -> None:
        cursor = self.cursor_node.data if self.cursor_node is not None else None
        self.clear()
        self._node_index.clear()
        if self.error:
            self.root.add_leaf(Text(self.error, style="bold red"), NodeData("error"))
        for experiment, variants in self._structure().items():
            node = self.root.add(experiment, NodeData("experiment", experiment), expand=True)
            self._node_index[(experiment, None)] = node
            for variant in variants:
                leaf = node.add_leaf(variant, NodeData("variant", experiment, variant))
                self._node_index[(experiment, variant)] = leaf
        self.root.expand()
        self._relabel()
        if cursor is not None:
            node = self._node_index.get((cursor.experiment, cursor.variant)) if cursor.experiment else None
            if node is not None:
                self._place_cursor(node)

    def _place_cursor(self, node: TreeNode[NodeData]) -> None:
        _ = self.last_line  # lays the lines out, so that a node added just now has its line
        self.move_cursor(node)

    def _relabel(self) -> None:
        root_label = Text(self.root_name, style="bold")
        if self.error:
            root_label.append("  error", style="bold red")
        self.root.set_label(root_label)
        for (experiment, variant), node in self._node_index.items():
            known = self._in_catalogue(experiment, variant)
            if variant is None:
                label = Text(experiment, style="bold" if known else "dim italic")
                count = self.counts.get(experiment, 0)
                if count:
                    label.append(f" ({count})", style="dim")
            else:
                marked = (experiment, variant) in self.marks
                label = Text("● " if marked else "○ ", style="bold cyan" if marked else "dim")
                label.append(variant, style="" if known else "dim italic")
                run = self.latest.get((experiment, variant))
                if run is not None:
                    label.append(f" {run.status}", style=STATUS_STYLES.get(run.status, ""))
                bits = self.bits_label(experiment, variant) or (run.quant if run is not None else "")
                if bits:
                    label.append(f" {bits}", style="dim")
            node.set_label(label)

    # ---------------------------------------------------------------- choices
    def chosen(self) -> tuple[str | None, list[str]]:
        """The experiment under the cursor and the variants to launch: the marked variants
        of that experiment if any are marked, else the variant (or all variants) under the
        cursor. Only variants of the catalogue count."""
        node = self.cursor_node
        if node is None or node.data is None or node.data.experiment is None:
            return None, []
        experiment = node.data.experiment
        if not self._in_catalogue(experiment):
            return experiment, []
        variants = list(self.catalogue.experiments[experiment].variants)
        marked = [v for v in variants if (experiment, v) in self.marks]
        if marked:
            return experiment, marked
        if node.data.kind == "variant":
            return experiment, [node.data.variant] if node.data.variant in variants else []
        return experiment, variants

    def move_to(self, experiment: str, variant: str | None = None) -> bool:
        """Put the cursor on an experiment or one of its variants."""
        node = self._node_index.get((experiment, variant))
        if node is None:
            return False
        self._place_cursor(node)
        return True

    def clear_marks(self, experiment: str) -> None:
        self.marks = {m for m in self.marks if m[0] != experiment}
        self._relabel()

    def action_mark(self) -> None:
        node = self.cursor_node
        if node is None or node.data is None or node.data.experiment is None:
            return
        experiment = node.data.experiment
        if node.data.kind == "variant":
            keys = [(experiment, node.data.variant)]
        else:
            keys = [(experiment, v) for (e, v) in self._node_index if e == experiment and v is not None]
        keys = [k for k in keys if self._in_catalogue(*k)]
        if keys and all(k in self.marks for k in keys):
            self.marks.difference_update(keys)
        else:
            self.marks.update(keys)
        self._relabel()
        if node.data.kind == "variant":
            self.action_cursor_down()

    def on_tree_node_selected(self, event: Tree.NodeSelected) -> None:
        """Enter or a click on a node filters the runs by its experiment (root: all)."""
        event.stop()
        data = event.node.data
        self.post_message(ExperimentChosen(None if data is None else data.experiment))
