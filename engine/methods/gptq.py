"""Method `gptq`: GPTQ on the Linear layers of a transformer denoiser's blocks, block by block,
optionally with int8 activations (engine.quant.gptq, engine.quant.gptq_method)."""

from __future__ import annotations

from engine.methods.base import BadKey, MethodSpec
from engine.methods.blocks import check_blocks, prepare_calibrated, quantize_calibrated
from engine.methods.keys import activations, bits_key, flag, number, positive_int

KEYS = {"bits", "symmetric", "group_size", "damp", "act_order", "block_size", "act_bits", "act_mode", "calibration",
        "keep_calibration"}


def validate(keys: dict) -> dict:
    for key in keys:
        if key not in KEYS:
            raise BadKey(key, f"unknown key for method 'gptq'; keys are {', '.join(sorted(KEYS))}")
    if "bits" not in keys:
        raise BadKey("bits", "method 'gptq' needs bits (an integer 2-8)")
    group_size = keys.get("group_size")
    if group_size is not None:
        positive_int(group_size, "group_size")
    return {
        "bits": bits_key(keys["bits"], "bits"),
        "symmetric": flag(keys.get("symmetric", True), "symmetric"),
        "group_size": group_size,
        "damp": number(keys.get("damp"), "damp", 0.01),
        "act_order": flag(keys.get("act_order", False), "act_order"),
        "block_size": positive_int(keys.get("block_size", 128), "block_size"),
        **activations(keys),
    }


def describe(params: dict) -> str:
    group = f" g{params['group_size']}" if params.get("group_size") else ""
    return f"W{params['bits']}A{params['act_bits']}{group}"


SPEC = MethodSpec(name="gptq", validate=validate, describe=describe, quantize=quantize_calibrated,
                  check_model=check_blocks, prepare_load=prepare_calibrated("gptq"))
