"""Keys of the activation-quantizing methods `dgq` and `minmax` (its baseline): torch-free.

    bits = 8                  weights, RTN per output channel, every conv/attention/linear layer
    symmetric = true          the weights' grid
    act_bits = 6              every quantized layer's input, 4..8 bits
    attn_bits = 6             attention scores (softmax output), 4..8 bits (default act_bits)
    groups = 16               dgq: activation groups per layer (K; 1 = per tensor)
    log_quant, start_token_fp, prompt_scaling = true   dgq: the three attention parts
    calibration = { samples = 32, seed = 1, steps = 20 }   prompts sampled with the FP model
"""

from __future__ import annotations

from typing import Callable

from engine.methods.base import BadKey
from engine.methods.keys import bits_key, flag, positive_int

ACT_BITS = (4, 8)
CALIBRATION = {"samples": 32, "seed": 1, "steps": 20}
COMMON_KEYS = {"bits", "symmetric", "act_bits", "attn_bits", "calibration"}
DGQ_KEYS = COMMON_KEYS | {"groups", "log_quant", "start_token_fp", "prompt_scaling"}
# Inputs without positions ([batch, channels]) in diffusers UNets: the timestep and class embeddings.
NO_POSITION_PARTS = ("time_embedding", "time_emb_proj", "add_embedding", "class_embedding")


def act_bits_key(value, key: str) -> int:
    low, high = ACT_BITS
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadKey(key, f"must be an integer between {low} and {high}, got {value!r}")
    return value


def calibration_key(value) -> dict:
    if not isinstance(value, dict):
        raise BadKey("calibration", f"must be a table {{samples, seed, steps}}, got {value!r}")
    for key in value:
        if key not in CALIBRATION:
            raise BadKey(f"calibration.{key}", f"unknown key; keys are {', '.join(CALIBRATION)}")
    out = {**CALIBRATION, **value}
    if out["samples"] == 0:
        raise BadKey("calibration.samples", "is 0: an empty calibration set; use at least 1 prompt")
    positive_int(out["samples"], "calibration.samples")
    positive_int(out["steps"], "calibration.steps")
    positive_int(out["seed"], "calibration.seed", minimum=0)
    return out


def validate_keys(method: str, keys: dict) -> dict:
    allowed = DGQ_KEYS if method == "dgq" else COMMON_KEYS
    for key in keys:
        if key not in allowed:
            raise BadKey(key, f"unknown key for method {method!r}; keys are {', '.join(sorted(allowed))}")
    for key in ("bits", "act_bits"):
        if key not in keys:
            raise BadKey(key, f"method {method!r} needs {key}")
    act_bits = act_bits_key(keys["act_bits"], "act_bits")
    out = {"bits": bits_key(keys["bits"], "bits"), "symmetric": flag(keys.get("symmetric", True), "symmetric"),
           "act_bits": act_bits, "attn_bits": act_bits_key(keys.get("attn_bits", act_bits), "attn_bits"),
           "calibration": calibration_key(keys.get("calibration", {}))}
    if method == "dgq":
        out["groups"] = positive_int(keys.get("groups", 16), "groups")
        for key in ("log_quant", "start_token_fp", "prompt_scaling"):
            out[key] = flag(keys.get(key, True), key)
    return out


def describe_keys(method: str, params: dict) -> str:
    bits = f"W{params['bits']}A{params['act_bits']}"
    if params["attn_bits"] != params["act_bits"]:
        bits += f" S{params['attn_bits']}"
    if method == "minmax":
        return bits + " min-max"
    off = [short for key, short in (("log_quant", "log"), ("start_token_fp", "start"), ("prompt_scaling", "prompt"))
           if not params[key]]
    return f"{bits} g{params['groups']}" + "".join(f" -{s}" for s in off)


def check_keys_against_model(params: dict, tensors: Callable[[], object]) -> None:
    """Joint attention is refused; K may not exceed the channels of an input without positions
    (the other inputs' position counts are known only at calibration, which checks them)."""
    model = tensors()
    if model is None:
        return
    if any(layer.name.endswith("add_q_proj") for layer in model.layers):
        raise BadKey("method", "needs a UNet-style denoiser (self- and cross-attention); "
                               "this model has joint attention (MMDiT)")
    k = params.get("groups", 1)
    for layer in model.layers:
        if any(part in layer.name.split(".")[-2:] or layer.name.startswith(part) for part in NO_POSITION_PARTS):
            channels = layer.shape[1]
            if k > channels:
                raise BadKey("groups", f"{k} groups exceed the {channels} input channels of layer {layer.name} "
                                       "(its input has no positions to group instead)")
