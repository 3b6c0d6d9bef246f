"""Calibrated post-training quantization of a transformer denoiser: the `gptq` method, and RTN
with activation quantization (`rtn` with act_bits / scope) measured the same way.

Which layers: the nn.Linear layers inside `denoiser.transformer_blocks` (attention projections,
adaLN modulations, feed-forwards of both MMDiT streams). The patch, timestep and prompt
embedders and the final modulation and projection stay full precision (`FP_REASONS`): they
hold few parameters, and they are the model's input and output interfaces, where errors are
not averaged over any later layer. Plain `rtn` with `scope = "all"` quantizes every layer by role.

Steps of `quantize_calibrated`; the denoiser keeps its full-precision weights until the last:
1. calibration (`calibration_s`): sample the calibration prompts with the full-precision model,
   recording each target Linear's input absmax (static activation scales) and, for GPTQ, the
   inputs of the first transformer block (`BlockInputs`; their size is in
   `engine.quant.calibration_hessians`). The calibration file is written now (a temporary
   name, renamed once everything succeeded): the config, the absmax values and, for GPTQ, those
   block inputs; `keep_calibration = false` skips it.
2. quantization (`quantize_s`), into codes only. GPTQ goes block by block
   (`engine.quant.gptq_blocks`): block k's Hessians from block k run on its inputs, which are
   the outputs of the quantized blocks 0..k-1; one block's Hessians and one quantized copy of
   one block are alive at a time. RTN rounds each weight to its grid (per output channel), layer
   by layer, without calibration data.
3. out_err (part of `calibration_s`): the held-out prompts are sampled with the still
   full-precision model; hooks compute each layer's relative output error with its activation
   quantization directly, for the method's weights and (GPTQ runs) RTN's
   (`engine.quant.held_out_error`): every layer sees the full-precision model's inputs.
4. installation: each target gets its quantized weight (dequantized from its codes), its bias
   rounded to float16 and its activation quantizer.
Held at the end: the codes (`QuantizedTensor` per layer, what the packed checkpoint stores) and
the layer table; no float copy of any layer's weight, no Hessian, no clone of the model.

On any error before step 4 the model is untouched (its weights were only read) and nothing is
written; step 4 only copies tensors, after every check that could fail has passed (biases in
the float16 range and no activation quantizer already there are checked before step 1).
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from engine.atomic_files import atomic_path
from engine.models.loader import TextToImageModel
from engine.quant.act_quant import act_quant_of, add_act_quant, fake_quant_dynamic, fake_quant_static, static_scale
from engine.quant.calibration_hessians import (
    CALIBRATION_FILE,
    AbsMax,
    BlockInputs,
    calibration_set,
    load_calibration,
    run_sampler,
    write_calibration,
)
from engine.quant.gptq import rtn_grouped
from engine.quant.gptq_blocks import GPTQ_KEYS, LayerQuant, fp16_bias, gptq_block_by_block, set_quantized
from engine.quant.held_out_error import HeldOutErrors
from engine.quant.roles import quantizable_layers
from engine.quant.rtn import QuantizedTensor, dequantize, quantize_tensor, relative_error

Progress = Callable[..., None]

FP_REASONS = {
    "pos_embed": "patch embedder: the model's input (a convolution), few parameters",
    "time_text_embed": "timestep and pooled-prompt embedder: few parameters, conditions every block",
    "context_embedder": "prompt embedder: input projection of the text tokens",
    "norm_out": "final adaLN modulation: feeds the output projection directly",
    "proj_out": "final projection to pixels: the model's output",
}


def fp_reason(name: str) -> str:
    return FP_REASONS.get(name.split(".")[0], "outside the transformer blocks")


def needs_calibration(method: str, params: dict) -> bool:
    """GPTQ, and RTN with activation quantization or a layer scope, go through this module."""
    return method == "gptq" or (method == "rtn" and "calibration" in params)


def transformer_blocks(denoiser: nn.Module) -> nn.ModuleList:
    blocks = getattr(denoiser, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"{type(denoiser).__name__} has no transformer_blocks: GPTQ and scope = "
                         "'blocks' need a transformer denoiser (such as SD3Transformer2DModel)")
    return blocks


@dataclass
class Target:
    name: str
    module: nn.Module
    role: str
    bits: int
    block: int | None  # index in transformer_blocks (None: outside, scope "all")


def targets_of(denoiser: nn.Module, method: str, params: dict) -> list[Target]:
    """The layers to quantize, in model order, with their bits."""
    if method == "gptq" or params.get("scope") == "blocks":
        transformer_blocks(denoiser)
        out = []
        for name, module, role in quantizable_layers(denoiser):
            parts = name.split(".")
            if parts[0] == "transformer_blocks" and isinstance(module, nn.Linear):
                bits = params["bits"] if method == "gptq" else params["bits"].get(role)
                if bits is not None:
                    out.append(Target(name, module, role, bits, int(parts[1])))
        return out
    return [Target(name, module, role, params["bits"][role], None)
            for name, module, role in quantizable_layers(denoiser) if role in params["bits"]]


def check_group_size(targets: list[Target], group_size: int | None) -> None:
    if group_size is None:
        return
    for t in targets:
        width = t.module.weight.shape[1]
        if width % group_size:
            raise ValueError(f"group_size {group_size} does not divide the input width {width} of {t.name}; "
                             "choose a divisor of every quantized layer's width")


def activation_quantizer(bits: int, mode: str, absmax: float | None):
    """x -> q(x), as the installed hook computes it (without installing anything)."""
    if mode == "dynamic":
        return lambda x: fake_quant_dynamic(x, bits)
    scale = static_scale(absmax, bits)
    return lambda x: fake_quant_static(x, scale, bits)


@dataclass
class CalibratedQuant:
    layers: list[dict]
    packed: dict[str, QuantizedTensor]
    metrics: dict[str, float]
    calibration_path: Path | None  # None: keep_calibration = false


def check_installable(targets: list[Target]) -> None:
    """What could make step 4 fail, checked before anything is computed."""
    for t in targets:
        if t.module.bias is not None:
            fp16_bias(t.name, t.module.bias)
        if act_quant_of(t.module):
            raise ValueError(f"{t.name} already quantizes its activations (a quantized model?)")


def install(targets: list[Target], quants: dict[str, LayerQuant], act_bits: int, act_mode: str,
            absmax: dict[str, float]) -> None:
    """Step 4: quantized weights, float16 biases and activation quantizers into the model."""
    for t in targets:
        set_quantized(t.name, t.module, dequantize(quants[t.name].packed))
        if act_bits != 16 and isinstance(t.module, nn.Linear):
            add_act_quant(t.module, act_bits, act_mode, absmax[t.name])


def rtn_layers(targets: list[Target], symmetric: bool) -> dict[str, LayerQuant]:
    """RTN per output channel, one layer at a time (no calibration data)."""
    out = {}
    for t in targets:
        packed = quantize_tensor(t.module.weight.detach(), t.bits, symmetric)
        out[t.name] = LayerQuant(packed, relative_error(t.module.weight, dequantize(packed)), 0)
    return out


def calibration_meta(method: str, params: dict, model: TextToImageModel, sampling: dict,
                     targets: list[Target]) -> dict:
    return {"method": method, "params": params, "model": str(model.path),
            "sampling": {"guidance": sampling["guidance"], "batch_size": sampling["batch_size"]},
            "layers": [t.name for t in targets]}


def quantize_calibrated(model: TextToImageModel, method: str, params: dict, sampling: dict, folder: Path,
                        progress: Progress | None = None) -> CalibratedQuant:
    """Calibrate, quantize (weights, fp16 biases, activation quantizers: installed in place at
    the end) and measure per-layer errors; returns the layer table, the codes to pack and the
    timings. See the module docstring for the steps."""
    denoiser = model.denoiser
    targets = targets_of(denoiser, method, params)
    if not targets:
        raise ValueError("no layer to quantize: the bits name no role the model's blocks have")
    check_group_size(targets, params.get("group_size"))
    check_installable(targets)
    cfg = params["calibration"]
    act_bits, act_mode = params.get("act_bits", 16), params.get("act_mode", "static")
    linears = {t.name: t.module for t in targets if isinstance(t.module, nn.Linear)}
    report = (lambda stage: lambda done, total: progress(stage, done, total)) if progress else (lambda stage: None)

    # 1. calibration with the full-precision model
    start = time.time()
    cal = calibration_set(model, cfg, sampling.get("prompts"))
    absmax = AbsMax(linears)
    inputs, handle = (BlockInputs.record(transformer_blocks(denoiser)[0]) if method == "gptq" else (None, None))
    try:
        run_sampler(model, cal.prompts, cal.noise, cfg, sampling, report("calibrate"))
    finally:
        absmax.remove()
        if handle is not None:
            handle.remove()
    calibration_s = time.time() - start

    keep = params.get("keep_calibration", True)
    path = Path(folder) / CALIBRATION_FILE
    with atomic_path(path) if keep else nullcontext() as tmp:
        calibration_bytes = 0
        if keep:
            meta = calibration_meta(method, params, model, sampling, targets)
            tensors = {f"absmax.{name}": torch.tensor(value) for name, value in absmax.values.items()}
            if inputs is not None:
                meta["block_inputs"] = inputs.layout()
                tensors.update(inputs.tensors())
            calibration_bytes = write_calibration(tmp, meta, tensors)
            del tensors

        # 2. quantization, into codes (the model's weights are only read)
        start = time.time()
        if method == "gptq":
            quants = gptq_block_by_block(transformer_blocks(denoiser), targets, inputs.calls, params,
                                         act_installer(act_bits, act_mode, absmax.values), progress)
            inputs.calls.clear()
        else:
            quants = rtn_layers(targets, params["symmetric"])
        quantize_s = time.time() - start

        # 3. out_err on the held-out prompts, with the full-precision model
        start = time.time()
        errors = HeldOutErrors(linears, error_candidates(method, params, targets, quants),
                               {name: activation_quantizer(act_bits, act_mode, absmax.values[name])
                                for name in linears} if act_bits != 16 else {})
        try:
            run_sampler(model, cal.held_out_prompts, cal.held_out_noise, cfg, sampling, report("held-out"))
        finally:
            errors.remove()
        empty = [name for name, n in errors.tokens.items() if n == 0]
        if empty:
            raise ValueError(f"empty calibration set for {empty[0]}: the layer never ran on the held-out prompts")
        calibration_s += time.time() - start

    # 4. installation
    install(targets, quants, act_bits, act_mode, absmax.values)
    layers = layer_table(denoiser, method, params, targets, quants, errors, act_bits, act_mode)
    metrics = {"calibration_s": calibration_s, "quantize_s": quantize_s, "calibration_bytes": calibration_bytes}
    return CalibratedQuant(layers, {name: q.packed for name, q in quants.items()}, metrics, path if keep else None)


def act_installer(act_bits: int, act_mode: str, absmax: dict[str, float]):
    """How a quantized block copy gets a target's activation quantizer (none at 16 bits)."""
    def install_act(module: nn.Module, name: str) -> None:
        if act_bits != 16 and isinstance(module, nn.Linear):
            add_act_quant(module, act_bits, act_mode, absmax[name])
    return install_act


def error_candidates(method: str, params: dict, targets: list[Target], quants: dict[str, LayerQuant]) -> dict:
    """Per Linear target, the quantized weights whose output error is measured: the method's
    (`out_err`, from its codes) and, for GPTQ, RTN's on the same grid (`rtn_out_err`)."""
    out = {}
    for t in targets:
        if not isinstance(t.module, nn.Linear):
            continue
        packed = quants[t.name].packed
        out[t.name] = {"out_err": lambda w, packed=packed: dequantize(packed)}
        if method == "gptq":
            out[t.name]["rtn_out_err"] = lambda w, bits=t.bits: rtn_grouped(
                w, bits, params["symmetric"], params["group_size"]).dequantize()
    return out


def layer_table(denoiser: nn.Module, method: str, params: dict, targets: list[Target], quants: dict[str, LayerQuant],
                errors: HeldOutErrors, act_bits: int, act_mode: str) -> list[dict]:
    by_name = {t.name: t for t in targets}
    layers = []
    for name, module, role in quantizable_layers(denoiser):
        t = by_name.get(name)
        entry = {"name": name, "role": role, "params": module.weight.numel(), "bits": None,
                 "weight_err": None, "out_err": None}
        if t is None:
            reason = fp_reason(name) if method == "gptq" or params.get("scope") == "blocks" else "role not quantized"
            entry["extra"] = json.dumps({"reason": reason})
            layers.append(entry)
            continue
        entry["bits"] = t.bits
        entry["weight_err"] = quants[name].weight_err
        linear = isinstance(module, nn.Linear)
        extra = {"act": f"int{act_bits} {act_mode}" if act_bits != 16 and linear else "none"}
        if linear:
            measured = errors.relative(name)
            entry["out_err"] = measured["out_err"]
            if "rtn_out_err" in measured:
                extra["rtn_out_err"] = measured["rtn_out_err"]
        entry["extra"] = json.dumps(extra)
        layers.append(entry)
    return layers


def requantize(denoiser: nn.Module, path: Path) -> dict[str, QuantizedTensor]:
    """Re-run block-by-block GPTQ on a full-precision denoiser from a saved calibration file
    alone (its first block's inputs, activation absmax and params); the denoiser is not changed."""
    from engine.errors import DamagedFile
    from engine.file_checks import require_tensors

    meta, tensors = load_calibration(path)
    if meta.get("method") != "gptq":
        raise ValueError(f"{path}: calibration of method {meta.get('method')!r} is not GPTQ's: nothing to re-run")
    params, names = meta.get("params"), meta.get("layers")
    if not isinstance(params, dict) or not set(GPTQ_KEYS) <= set(params) or not isinstance(names, list):
        raise DamagedFile(path, "its metadata has no GPTQ params and layer list")
    modules = dict(denoiser.named_modules())
    unknown = [name for name in names if name not in modules]
    if unknown:
        raise DamagedFile(path, f"layer {unknown[0]} is not in the model (calibrated for another model?)")
    try:
        targets = targets_of(denoiser, "gptq", params)
    except (KeyError, TypeError, ValueError) as exc:
        raise DamagedFile(path, f"bad GPTQ params: {type(exc).__name__}: {exc}") from None
    if [t.name for t in targets] != names:
        raise DamagedFile(path, f"its {len(names)} layers are not the model's {len(targets)} GPTQ targets")
    act_bits, act_mode = params.get("act_bits", 16), params.get("act_mode", "static")
    if act_bits != 16:
        require_tensors(path, tensors, [f"absmax.{name}" for name in names])
    absmax = {name: tensors[f"absmax.{name}"].item() for name in names if f"absmax.{name}" in tensors}
    device = next(denoiser.parameters()).device
    inputs = BlockInputs.from_file(meta.get("block_inputs"), tensors, path, device)
    del tensors
    try:
        quants = gptq_block_by_block(transformer_blocks(denoiser), targets, inputs.calls, params,
                                     act_installer(act_bits, act_mode, absmax))
    except (KeyError, TypeError, ValueError) as exc:  # metadata or inputs of the wrong shape or type
        raise DamagedFile(path, f"GPTQ does not run from it: {type(exc).__name__}: {exc}") from None
    return {name: q.packed for name, q in quants.items()}


def prepare_quantized(denoiser: nn.Module, method: str, params: dict) -> None:
    """Give a freshly loaded full-precision denoiser the activation quantizers of a calibrated
    run (their static scales are placeholders), so that the run's packed checkpoint loads into
    it with `load_state_dict(strict=True)` and it computes what the run evaluated."""
    if params.get("act_bits", 16) == 16:
        return
    for t in targets_of(denoiser, method, params):
        if isinstance(t.module, nn.Linear):
            add_act_quant(t.module, params["act_bits"], params["act_mode"], absmax=1.0)
