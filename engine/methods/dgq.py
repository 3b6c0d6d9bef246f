"""Method `dgq`: distribution-aware group quantization of activations and attention scores
(Ryu et al., ICLR 2025) with RTN weights. Keys in engine.methods.dgq_keys; the numerical code
in engine.quant.dgq."""

from __future__ import annotations

from engine.methods.base import MethodSpec, QuantContext, QuantResult
from engine.methods.dgq_keys import check_keys_against_model, describe_keys, validate_keys


def quantize_activations(ctx: QuantContext, minmax: bool) -> QuantResult:
    from dataclasses import asdict

    from engine.prompts import sampling_prompts
    from engine.quant.dgq.calibration import DGQSettings, quantize_dgq

    settings = DGQSettings.from_params(ctx.params, minmax=minmax)
    sampling = {**asdict(ctx.run.sampling), "prompts": sampling_prompts(ctx.run.sampling)}
    result = quantize_dgq(ctx.model, settings, sampling, ctx.progress)
    return QuantResult(layers=result.layers, packed=result.packed, half=result.half, metrics=result.metrics)


def prepare_activations(minmax: bool):
    """`MethodSpec.prepare_load` of dgq and minmax: group and softmax quantizers shaped as in the
    checkpoint."""
    def prepare(denoiser, params: dict, state: dict) -> None:
        from engine.quant.dgq.calibration import DGQSettings, prepare_quantized

        prepare_quantized(denoiser, DGQSettings.from_params(params, minmax=minmax), state)
    return prepare


SPEC = MethodSpec(
    name="dgq",
    validate=lambda keys: validate_keys("dgq", keys),
    describe=lambda params: describe_keys("dgq", params),
    quantize=lambda ctx: quantize_activations(ctx, minmax=False),
    check_model=check_keys_against_model,
    prepare_load=prepare_activations(minmax=False),
)
