"""The columns of the results table: what each shows, how it sorts, and which value is best.

A column is data: a raw value for sorting and export, a display text, an alignment and the
direction in which its values are better. Sorting always puts missing values last, in both
directions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from qtui.model import STATUSES, RunRow


Values = Callable[[Sequence[RunRow]], list]
Texts = Callable[[Sequence[RunRow], list], list]


@dataclass(frozen=True)
class Column:
    """A column works on many runs at once (10,000 runs format in milliseconds)."""

    key: str
    label: str
    values: Values  # raw values of runs: sorting and best marks; None when missing
    texts: Texts  # what the cells show, given the runs and their values
    align: str = "right"
    best: str | None = None  # "min", "max" or None (no best mark)

    def value(self, row: RunRow) -> Any:
        return self.values([row])[0]

    def text(self, row: RunRow) -> str:
        return self.texts([row], self.values([row]))[0]


MISSING = "—"


def human_bytes(value: float | None) -> str:
    if value is None:
        return MISSING
    size = float(value)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.3g} {unit}"
        size /= 1000
    return f"{size:.2f} TB"  # pragma: no cover - the loop always returns


def fid_text(row: RunRow) -> str:
    return fid_texts([row], [row.metric("fid")])[0]


def fid_texts(runs: Sequence[RunRow], values: list) -> list[str]:
    out = []
    for run, fid in zip(runs, values):
        if fid is None:
            out.append(MISSING)
            continue
        low, high = run.metrics.get("fid_ci_low"), run.metrics.get("fid_ci_high")
        head = f"{fid:.1f}" if fid >= 100 else f"{fid:.2f}"
        out.append(head if low is None or high is None else f"{head} [{low:.1f},{high:.1f}]")
    return out


def metric(name: str) -> Values:
    return lambda runs: [r.metrics.get(name) for r in runs]


def attribute(name: str) -> Values:
    return lambda runs: [getattr(r, name) for r in runs]


def fixed(digits: int, scale: float = 1.0) -> Texts:
    """Fixed-point texts; prompt_acc, a fraction in [0, 1], is shown in percent (scale 100)."""
    form = f"{{:.{digits}f}}".format
    if scale == 1.0:
        return lambda runs, values: [MISSING if v is None else form(v) for v in values]
    return lambda runs, values: [MISSING if v is None else form(v * scale) for v in values]


def as_text(runs: Sequence[RunRow], values: list) -> list[str]:
    return [str(v) for v in values]


STATUS_RANK = {s: i for i, s in enumerate(STATUSES)}

COLUMNS: tuple[Column, ...] = (
    Column("id", "ID", attribute("id"), as_text),
    Column("variant", "Variant", attribute("variant"), as_text, align="left"),
    Column("experiment", "Experiment", attribute("experiment"), as_text, align="left"),
    Column("status", "Status", lambda runs: [STATUS_RANK.get(r.status, 99) for r in runs],
           lambda runs, values: [r.status for r in runs], align="left"),
    Column("samples", "n", attribute("samples"),
           lambda runs, values: [MISSING if v is None else str(v) for v in values]),
    Column("quant", "Quantization", attribute("quant"), as_text, align="left"),
    Column("fid", "FID [95% CI]", metric("fid"), fid_texts, best="min"),
    Column("acc", "Acc %", metric("prompt_acc"), fixed(1, 100.0), best="max"),
    Column("clip", "CLIP", metric("clip_score"), fixed(3), best="max"),
    Column("size", "Size", metric("size_bytes"), lambda runs, values: [human_bytes(v) for v in values],
           best="min"),
    Column("ratio", "Ratio", metric("size_ratio"), fixed(3), best="min"),
    Column("latency", "ms", metric("latency_ms"), fixed(1), best="min"),
    Column("bits", "Bits", metric("mean_bits"), fixed(2), best="min"),
    Column("mem", "Mem MB", metric("peak_mem_mb"), fixed(0), best="min"),
    Column("description", "Description", attribute("description"), as_text, align="left"),
    Column("protocol", "Protocol", attribute("protocol"), as_text, align="left"),
)
BY_KEY = {c.key: c for c in COLUMNS}
FROZEN = ("id", "variant")  # always shown, first, and frozen while the table scrolls sideways
DEFAULT_LAYOUT = tuple(c.key for c in COLUMNS if c.key not in ("description", "protocol"))
# Metrics that the columns above show already (the FID interval is part of the FID column).
SHOWN_METRICS = {"fid", "fid_ci_low", "fid_ci_high", "prompt_acc", "clip_score", "size_bytes",
                 "size_ratio", "latency_ms", "mean_bits", "peak_mem_mb"}
METRIC_PREFIX = "m:"
# Directions of stored metrics that have one; other metric columns get no best mark.
METRIC_BEST = {"fisher_spearman": "max", "quantize_s": "min", "calibration_s": "min", "kid": "min",
               "fid_floor": None}


def general(runs: Sequence[RunRow], values: list) -> list[str]:
    return [MISSING if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)) for v in values]


def metric_column(name: str) -> Column:
    """A column for any stored metric, by its stored name."""
    return Column(METRIC_PREFIX + name, name, metric(name), general, best=METRIC_BEST.get(name))


def column_for(key: str) -> Column | None:
    if key in BY_KEY:
        return BY_KEY[key]
    if key.startswith(METRIC_PREFIX) and len(key) > len(METRIC_PREFIX):
        return metric_column(key[len(METRIC_PREFIX):])
    return None


def normal_layout(keys: Iterable[str]) -> list[str]:
    """A layout as stored in the settings, made valid: known keys, no repeats, frozen first."""
    out = list(FROZEN)
    for key in keys:
        if isinstance(key, str) and key not in out and column_for(key) is not None:
            out.append(key)
    return out


def columns_for(layout: Sequence[str]) -> tuple[Column, ...]:
    """Every built-in column, then a metric column per metric key of the layout."""
    extra = [column_for(k) for k in layout if k.startswith(METRIC_PREFIX)]
    return COLUMNS + tuple(c for c in extra if c is not None)


def metric_names(rows: Iterable[RunRow]) -> list[str]:
    """The stored metrics of these runs that no built-in column shows."""
    names: set[str] = set()
    for row in rows:
        names.update(row.metrics)
    return sorted(names - SHOWN_METRICS)


def sort_order(ids: Sequence[int], keys: Sequence[Any], descending: bool = False) -> list[int]:
    """`ids` (in id order) ordered by their `keys`: missing keys (None) last in both
    directions, ties in id order."""
    present = [n for n, k in enumerate(keys) if k is not None]
    present.sort(key=keys.__getitem__, reverse=descending)  # stable: ties keep id order
    return [ids[n] for n in present] + [ids[n] for n, k in enumerate(keys) if k is None]


def sort_rows(rows: Iterable[RunRow], column: Column, descending: bool = False) -> list[RunRow]:
    """Rows ordered by a column's value, missing values last either way, ties by run id."""
    by_id = {row.id: row for row in rows}
    ids = sorted(by_id)
    keys = column.values([by_id[i] for i in ids])
    return [by_id[i] for i in sort_order(ids, keys, descending)]


def best_of(values: Iterable[Any], direction: str) -> Any:
    """The best of the values ("min" or "max"), ignoring missing ones; None when there is
    nothing to compare (no values, or all equal)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    low, high = min(present), max(present)
    if low == high:
        return None
    return low if direction == "min" else high


def best_values(rows: Sequence[RunRow], columns: Iterable[Column] = COLUMNS) -> dict[str, Any]:
    """The best value of each column that has a direction, over the given rows."""
    best = {}
    for column in columns:
        if column.best:
            value = best_of(column.values(rows), column.best)
            if value is not None:
                best[column.key] = value
    return best


def comparable_group(row: RunRow) -> tuple[str, str]:
    """Runs are ranked only against runs of the same experiment and protocol."""
    return row.experiment, row.protocol


def best_by_group(rows: Sequence[RunRow], values: Sequence[Sequence], columns: Sequence[Column]
                  ) -> dict[str, dict[tuple[str, str], Any]]:
    """Per column with a direction: the best value within each (experiment, protocol) group.
    `values[n][i]` is the value of column i for rows[n]."""
    groups: dict[tuple[str, str], list[int]] = {}
    for n, row in enumerate(rows):
        groups.setdefault(comparable_group(row), []).append(n)
    best: dict[str, dict[tuple[str, str], Any]] = {}
    for i, column in enumerate(columns):
        if not column.best:
            continue
        per_group = {}
        for group, members in groups.items():
            value = best_of((values[n][i] for n in members), column.best)
            if value is not None:
                per_group[group] = value
        if per_group:
            best[column.key] = per_group
    return best


def odd_protocols(rows: Sequence[RunRow]) -> set[int]:
    """Runs whose protocol is not the one most runs of their experiment share (they are
    ranked apart; the table marks them)."""
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        per = counts.setdefault(row.experiment, {})
        per[row.protocol] = per.get(row.protocol, 0) + 1
    usual = {e: max(c.items(), key=lambda kv: (kv[1], kv[0]))[0] for e, c in counts.items()}
    return {row.id for row in rows if row.protocol != usual[row.experiment]}
