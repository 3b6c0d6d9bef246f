"""The per-layer matrix behind the heatmap: layers (model order) against runs, one quantity
at a time, with a colour scale and optional collapsing of layers into blocks.

A block is the top-level module, with its index when it is one of a list (`down_blocks.1`,
`mid_block`, `conv_in`); a collapsed block shows the parameter-weighted mean of its layers (for bits,
full-precision layers count as 32, so the block shows its effective bits). Colours come from
the xterm 256-colour cube, so a 256-colour terminal shows exactly the same scale.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

QUANTITIES = {
    "bits": "bits",
    "weight_err": "weight error",
    "fisher": "Fisher information",
    "sensitivity": "sensitivity",
    "out_err": "output error",
    "start_share": "start-token attention share",  # DGQ's softmax rows: where the attention mass sits
}
FP_BITS = 32.0
PALETTE = ["#5f0087", "#5f5faf", "#005faf", "#0087af", "#00af87", "#5fd75f", "#afd75f", "#ffd75f"]
DARK = 4  # palette entries before this index get white text, the rest black
FP_COLOUR = "#585858"
ROLE_SHORT = {"conv": "conv", "attention": "attn", "linear": "lin"}


def block_of(name: str) -> str:
    """`down_blocks.1.attentions.0.to_q` -> `down_blocks.1`; `mid_block.resnets.0.conv1` ->
    `mid_block`; `transformer_blocks.3.attn.to_q` -> `transformer_blocks.3`."""
    parts = name.split(".")
    if len(parts) > 1 and parts[1].isdigit():
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


@dataclass
class Layer:
    idx: int
    name: str
    role: str
    params: int
    block: str


@dataclass
class Matrix:
    layers: list[Layer]
    runs: list[tuple[int, str]]  # (run id, column label)
    values: dict[str, list[list[float | None]]]  # quantity -> [layer][run]
    present: list[list[bool]]  # [layer][run]: the run has a row for this layer
    extras: list[list[dict | None]] = field(default_factory=list)  # [layer][run]: parsed `extra` JSON

    def quantities(self) -> list[str]:
        """Quantities that at least one run has values for (bits whenever there are layers)."""
        out = []
        for q in QUANTITIES:
            grid = self.values.get(q, [])
            if q == "bits" and self.layers:
                out.append(q)
            elif any(v is not None for row in grid for v in row):
                out.append(q)
        return out

    def blocks(self) -> list[str]:
        return list(dict.fromkeys(layer.block for layer in self.layers))


def build_matrix(layers_by_run: dict[int, list[dict]], labels: dict[int, str]) -> Matrix:
    """Align each run's layer rows by name, in the model order of the run with most layers."""
    run_ids = [r for r in labels if r in layers_by_run]
    reference = max((layers_by_run[r] for r in run_ids), key=len, default=[])
    layers = [
        Layer(idx=i, name=row["name"], role=row.get("role") or "", params=row.get("params") or 0,
              block=block_of(row["name"]))
        for i, row in enumerate(reference)
    ]
    position = {layer.name: i for i, layer in enumerate(layers)}
    values: dict[str, list[list[float | None]]] = {
        q: [[None] * len(run_ids) for _ in layers] for q in QUANTITIES
    }
    present = [[False] * len(run_ids) for _ in layers]
    extras: list[list[dict | None]] = [[None] * len(run_ids) for _ in layers]
    for column, run_id in enumerate(run_ids):
        for row in layers_by_run[run_id]:
            i = position.get(row["name"])
            if i is None:
                continue
            present[i][column] = True
            for q in QUANTITIES:
                values[q][i][column] = row.get(q)
            extras[i][column] = parse_extra(row.get("extra"))
    return Matrix(layers=layers, runs=[(r, labels[r]) for r in run_ids], values=values, present=present,
                  extras=extras)


def parse_extra(text) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {"extra": str(text)}
    return value if isinstance(value, dict) else {"extra": value}


@dataclass
class Line:
    """One heatmap row: a layer, or a collapsed block."""

    label: str
    role: str
    values: list[float | None]
    block: str
    is_block: bool = False
    fp: list[bool] = field(default_factory=list)  # bits only: cell is full precision


def weighted_mean(pairs: list[tuple[float, int]]) -> float | None:
    total = sum(max(w, 1) for _, w in pairs)
    return sum(v * max(w, 1) for v, w in pairs) / total if pairs else None


def lines(matrix: Matrix, quantity: str, collapsed: set[str]) -> list[Line]:
    grid = matrix.values[quantity]
    n = len(matrix.runs)
    out: list[Line] = []
    members: dict[str, list[int]] = {}
    for i, layer in enumerate(matrix.layers):
        members.setdefault(layer.block, []).append(i)
    done_blocks: set[str] = set()
    for i, layer in enumerate(matrix.layers):
        if layer.block in collapsed:
            if layer.block in done_blocks:
                continue
            done_blocks.add(layer.block)
            rows = members[layer.block]
            values, fp = [], []
            for c in range(n):
                pairs, all_fp = [], True
                for r in rows:
                    v = grid[r][c]
                    if quantity == "bits" and v is None and matrix.present[r][c]:
                        v = FP_BITS  # full precision counts as 32 bits in a block's mean
                    elif v is not None:
                        all_fp = False
                    if v is not None:
                        pairs.append((float(v), matrix.layers[r].params))
                block_fp = quantity == "bits" and bool(pairs) and all_fp
                values.append(None if block_fp else weighted_mean(pairs))
                fp.append(block_fp)
            out.append(Line(f"▸ {layer.block}", f"×{len(rows)}", values, layer.block, True, fp))
            continue
        row = list(grid[i])
        fp = [quantity == "bits" and v is None and matrix.present[i][c] for c, v in enumerate(row)]
        out.append(Line(layer.name, ROLE_SHORT.get(layer.role, layer.role[:4]), row, layer.block, False, fp))
    return out


@dataclass
class Scale:
    low: float
    high: float
    log: bool

    def index(self, value: float) -> int:
        if self.high <= self.low:
            return len(PALETTE) - 1
        if self.log:
            value, low, high = math.log10(max(value, self.low)), math.log10(self.low), math.log10(self.high)
        else:
            low, high = self.low, self.high
        t = (value - low) / (high - low)
        return max(0, min(len(PALETTE) - 1, int(t * len(PALETTE))))

    def bounds(self) -> list[float]:
        """The upper edge of each colour band."""
        n = len(PALETTE)
        if self.log and self.low > 0:
            lo, hi = math.log10(self.low), math.log10(self.high)
            return [10 ** (lo + (hi - lo) * (k + 1) / n) for k in range(n)]
        return [self.low + (self.high - self.low) * (k + 1) / n for k in range(n)]


def make_scale(rows: list[Line], quantity: str) -> Scale | None:
    finite = [v for row in rows for v, fp in zip(row.values, row.fp or [False] * len(row.values))
              if v is not None and not fp and math.isfinite(v)]
    if not finite:
        return None
    low, high = min(finite), max(finite)
    log = quantity != "bits" and low > 0 and high / low > 100
    return Scale(low, high, log)


VALUE_WIDTH = 7  # every cell text fits: "-1.2e-5", "0.00123", "1.23e+4" is "1.2e4"


def compact(value: float) -> str:
    """At most VALUE_WIDTH characters with the exponent kept: 1.1e-05 -> "1.1e-5"."""
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e4:
        return f"{value:.3g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    text = f"{mantissa}e{int(exponent)}"
    if len(text) > VALUE_WIDTH:
        text = f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")
    return text


def cell_text(value: float | None, quantity: str, fp: bool, is_block: bool) -> str:
    if fp:
        return "FP"
    if value is None:
        return "·"
    if quantity == "bits" and not is_block and float(value).is_integer():
        return str(int(value))
    return compact(float(value))


def sort_lines(rows: list[Line], column: int, descending: bool) -> list[Line]:
    """Rows by their value in one run's column; missing and full-precision cells last."""
    def key(row: Line) -> float:
        return row.values[column]

    present = [r for r in rows if r.values[column] is not None and not (r.fp and r.fp[column])]
    missing = [r for r in rows if r.values[column] is None or (r.fp and r.fp[column])]
    return sorted(present, key=key, reverse=descending) + missing


def column_labels(labels: list[str], room: int) -> tuple[list[str], list[int], list[tuple[str, str]]]:
    """The header of each run column, its width, and the legend of abbreviations (empty when
    the full names fit in `room` columns): full names if they fit, else 1, 2, 3, ..."""
    widths = [max(VALUE_WIDTH, len(label)) for label in labels]
    if sum(w + 1 for w in widths) <= room or not labels:
        return list(labels), widths, []
    short = [str(n + 1) for n in range(len(labels))]
    return short, [VALUE_WIDTH] * len(labels), list(zip(short, labels))
