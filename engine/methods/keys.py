"""Validators shared by the methods' keys (bits, roles, calibration, activations): torch-free."""

from __future__ import annotations

from engine.methods.base import BadKey

ROLES = ("conv", "attention", "linear")
MIN_BITS, MAX_BITS = 2, 8
SCOPES = ("all", "blocks")  # every layer with a role, or only the transformer blocks' Linear layers
ACT_BITS = (8, 16)
ACT_MODES = ("static", "dynamic")
CALIBRATION_DEFAULTS = {"samples": 32, "held_out": 16, "seed": 1, "steps": 20}


def bits_key(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadKey(key, f"bits must be an integer, got {value!r}")
    if not MIN_BITS <= value <= MAX_BITS:
        raise BadKey(key, f"bits must be between {MIN_BITS} and {MAX_BITS}, got {value}")
    return value


def role_bits(value) -> dict[str, int]:
    """`bits = 4` (every role) or `bits = {conv = 4, attention = 8}` (roles not named stay FP)."""
    if isinstance(value, dict):
        out = {}
        for role, b in value.items():
            if role not in ROLES:
                raise BadKey(f"bits.{role}", f"unknown role {role!r}; roles are {', '.join(ROLES)}")
            out[role] = bits_key(b, f"bits.{role}")
        if not out:
            raise BadKey("bits", "names no role; leave it out for full precision (method = 'none')")
        return dict(sorted(out.items()))
    return {role: bits_key(value, "bits") for role in ROLES}


def number(value, key: str, default: float) -> float:
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise BadKey(key, f"must be a number > 0, got {value!r}")
    return float(value)


def positive_int(value, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BadKey(key, f"must be an integer >= {minimum}, got {value!r}")
    return value


def flag(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise BadKey(key, f"must be true or false, got {value!r}")
    return value


def calibration(value) -> dict:
    """`calibration = {samples, held_out, seed, steps}`: prompts sampled with the full-precision
    model (`samples` for the statistics, `held_out` more for the per-layer output error), every
    denoising step of a `steps`-step schedule, drawn from `seed`."""
    if not isinstance(value, dict):
        raise BadKey("calibration", f"must be a table {{samples, held_out, seed, steps}}, got {value!r}")
    for key in value:
        if key not in CALIBRATION_DEFAULTS:
            raise BadKey(f"calibration.{key}", f"unknown key; keys are {', '.join(CALIBRATION_DEFAULTS)}")
    out = {**CALIBRATION_DEFAULTS, **value}
    if out["samples"] == 0 or out["held_out"] == 0:
        empty = "samples" if out["samples"] == 0 else "held_out"
        raise BadKey(f"calibration.{empty}", "is 0: an empty calibration set; use at least 1 prompt")
    for key in ("samples", "held_out", "steps"):
        positive_int(out[key], f"calibration.{key}")
    positive_int(out["seed"], "calibration.seed", minimum=0)
    return out


def activations(keys: dict) -> dict:
    """act_bits 8 (quantized activations) or 16 (none), act_mode static or dynamic, calibration,
    and `keep_calibration = false` (write no calibration file: smaller run folders, but
    `engine verify --requantize` has nothing to re-run). It appears in the normalized params
    only when false, so that the configs (and hashes) of runs that keep it stay what they were."""
    act_bits = keys.get("act_bits", 16)
    if isinstance(act_bits, bool) or act_bits not in ACT_BITS:
        raise BadKey("act_bits", f"must be 8 (int8 activations) or 16 (not quantized), got {act_bits!r}")
    act_mode = keys.get("act_mode", "static")
    if act_mode not in ACT_MODES:
        raise BadKey("act_mode", f"must be one of {', '.join(ACT_MODES)}, got {act_mode!r}")
    out = {"act_bits": act_bits, "act_mode": act_mode, "calibration": calibration(keys.get("calibration", {}))}
    if not flag(keys.get("keep_calibration", True), "keep_calibration"):
        out["keep_calibration"] = False
    return out


