"""Choosing each layer's precision from per-layer statistics: five small pure functions.

The four strategies of the LAQFI study give each layer one of two precisions, `high` or `low`,
from a per-layer score (its Fisher value, or the Fisher-weighted error at `low`):
- `by_threshold`: high where score >= threshold x the largest score;
- `by_groups`: the same with one threshold per group of layers;
- `by_ratio`: the ceil(ratio x n) highest-scoring layers are high;
- `by_mean_std`: high where score > mean + k x std of the scores (population std).
Ties in score are broken by model order (the earlier layer ranks higher).

`by_budget` (beyond the study) picks, for every layer, one precision among several so that the
layers' bytes fit a capacity with the least total Fisher-weighted error: a multiple-choice
knapsack, solved exactly by dynamic programming over capacity in units of
ceil(capacity / resolution) bytes, each cost rounded up to whole units. Rounding up keeps every
returned assignment within the capacity in true bytes; it is exactly optimal when the costs are
whole units (small problems) and otherwise optimal among the assignments that fit after
rounding. The best uniform assignment that fits is compared too, so the result is never worse
than giving every layer the same precision.
"""

from __future__ import annotations

import math

import numpy as np


def _two_level(keep_high: list[bool], high: int, low: int) -> list[int]:
    return [high if keep else low for keep in keep_high]


def by_threshold(scores: list[float], threshold: float, high: int, low: int) -> list[int]:
    """`high` for layers whose score is at least `threshold` times the largest score."""
    if not scores:
        return []
    cut = threshold * max(scores)
    return _two_level([s >= cut for s in scores], high, low)


def by_groups(scores: list[float], groups: list[int], thresholds: list[float], high: int, low: int) -> list[int]:
    """`by_threshold` with the threshold of each layer's group (`groups[i]` indexes
    `thresholds`); the reference is still the largest score over all layers."""
    if len(groups) != len(scores):
        raise ValueError(f"{len(scores)} scores but {len(groups)} group indices")
    if not scores:
        return []
    top = max(scores)
    return _two_level([s >= thresholds[g] * top for s, g in zip(scores, groups)], high, low)


def by_ratio(scores: list[float], ratio: float, high: int, low: int) -> list[int]:
    """`high` for the ceil(ratio x n) layers with the largest scores."""
    count = math.ceil(ratio * len(scores) - 1e-9)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    chosen = set(order[:count])
    return _two_level([i in chosen for i in range(len(scores))], high, low)


def by_mean_std(scores: list[float], k: float, high: int, low: int) -> list[int]:
    """`high` for layers whose score exceeds mean + k x std of all scores."""
    if not scores:
        return []
    values = np.asarray(scores, dtype=float)
    cut = values.mean() + k * values.std()
    return _two_level([s > cut for s in values], high, low)


def by_budget(
    errors: list[dict[int, float]], costs: list[dict[int, int]], capacity: int, resolution: int = 1 << 16
) -> list[int]:
    """For each layer one key of its `errors`/`costs` (a precision) such that the costs add up
    to at most `capacity` and the errors to as little as possible (see the module docstring).
    ValueError if even the cheapest choice of every layer does not fit."""
    if len(errors) != len(costs):
        raise ValueError(f"{len(errors)} error tables but {len(costs)} cost tables")
    options = [sorted(c) for c in costs]
    for i, (e, c) in enumerate(zip(errors, costs)):
        if set(e) != set(c) or not c:
            raise ValueError(f"layer {i}: errors and costs must cover the same non-empty precisions")
        if any(v < 0 for v in c.values()):
            raise ValueError(f"layer {i}: negative cost")
    least = sum(min(c.values()) for c in costs)
    if least > capacity:
        raise ValueError(f"the cheapest assignment needs {least} bytes, more than the capacity {capacity}")
    unit = max(1, math.ceil(capacity / resolution))
    width = capacity // unit
    best = np.zeros(width + 1)  # best[c]: least error of the layers so far within c units
    choices = np.zeros((len(costs), width + 1), dtype=np.int16)
    for i, opts in enumerate(options):
        new = np.full(width + 1, np.inf)
        for j, bits in enumerate(opts):
            w = math.ceil(costs[i][bits] / unit)
            if w > width:
                continue
            candidate = np.full(width + 1, np.inf)
            candidate[w:] = best[: width + 1 - w] + errors[i][bits]
            better = candidate < new
            new[better] = candidate[better]
            choices[i][better] = j
        best = new
    chosen: list[int] | None = None
    if np.isfinite(best[width]):
        chosen, c = [], width
        for i in range(len(options) - 1, -1, -1):
            bits = options[i][choices[i][c]]
            chosen.append(bits)
            c -= math.ceil(costs[i][bits] / unit)
        chosen.reverse()
    for bits in sorted(set.intersection(*(set(c) for c in costs)) if costs else set()):
        uniform = [bits] * len(costs)
        if sum(c[bits] for c in costs) <= capacity and (
            chosen is None or total_error(errors, uniform) < total_error(errors, chosen)
        ):
            chosen = uniform
    if chosen is None:  # only rounding kept the cheapest assignment out
        chosen = [min(c, key=c.get) for c in costs]
    return chosen


def total_error(errors: list[dict[int, float]], bits: list[int]) -> float:
    return float(sum(e[b] for e, b in zip(errors, bits)))


def total_cost(costs: list[dict[int, int]], bits: list[int]) -> int:
    return int(sum(c[b] for c, b in zip(costs, bits)))
