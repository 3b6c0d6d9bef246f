"""Checks shared by the methods that quantize a transformer denoiser's blocks (GPTQ, and RTN
with `scope = "blocks"`), and their calibrated quantization: torch-free at import."""

from __future__ import annotations

from typing import Callable

from engine.methods.base import BadKey, QuantContext, QuantResult


def check_blocks(params: dict, tensors: Callable[[], object]) -> None:
    """GPTQ and scope = "blocks" need transformer blocks; a group size must divide the input
    width of every Linear layer in them."""
    model = tensors()
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


def prepare_calibrated(method: str):
    """`MethodSpec.prepare_load` of the calibrated methods: their activation quantizers."""
    def prepare(denoiser, params: dict, state: dict) -> None:
        from engine.quant.gptq_method import prepare_quantized

        prepare_quantized(denoiser, method, params)
    return prepare


def quantize_calibrated(ctx: QuantContext) -> QuantResult:
    """Calibrate with the full-precision model, then quantize block by block
    (engine.quant.gptq_method); the calibration file is a run artifact unless
    `keep_calibration = false`."""
    from dataclasses import asdict

    from engine.prompts import sampling_prompts
    from engine.quant.gptq_method import quantize_calibrated as run

    sampling = {**asdict(ctx.run.sampling), "prompts": sampling_prompts(ctx.run.sampling)}
    result = run(ctx.model, ctx.run.method, ctx.params, sampling, ctx.folder, ctx.progress)
    kept = {"calibration": result.calibration_path} if result.calibration_path is not None else {}
    return QuantResult(layers=result.layers, packed=result.packed, metrics=result.metrics, artifacts=kept)
