"""Method `qat`: quantization-aware training. LSQ fake quantizers (weights W4 or W8 per output
channel, optionally int8 static inputs of every Linear) are inserted into the denoiser, which is
fine-tuned with its own training loss for `steps` seeded steps, then converted to packed codes
and evaluated like every other variant (engine.quant.qat)."""

from __future__ import annotations

from engine.methods.base import BadKey, MethodSpec, QuantContext, QuantResult
from engine.methods.keys import number, positive_int, role_bits
from engine.methods.rtn import describe_role_bits

KEYS = {"bits", "act_bits", "steps", "lr", "batch_size", "seed"}
QAT_BITS = (4, 8)


def validate(keys: dict) -> dict:
    for key in keys:
        if key not in KEYS:
            raise BadKey(key, f"unknown key for method 'qat'; keys are {', '.join(sorted(KEYS))}")
    for key in ("bits", "steps"):
        if key not in keys:
            raise BadKey(key, f"method 'qat' needs {key}")
    bits = role_bits(keys["bits"])
    for role, b in bits.items():
        if b not in QAT_BITS:
            raise BadKey("bits" if isinstance(keys["bits"], int) else f"bits.{role}",
                         f"QAT quantizes weights to 4 or 8 bits, got {b}")
    act_bits = keys.get("act_bits", 16)
    if isinstance(act_bits, bool) or act_bits not in (8, 16):
        raise BadKey("act_bits", f"must be 8 (int8 inputs of each Linear) or 16 (not quantized), got {act_bits!r}")
    steps = keys["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise BadKey("steps", f"fine-tuning steps must be an integer > 0, got {steps!r}")
    return {
        "bits": bits,
        "act_bits": act_bits,
        "steps": steps,
        "lr": number(keys.get("lr"), "lr", 1e-4),
        "batch_size": positive_int(keys.get("batch_size", 64), "batch_size"),
        "seed": positive_int(keys.get("seed", 0), "seed", minimum=0),
    }


def describe(params: dict) -> str:
    weights = describe_role_bits(params["bits"])
    acts = f"A{params['act_bits']}" if params["act_bits"] == 8 else ""
    return f"QAT {weights}{acts}, {params['steps']} steps"


def quantize(ctx: QuantContext) -> QuantResult:
    from engine.quant.qat.finetune import QATConfig, quantize_qat

    p = ctx.params
    cfg = QATConfig(bits=p["bits"], steps=p["steps"], act_bits=p["act_bits"], lr=p["lr"],
                    batch_size=p["batch_size"], seed=p["seed"])
    result = quantize_qat(ctx.model, cfg, ctx.progress)
    return QuantResult(layers=result.layers, packed=result.packed, metrics=result.metrics)


def prepare_load(denoiser, params: dict, state: dict) -> None:
    """The static int8 input quantizers of the Linear layers whose scale the checkpoint holds."""
    from torch import nn

    from engine.quant.act_quant import SCALE_BUFFER, add_act_quant

    if params["act_bits"] != 8:
        return
    for name, module in denoiser.named_modules():
        if isinstance(module, nn.Linear) and f"{name}.{SCALE_BUFFER}" in state:
            add_act_quant(module, 8, "static", absmax=1.0)  # the scale is the checkpoint's


SPEC = MethodSpec(name="qat", validate=validate, describe=describe, quantize=quantize, prepare_load=prepare_load)
