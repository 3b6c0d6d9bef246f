"""Method `ptq`: static W8A8 post-training quantization with torchao's PT2E flow and the X86
Inductor quantizer (int8 per-channel weights, uint8 per-tensor activations calibrated on seeded
prompts over the whole schedule); real int8 kernels through torch.compile with
`execution = "real"` (engine.quant.ptq.pt2e)."""

from __future__ import annotations

from engine.methods.base import BadKey, MethodSpec, QuantContext, QuantResult
from engine.methods.keys import calibration

KEYS = {"bits", "act_bits", "calibration"}


def validate(keys: dict) -> dict:
    for key in keys:
        if key not in KEYS:
            raise BadKey(key, f"unknown key for method 'ptq'; keys are {', '.join(sorted(KEYS))}")
    for key in ("bits", "act_bits"):
        value = keys.get(key, 8)
        if isinstance(value, bool) or value != 8:
            raise BadKey(key, f"method 'ptq' is static W8A8 (X86 int8 kernels): {key} must be 8, got {value!r}")
    return {"bits": 8, "act_bits": 8, "calibration": calibration(keys.get("calibration", {}))}


def describe(params: dict) -> str:
    return "PTQ W8A8 (PT2E)"


def quantize(ctx: QuantContext) -> QuantResult:
    from dataclasses import asdict

    from engine.prompts import sampling_prompts
    from engine.quant.ptq.pt2e import GRAPH_FILE, quantize_pt2e
    from engine.quant.roles import quantizable_layers

    sampling = {**asdict(ctx.run.sampling), "prompts": sampling_prompts(ctx.run.sampling)}
    runtime, metrics, path = quantize_pt2e(ctx.model, ctx.params["calibration"], sampling, ctx.folder, ctx.progress)
    layers = [{"name": name, "role": role, "params": m.weight.numel(),
               "bits": 8 if type(m).__name__ in ("Conv2d", "Linear") else None, "weight_err": None}
              for name, m, role in quantizable_layers(ctx.model.denoiser)]
    return QuantResult(layers=layers, packed=None, metrics=metrics, checkpoint=path, runtime=runtime,
                       artifacts={"graph": ctx.folder / GRAPH_FILE})


SPEC = MethodSpec(name="ptq", validate=validate, describe=describe, quantize=quantize)
