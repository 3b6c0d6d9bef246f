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
    Column("experiment", "Experiment", attribute("experiment"), as_text, align="left"),
    Column("variant", "Variant", attribute("variant"), as_text, align="left"),
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
