"""Method `rtn`: round-to-nearest per output channel, bits by role (conv, attention, linear).

With `scope`, `act_bits`, `act_mode` or `calibration` it becomes calibrated RTN: activation
quantization and per-layer output errors measured as GPTQ measures them (the GPTQ baseline).
"""

from __future__ import annotations

from engine.methods.base import BadKey, MethodSpec, QuantContext, QuantResult
from engine.methods.blocks import check_blocks, prepare_calibrated, quantize_calibrated
from engine.methods.keys import ROLES, SCOPES, activations, role_bits

KEYS = {"bits", "symmetric", "scope", "act_bits", "act_mode", "calibration", "keep_calibration"}
CALIBRATED_KEYS = {"scope", "act_bits", "act_mode", "calibration"}


def validate(keys: dict) -> dict:
    for key in keys:
        if key not in KEYS:
            raise BadKey(key, f"unknown key for method 'rtn'; keys are {', '.join(sorted(KEYS))}")
    if "bits" not in keys:
        raise BadKey("bits", "method 'rtn' needs bits (an integer or a table of role = bits)")
    symmetric = keys.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise BadKey("symmetric", f"must be true or false, got {symmetric!r}")
    out = {"bits": role_bits(keys["bits"]), "symmetric": symmetric}
    # Calibrated RTN: these keys appear in the normalized form only when one is given, so that
    # the configs (and hashes) of plain RTN runs stay what they were.
    if CALIBRATED_KEYS & set(keys):
        scope = keys.get("scope", "all")
        if scope not in SCOPES:
            raise BadKey("scope", f"must be one of {', '.join(SCOPES)}, got {scope!r}")
        out["scope"] = scope
        out.update(activations(keys))
    elif "keep_calibration" in keys:
        raise BadKey("keep_calibration", "applies to calibrated RTN only (with scope, act_bits, act_mode "
                                         "or calibration): plain RTN writes no calibration file")
    return out


def describe_role_bits(bits: dict[str, int]) -> str:
    values = set(bits.values())
    if len(values) == 1 and set(bits) == set(ROLES):
        return f"W{values.pop()}"
    return ", ".join(f"{role} W{bits[role]}" if role in bits else f"{role} FP" for role in ROLES)


def describe(params: dict) -> str:
    weights = describe_role_bits(params.get("bits", {}))
    if params.get("act_bits") is None:
        return weights
    return weights + ("" if weights.startswith("W") else ", ") + f"A{params['act_bits']}"


def check_model(params: dict, tensors) -> None:
    if params.get("scope") == "blocks":
        check_blocks(params, tensors)


def is_calibrated(params: dict) -> bool:
    return "calibration" in params


def quantize(ctx: QuantContext) -> QuantResult:
    if is_calibrated(ctx.params):
        return quantize_calibrated(ctx)
    from engine.quant import RTNConfig, quantize_

    report = quantize_(ctx.model.denoiser, RTNConfig.from_dict(ctx.params))
    return QuantResult(layers=report.layers, packed=report.packed, half=report.half)


def prepare_load(denoiser, params: dict, state: dict) -> None:
    if is_calibrated(params):
        prepare_calibrated("rtn")(denoiser, params, state)


SPEC = MethodSpec(name="rtn", validate=validate, describe=describe, quantize=quantize, check_model=check_model,
                  prepare_load=prepare_load)
