"""Method `none`: full precision, the reference every variant is compared with."""

from __future__ import annotations

from engine.methods.base import BadKey, MethodSpec, QuantContext, QuantResult


def validate(keys: dict) -> dict:
    for key in keys:
        raise BadKey(key, "method 'none' (full precision) takes no quantization keys")
    return {}


def describe(params: dict) -> str:
    return "FP32"


def quantize(ctx: QuantContext) -> QuantResult:
    from engine.quant import quantizable_layers

    layers = [{"name": name, "role": role, "params": module.weight.numel(), "bits": None, "weight_err": None}
              for name, module, role in quantizable_layers(ctx.model.denoiser)]
    return QuantResult(layers=layers, packed=None)


SPEC = MethodSpec(name="none", validate=validate, describe=describe, quantize=quantize)
