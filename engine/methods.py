"""Quantization methods as data: the keys each method takes in experiments.toml.

Validation lives here, free of torch, so that `engine list` and the TUI can check a catalogue
without importing the numerical code. Each validator takes the variant's method keys and
returns them normalized (the form stored in a run's config and hashed), or raises
`BadKey(key, message)`.
"""

from __future__ import annotations

from typing import Callable

ROLES = ("conv", "attention", "linear")
MIN_BITS, MAX_BITS = 2, 8
SCOPES = ("all", "blocks")  # every layer with a role, or only the transformer blocks' Linear layers
ACT_BITS = (8, 16)
ACT_MODES = ("static", "dynamic")
CALIBRATION_DEFAULTS = {"samples": 32, "held_out": 16, "seed": 1, "steps": 20}


class BadKey(Exception):
    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key, self.message = key, message


def _bits(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadKey(key, f"bits must be an integer, got {value!r}")
    if not MIN_BITS <= value <= MAX_BITS:
        raise BadKey(key, f"bits must be between {MIN_BITS} and {MAX_BITS}, got {value}")
    return value


def _role_bits(value) -> dict[str, int]:
    """`bits = 4` (every role) or `bits = {conv = 4, attention = 8}` (roles not named stay FP)."""
    if isinstance(value, dict):
        out = {}
        for role, b in value.items():
            if role not in ROLES:
                raise BadKey(f"bits.{role}", f"unknown role {role!r}; roles are {', '.join(ROLES)}")
            out[role] = _bits(b, f"bits.{role}")
        if not out:
            raise BadKey("bits", "names no role; leave it out for full precision (method = 'none')")
        return dict(sorted(out.items()))
    return {role: _bits(value, "bits") for role in ROLES}


def _none(keys: dict) -> dict:
    for key in keys:
        raise BadKey(key, "method 'none' (full precision) takes no quantization keys")
    return {}


def _rtn(keys: dict) -> dict:
    allowed = {"bits", "symmetric", "scope", "act_bits", "act_mode", "calibration"}
    for key in keys:
        if key not in allowed:
            raise BadKey(key, f"unknown key for method 'rtn'; keys are {', '.join(sorted(allowed))}")
    if "bits" not in keys:
        raise BadKey("bits", "method 'rtn' needs bits (an integer or a table of role = bits)")
    symmetric = keys.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise BadKey("symmetric", f"must be true or false, got {symmetric!r}")
    out = {"bits": _role_bits(keys["bits"]), "symmetric": symmetric}
    # Calibrated RTN (activation quantization, a layer scope, per-layer output errors): these
    # keys appear in the normalized form only when one is given, so that the configs (and
    # hashes) of plain RTN runs stay what they were.
    if {"scope", "act_bits", "act_mode", "calibration"} & set(keys):
        scope = keys.get("scope", "all")
        if scope not in SCOPES:
            raise BadKey("scope", f"must be one of {', '.join(SCOPES)}, got {scope!r}")
        out["scope"] = scope
        out.update(_activations(keys))
    return out


def _number(value, key: str, default: float) -> float:
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise BadKey(key, f"must be a number > 0, got {value!r}")
    return float(value)


def _positive_int(value, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BadKey(key, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _flag(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise BadKey(key, f"must be true or false, got {value!r}")
    return value


def _calibration(value) -> dict:
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
        _positive_int(out[key], f"calibration.{key}")
    _positive_int(out["seed"], "calibration.seed", minimum=0)
    return out


def _activations(keys: dict) -> dict:
    """act_bits 8 (quantized activations) or 16 (none), act_mode static or dynamic, calibration."""
    act_bits = keys.get("act_bits", 16)
    if isinstance(act_bits, bool) or act_bits not in ACT_BITS:
        raise BadKey("act_bits", f"must be 8 (int8 activations) or 16 (not quantized), got {act_bits!r}")
    act_mode = keys.get("act_mode", "static")
    if act_mode not in ACT_MODES:
        raise BadKey("act_mode", f"must be one of {', '.join(ACT_MODES)}, got {act_mode!r}")
    return {"act_bits": act_bits, "act_mode": act_mode, "calibration": _calibration(keys.get("calibration", {}))}


def _gptq(keys: dict) -> dict:
    """GPTQ on the Linear layers of the denoiser's transformer blocks (see engine.quant.gptq)."""
    allowed = {"bits", "symmetric", "group_size", "damp", "act_order", "block_size",
               "act_bits", "act_mode", "calibration"}
    for key in keys:
        if key not in allowed:
            raise BadKey(key, f"unknown key for method 'gptq'; keys are {', '.join(sorted(allowed))}")
    if "bits" not in keys:
        raise BadKey("bits", "method 'gptq' needs bits (an integer 2-8)")
    group_size = keys.get("group_size")
    if group_size is not None:
        _positive_int(group_size, "group_size")
    return {
        "bits": _bits(keys["bits"], "bits"),
        "symmetric": _flag(keys.get("symmetric", True), "symmetric"),
        "group_size": group_size,
        "damp": _number(keys.get("damp"), "damp", 0.01),
        "act_order": _flag(keys.get("act_order", False), "act_order"),
        "block_size": _positive_int(keys.get("block_size", 128), "block_size"),
        **_activations(keys),
    }


def _fisher(keys: dict) -> dict:
    """Per-layer precision from Fisher information (the LAQFI study): see engine.fisher_keys."""
    from engine.fisher_keys import validate_fisher

    return validate_fisher(keys)


METHODS: dict[str, Callable[[dict], dict]] = {"none": _none, "rtn": _rtn, "gptq": _gptq, "fisher": _fisher}


def validate_method(method: str, keys: dict) -> dict:
    if method not in METHODS:
        raise BadKey("method", f"unknown method {method!r}; methods are {', '.join(METHODS)}")
    return METHODS[method](keys)


def _check_blocks(params: dict, model) -> None:
    """GPTQ and scope = "blocks" need transformer blocks; a group size must divide the input
    width of every Linear layer in them."""
    if model is None:
        return
    blocks = [layer for layer in model.layers
              if layer.name.startswith("transformer_blocks.") and len(layer.shape) == 2]
    if not blocks:
        raise BadKey("method", "needs a transformer denoiser (Linear layers in transformer_blocks); "
                               "this model has none")
    size = params.get("group_size")
    for layer in blocks if size else []:
        if layer.shape[1] % size:
            raise BadKey("group_size", f"{size} does not divide the input width {layer.shape[1]} "
                                       f"of layer {layer.name}")


def check_against_model(method: str, params: dict, tensors: Callable[[], object]) -> None:
    """The checks of a method's keys that need the model's layer names and shapes. `tensors()`
    returns an `engine.mixed_precision.ModelTensors` read torch-free from the model's header, or
    None when it cannot be read (the worker then checks exactly). Raises BadKey."""
    if method == "gptq" or params.get("scope") == "blocks":
        _check_blocks(params, tensors())
        return
    if method != "fisher":
        return
    from engine.mixed_precision import PlanError, check_fisher_model

    model = tensors()
    if model is None:
        return
    try:
        check_fisher_model(params, model)
    except PlanError as exc:
        raise BadKey(exc.key, exc.message) from None


def describe_bits(method: str, params: dict) -> str:
    """A short label such as 'conv W4, attention W8' for tables."""
    if method == "none":
        return "FP32"
    if method == "fisher":
        from engine.fisher_keys import describe_fisher

        return describe_fisher(params)
    if method == "gptq":
        group = f" g{params['group_size']}" if params.get("group_size") else ""
        return f"W{params['bits']}A{params['act_bits']}{group}"
    if params.get("act_bits") is not None:
        weights = describe_bits(method, {"bits": params["bits"]})
        return weights + ("" if weights.startswith("W") else ", ") + f"A{params['act_bits']}"
    bits = params.get("bits", {})
    values = set(bits.values())
    if len(values) == 1 and set(bits) == set(ROLES):
        return f"W{values.pop()}"
    return ", ".join(f"{role} W{bits[role]}" if role in bits else f"{role} FP" for role in ROLES)
