"""What the plot and compare screens draw, as pure functions over runs (no Textual, no numpy).

- `pareto_front(points, lower_is_better)`: the points no other point beats on both size and
  quality (smaller x is better; y lower or higher is better as the metric says).
- `main_protocol(runs)`: the protocol of an experiment that most done runs share.
- `protocol_message(differences)`: "not the same protocol: samples 100 vs 1000".
- `fisher_points(layers)`: (fisher, sensitivity, name) of the layers that have both, positive.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

# Quality metrics the Pareto plot can draw: (key, axis label, lower is better)
QUALITY = {"fid": ("FID", True), "clip_score": ("CLIP score", False), "prompt_acc": ("prompt accuracy", False)}
SIZES = {"size_ratio": "size ratio (quantized / full precision)", "mean_bits": "bits per weight"}


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    label: str


def pareto_front(points: list[Point], lower_is_better: bool = True) -> list[Point]:
    """The non-dominated points sorted by x: a point is dominated when another has x no larger
    and y no worse, and is strictly better in one of them."""
    def better_or_equal(a: float, b: float) -> bool:
        return a <= b if lower_is_better else a >= b

    front = []
    for p in points:
        dominated = any(
            q.x <= p.x and better_or_equal(q.y, p.y) and (q.x < p.x or q.y != p.y)
            for q in points if q is not p
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: (p.x, p.y))


def main_protocol(runs) -> str | None:
    """The protocol shared by most done runs (ties: the one with the latest run)."""
    counts = Counter(r.protocol for r in runs if r.status == "done")
    if not counts:
        return None
    latest = {r.protocol: r.id for r in sorted(runs, key=lambda r: r.id)}
    return max(counts, key=lambda p: (counts[p], latest.get(p, 0)))


def pareto_points(runs, quality: str, size: str) -> list[Point]:
    """One point per done run that has both metrics, labelled by its variant (with its id when
    a variant has several runs)."""
    runs = [r for r in runs if r.status == "done" and r.metric(quality) is not None
            and r.metric(size) is not None]
    counts = Counter(r.variant for r in runs)
    return [Point(float(r.metric(size)), float(r.metric(quality)),
                  r.variant if counts[r.variant] == 1 else f"{r.variant} #{r.id}") for r in runs]


def protocol_message(diff: dict[str, tuple]) -> str:
    """`engine.protocol.differences` said plainly: "not the same protocol: samples 100 vs 1000"."""
    parts = [f"{key} {_plain(a)} vs {_plain(b)}" for key, (a, b) in diff.items()]
    return "not the same protocol: " + "; ".join(parts)


def _plain(value) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, float) and value.is_integer():
        return f"{value:.1f}"
    return str(value)


def fisher_points(layers: list[dict]) -> list[Point]:
    """(Fisher, measured sensitivity) per layer, both positive (they are drawn on log scales)."""
    out = []
    for layer in layers:
        f, s = layer.get("fisher"), layer.get("sensitivity")
        if f is not None and s is not None and f > 0 and s > 0:
            out.append(Point(float(f), float(s), layer.get("name") or ""))
    return out
