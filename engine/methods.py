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
    allowed = {"bits", "symmetric"}
    for key in keys:
        if key not in allowed:
            raise BadKey(key, f"unknown key for method 'rtn'; keys are {', '.join(sorted(allowed))}")
    if "bits" not in keys:
        raise BadKey("bits", "method 'rtn' needs bits (an integer or a table of role = bits)")
    symmetric = keys.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise BadKey("symmetric", f"must be true or false, got {symmetric!r}")
    return {"bits": _role_bits(keys["bits"]), "symmetric": symmetric}


METHODS: dict[str, Callable[[dict], dict]] = {"none": _none, "rtn": _rtn}


def validate_method(method: str, keys: dict) -> dict:
    if method not in METHODS:
        raise BadKey("method", f"unknown method {method!r}; methods are {', '.join(METHODS)}")
    return METHODS[method](keys)


def describe_bits(method: str, params: dict) -> str:
    """A short label such as 'conv W4, attention W8' for tables."""
    if method == "none":
        return "FP32"
    bits = params.get("bits", {})
    values = set(bits.values())
    if len(values) == 1 and set(bits) == set(ROLES):
        return f"W{values.pop()}"
    return ", ".join(f"{role} W{bits[role]}" if role in bits else f"{role} FP" for role in ROLES)
