"""Quantization methods: one module per method, each defining its `SPEC` (engine.methods.base).

    validate_method(method, keys)     the variant's keys, normalized, or BadKey (torch-free)
    check_against_model(...)          the checks that need the model's layer shapes
    describe_bits(method, params)     a short label for tables
    quantize_model(ctx)               quantize a run's denoiser: the one verb the pipeline calls

A new method is a new module listed in `METHOD_MODULES`.
"""

from __future__ import annotations

import importlib
from typing import Callable

from engine.methods.base import BadKey, MethodSpec, QuantContext, QuantResult
from engine.methods.keys import ROLES

METHOD_MODULES = ("none", "rtn", "gptq", "fisher", "dgq", "minmax", "qat", "ptq")


def _load() -> dict[str, MethodSpec]:
    specs = {}
    for name in METHOD_MODULES:
        spec = importlib.import_module(f"engine.methods.{name}").SPEC
        specs[spec.name] = spec
    return specs


METHODS: dict[str, MethodSpec] = _load()


def method_spec(method: str) -> MethodSpec:
    if method not in METHODS:
        raise BadKey("method", f"unknown method {method!r}; methods are {', '.join(METHODS)}")
    return METHODS[method]


def validate_method(method: str, keys: dict) -> dict:
    return method_spec(method).validate(keys)


def check_against_model(method: str, params: dict, tensors: Callable[[], object]) -> None:
    """The checks of a method's keys that need the model's layer names and shapes. `tensors()`
    returns an `engine.mixed_precision.ModelTensors` read torch-free from the model's header, or
    None when it cannot be read (the worker then checks exactly). Raises BadKey."""
    check = method_spec(method).check_model
    if check is not None:
        check(params, tensors)


def resolve_paths(method: str, params: dict, base) -> dict:
    """The params with their path keys made absolute against `base` (the catalogue's folder)."""
    resolve = method_spec(method).resolve_paths
    return params if resolve is None else resolve(params, base)


def describe_bits(method: str, params: dict) -> str:
    """A short label such as 'conv W4, attention W8' for tables."""
    return method_spec(method).describe(params)


def describe_run(config: dict, dtype_bits: float | None = None) -> str:
    """`describe_bits` of a stored run config; a full-precision run is labelled with the dtype it
    ran in (FP32, FP16, BF16), from its model options and its `dtype_bits` metric."""
    method = config.get("method", "none")
    if method == "none":
        from engine.methods.none import full_precision_label

        return full_precision_label((config.get("model_options") or {}).get("dtype"), dtype_bits)
    return describe_bits(method, config.get("params") or {})


def describe_variant(experiment, variant) -> str:
    """A catalogue variant's label: `describe_run` with the experiment's dtype (FP for auto)."""
    return describe_run({"method": variant.method, "params": variant.params,
                         "model_options": {"dtype": experiment.options.dtype}})


def quantize_model(ctx: QuantContext) -> QuantResult:
    return method_spec(ctx.run.method).quantize(ctx)


def load_quantized_file(denoiser, method: str, params: dict, path) -> None:
    """`load_quantized` from a packed checkpoint file, streamed into the denoiser one tensor at a
    time (`engine.quant.packing.load_packed_into`): no float32 copy of the model is made."""
    from engine.quant.packing import PackedState, load_packed_into

    prepare = method_spec(method).prepare_load
    if prepare is not None:
        prepare(denoiser, params, PackedState(path))
    load_packed_into(denoiser, path)


def load_quantized(denoiser, method: str, params: dict, state: dict) -> None:
    """Load a run's stored state (`engine.quant.load_packed`) into a freshly loaded
    full-precision denoiser, strictly: the method first adds what the state expects (its
    activation quantizers, DGQ's group scales)."""
    prepare = method_spec(method).prepare_load
    if prepare is not None:
        prepare(denoiser, params, state)
    denoiser.load_state_dict(state, strict=True)


__all__ = ["BadKey", "METHODS", "ROLES", "MethodSpec", "QuantContext", "QuantResult", "check_against_model",
           "describe_bits", "describe_run", "describe_variant", "load_quantized", "load_quantized_file", "method_spec", "quantize_model",
           "resolve_paths", "validate_method"]
