"""The keys of method `fisher` in experiments.toml, validated torch-free (see engine.methods).

    method = "fisher"
    strategy = "ratio"            # global | groups | ratio | meanstd | budget
    ratio = 0.25                  # the strategy's own keys (see STRATEGIES)
    high = 8                      # 8, or 16 / 32 for float16 / full-precision storage
    low = 4                       # 2..8, below high
    score = "fisher"              # rank layers by their Fisher value, or by "estimate"
                                  #   (the Fisher-weighted error at the low bit-width)
    symmetric = true
    calibration = { samples = 64, seed = 1 }
                                  # real pipelines generate the clean latents with the
                                  #   experiment's steps and guidance, or the table's own
                                  #   `steps = 20`, `guidance = 5.0` when given
    measure_sensitivity = true    # quantize one layer at a time to `low` and measure
                                  #   (two calibration passes per quantizable layer)

Strategy keys:
    global   threshold = 0.1          a layer keeps `high` if its score >= threshold x the
                                      largest score; (0, 1]
    groups   groups = [["conv_in", "down_blocks.0"], ["*"]]
             group_thresholds = [0.01, 0.2]
                                      the same rule with one threshold per group of layer-name
                                      prefixes; a layer takes the first group that names it,
                                      ["*"] (last, alone) takes every other layer
    ratio    ratio = 0.25             the ceil(ratio x layers) highest-scoring layers keep
                                      `high`; [0, 1]
    meanstd  k = 1.0                  a layer keeps `high` if its score > mean + k std of the
                                      scores; [-10, 10]
    budget   budget = 0.3             the packed checkpoint is at most this fraction of the FP32
             candidates = [4, 6, 8]   checkpoint, with the least total Fisher-weighted error;
                                      (0, 1]; candidates among 2..8, 16, 32

Errors raise `BadKey(key, message)`, which the config loader turns into a located ConfigError.
"""

from __future__ import annotations

import math

from engine.methods.base import BadKey
from engine.mixed_precision import EVERY_OTHER_LAYER, FP16, FP32

MIN_BITS, MAX_BITS = 2, 8
STRATEGIES = {
    "global": ("threshold",),
    "groups": ("groups", "group_thresholds"),
    "ratio": ("ratio",),
    "meanstd": ("k",),
    "budget": ("budget",),
}
COMMON_KEYS = ("strategy", "symmetric", "calibration", "measure_sensitivity")
TWO_LEVEL_KEYS = ("high", "low", "score")  # every strategy except budget
HIGH_CHOICES = (8, FP16, FP32)
SCORES = ("fisher", "estimate")
CALIBRATION_DEFAULTS = {"samples": 64, "seed": 1}
CALIBRATION_GENERATION = ("steps", "guidance")  # optional: absent means the experiment's
MAX_CALIBRATION_SAMPLES = 100_000
MAX_CALIBRATION_STEPS = 1000
MAX_K = 10.0
DEFAULT_CANDIDATES = [4, 6, 8]


def _number(value, key: str, low: float, high: float, low_open: bool = False) -> float:
    """A finite number in [low, high], or (low, high] when low_open."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadKey(key, f"must be a number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        raise BadKey(key, f"must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")
    return float(value)


def _precision(value, key: str, allowed: tuple[int, ...]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        names = ", ".join(str(a) for a in allowed)
        raise BadKey(key, f"must be one of {names} (16 = float16, 32 = full precision), got {value!r}")
    return value


def _flag(keys: dict, key: str, default: bool) -> bool:
    value = keys.get(key, default)
    if not isinstance(value, bool):
        raise BadKey(key, f"must be true or false, got {value!r}")
    return value


def _calibration(value) -> dict:
    if not isinstance(value, dict):
        raise BadKey("calibration", f"must be a table such as {{ samples = 64, seed = 1 }}, got {value!r}")
    for key in value:
        if key not in CALIBRATION_DEFAULTS and key not in CALIBRATION_GENERATION:
            keys = ", ".join([*CALIBRATION_DEFAULTS, *CALIBRATION_GENERATION])
            raise BadKey(f"calibration.{key}", f"unknown key; keys are {keys}")
    out = {**CALIBRATION_DEFAULTS, **value}
    samples, seed = out["samples"], out["seed"]
    if isinstance(samples, bool) or not isinstance(samples, int):
        raise BadKey("calibration.samples", f"must be an integer, got {samples!r}")
    if samples < 1:
        raise BadKey("calibration.samples", f"is {samples}: an empty calibration set; use at least 1 sample")
    if samples > MAX_CALIBRATION_SAMPLES:
        raise BadKey("calibration.samples", f"must be at most {MAX_CALIBRATION_SAMPLES}, got {samples}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise BadKey("calibration.seed", f"must be an integer >= 0, got {seed!r}")
    out = {"samples": samples, "seed": seed}  # the generation keys only when given: stored configs keep their hash
    if "steps" in value:
        steps = value["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_CALIBRATION_STEPS:
            raise BadKey("calibration.steps", f"must be an integer between 1 and {MAX_CALIBRATION_STEPS}, got {steps!r}")
        out["steps"] = steps
    if "guidance" in value:
        guidance = value["guidance"]
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance < math.inf:
            raise BadKey("calibration.guidance", f"must be a finite number >= 0, got {guidance!r}")
        out["guidance"] = float(guidance)
    return out


def _groups(groups, thresholds) -> tuple[list[list[str]], list[float]]:
    shape = 'a list of lists of layer-name prefixes, e.g. [["conv_in", "down_blocks.0"], ["*"]]'
    if not isinstance(groups, list) or not groups:
        raise BadKey("groups", f"must be {shape}")
    seen: set[str] = set()
    for i, group in enumerate(groups):
        if not isinstance(group, list) or not group or not all(isinstance(p, str) and p for p in group):
            raise BadKey("groups", f"group {i + 1} is not a non-empty list of layer-name prefixes")
        for prefix in group:
            if prefix in seen:
                raise BadKey("groups", f"prefix {prefix!r} is in two groups")
            seen.add(prefix)
        if EVERY_OTHER_LAYER in group and (len(group) > 1 or i != len(groups) - 1):
            raise BadKey("groups", f'["{EVERY_OTHER_LAYER}"] (every other layer) can only be the last group, alone')
    if not isinstance(thresholds, list) or len(thresholds) != len(groups):
        raise BadKey("group_thresholds", f"must be a list of {len(groups)} numbers, one per group")
    values = [_number(t, "group_thresholds", 0.0, 1.0, low_open=True) for t in thresholds]
    return [list(g) for g in groups], values


def _check_key_names(keys: dict, strategy: str) -> None:
    two_level = strategy != "budget"
    allowed = set(COMMON_KEYS) | set(STRATEGIES[strategy])
    allowed |= set(TWO_LEVEL_KEYS) if two_level else {"candidates"}
    for key in keys:
        if key in allowed:
            continue
        owner = [name for name, required in STRATEGIES.items() if key in required]
        if owner:
            raise BadKey(key, f"is a key of strategy {owner[0]!r}, not of {strategy!r}")
        if key in TWO_LEVEL_KEYS:
            raise BadKey(key, "does not apply to strategy 'budget', which chooses among candidates")
        if key == "candidates":
            raise BadKey(key, f"is a key of strategy 'budget', not of {strategy!r}")
        raise BadKey(key, f"unknown key for method 'fisher'; keys are {', '.join(sorted(allowed))}")
    for key in STRATEGIES[strategy]:
        if key not in keys:
            raise BadKey("strategy", f"strategy {strategy!r} needs {key}")


def validate_fisher(keys: dict) -> dict:
    """The normalized keys of a `fisher` variant (every default filled in), or BadKey."""
    strategy = keys.get("strategy")
    if strategy is None:
        raise BadKey("strategy", f"method 'fisher' needs a strategy: {', '.join(STRATEGIES)}")
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise BadKey("strategy", f"unknown strategy {strategy!r}; strategies are {', '.join(STRATEGIES)}")
    _check_key_names(keys, strategy)
    out: dict = {"strategy": strategy}
    if strategy != "budget":
        high = _precision(keys.get("high", 8), "high", HIGH_CHOICES)
        low = keys.get("low", 4)
        if isinstance(low, bool) or not isinstance(low, int) or not MIN_BITS <= low <= MAX_BITS:
            raise BadKey("low", f"must be an integer between {MIN_BITS} and {MAX_BITS}, got {low!r}")
        if low >= high:
            raise BadKey("low", f"must be below high ({high}), got {low}")
        score = keys.get("score", "fisher")
        if score not in SCORES:
            raise BadKey("score", f"must be one of {', '.join(SCORES)}, got {score!r}")
        out.update(high=high, low=low, score=score)
    if strategy == "global":
        out["threshold"] = _number(keys["threshold"], "threshold", 0.0, 1.0, low_open=True)
    elif strategy == "groups":
        out["groups"], out["group_thresholds"] = _groups(keys["groups"], keys["group_thresholds"])
    elif strategy == "ratio":
        out["ratio"] = _number(keys["ratio"], "ratio", 0.0, 1.0)
    elif strategy == "meanstd":
        out["k"] = _number(keys["k"], "k", -MAX_K, MAX_K)
    else:
        out["budget"] = _number(keys["budget"], "budget", 0.0, 1.0, low_open=True)
        candidates = keys.get("candidates", DEFAULT_CANDIDATES)
        if not isinstance(candidates, list) or not candidates:
            raise BadKey("candidates", f"must be a non-empty list of bit-widths, got {candidates!r}")
        allowed = tuple(range(MIN_BITS, MAX_BITS + 1)) + (FP16, FP32)
        values = [_precision(c, "candidates", allowed) for c in candidates]
        if len(set(values)) != len(values):
            raise BadKey("candidates", f"lists a bit-width twice: {values}")
        out["candidates"] = sorted(values)
    out["symmetric"] = _flag(keys, "symmetric", True)
    out["calibration"] = _calibration(keys.get("calibration", {}))
    out["measure_sensitivity"] = _flag(keys, "measure_sensitivity", True)
    return out


def low_precision(params: dict) -> int:
    """The precision at which a variant's sensitivity is measured: `low`, or the budget's
    smallest candidate."""
    return min(params["candidates"]) if params["strategy"] == "budget" else params["low"]


def precision_label(bits: int) -> str:
    return {FP16: "FP16", FP32: "FP32"}.get(bits, f"W{bits}")


def describe_fisher(params: dict) -> str:
    """A short label for tables, e.g. 'W8/W4 ratio p=0.25' or 'W4/6/8 budget 30%'."""
    strategy = params["strategy"]
    if strategy == "budget":
        labels = [precision_label(b) for b in params["candidates"]]
        joined = "/".join(label.removeprefix("W") if i else label for i, label in enumerate(labels))
        return f"{joined} budget {params['budget']:.0%}"
    detail = {
        "global": lambda: f"t={params['threshold']:g}",
        "groups": lambda: "t=" + "/".join(f"{t:g}" for t in params["group_thresholds"]),
        "ratio": lambda: f"p={params['ratio']:g}",
        "meanstd": lambda: f"k={params['k']:g}",
    }[strategy]()
    return f"{precision_label(params['high'])}/{precision_label(params['low'])} {strategy} {detail}"
