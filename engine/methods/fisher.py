"""Method `fisher`: per-layer precision from Fisher information (the LAQFI study). Keys in
engine.fisher_keys; planning in engine.quant.fisher_method; the plan is applied with RTN."""

from __future__ import annotations

from engine.methods.base import BadKey, MethodSpec, QuantContext, QuantResult


def validate(keys: dict) -> dict:
    from engine.fisher_keys import validate_fisher

    return validate_fisher(keys)


def describe(params: dict) -> str:
    from engine.fisher_keys import describe_fisher

    return describe_fisher(params)


def check_model(params: dict, tensors) -> None:
    from engine.mixed_precision import PlanError, check_fisher_model

    model = tensors()
    if model is None:
        return
    try:
        check_fisher_model(params, model)
    except PlanError as exc:
        raise BadKey(exc.key, exc.message) from None


def quantize(ctx: QuantContext) -> QuantResult:
    from engine.prompts import sampling_prompts
    from engine.quant import quantize_
    from engine.quant.fisher_method import plan_fisher

    plan = plan_fisher(ctx.model, ctx.params, ctx.fp32_bytes, ctx.cache_dir, ctx.progress,
                       prompts=sampling_prompts(ctx.run.sampling), sampling=ctx.run.sampling)
    report = quantize_(ctx.model.denoiser, plan.config)
    return QuantResult(layers=plan.annotate(report.layers), packed=report.packed, half=report.half,
                       metrics=plan.metrics, max_bytes=plan.max_bytes)


SPEC = MethodSpec(name="fisher", validate=validate, describe=describe, quantize=quantize, check_model=check_model)
