"""Method `none`: full precision, the reference every variant is compared with."""

from __future__ import annotations

from engine.methods.base import BadKey, MethodSpec, QuantContext, QuantResult


def validate(keys: dict) -> dict:
    for key in keys:
        raise BadKey(key, "method 'none' (full precision) takes no quantization keys")
    return {}


DTYPE_LABELS = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16"}


def describe(params: dict) -> str:
    return "FP"  # the model's own dtype: `full_precision_label` names it where the config is known


def full_precision_label(dtype: str | None, dtype_bits: float | None = None) -> str:
    """The label of a full-precision run: the dtype it sampled in. `dtype` is the experiment's
    (`auto`: float16 on CUDA, float32 elsewhere and for the digits models), `dtype_bits` the
    run's measured `dtype_bits` metric, which settles `auto` once the run has run."""
    if dtype in DTYPE_LABELS:
        return DTYPE_LABELS[dtype]
    if dtype_bits is not None:
        return "FP16" if dtype_bits == 16 else "FP32"
    return "FP"


def quantize(ctx: QuantContext) -> QuantResult:
    from engine.quant import quantizable_layers

    layers = [{"name": name, "role": role, "params": module.weight.numel(), "bits": None, "weight_err": None}
              for name, module, role in quantizable_layers(ctx.model.denoiser)]
    return QuantResult(layers=layers, packed=None)


SPEC = MethodSpec(name="none", validate=validate, describe=describe, quantize=quantize)
