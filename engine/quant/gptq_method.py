"""Calibrated post-training quantization of a transformer denoiser: the `gptq` method, and RTN
with activation quantization (`rtn` with act_bits / scope) measured the same way.

Which layers: the nn.Linear layers inside `denoiser.transformer_blocks` (attention projections,
adaLN modulations, feed-forwards of both MMDiT streams). The patch, timestep and prompt
embedders and the final modulation and projection stay full precision (`FP_REASONS`): they
hold few parameters, and they are the model's input and output interfaces, where errors are
not averaged over any later layer. Plain `rtn` with `scope = "all"` quantizes every layer by role.

Steps of `quantize_calibrated`:
1. calibration (`calibration_s`): sample the calibration prompts with the full-precision model,
   recording each target layer's input absmax (static activation scales) and the inputs of the
   first transformer block; sample the held-out prompts, recording each layer's held-out
   moments (for `out_err`).
2. quantization (`quantize_s`). GPTQ goes block by block: block k's Hessians come from running
   block k on its cached inputs, which are the outputs of blocks 0..k-1 after those were
   quantized (weights and activations); then block k's layers are quantized by GPTQ, its
   activation quantizers are installed, and block k is run again to produce block k+1's inputs.
   Caching the block inputs costs memory (calls x tokens x width floats, tens of MB here) but
   runs every block only twice; re-running the model up to block k for each k would cost L^2/2
   block evaluations instead.
   RTN rounds each weight to the same grid without error compensation.
3. out_err: each layer's relative output error on the held-out inputs, with its activation
   quantization, for the method's weights and (GPTQ runs) for RTN's, side by side.
The calibration statistics (Hessians, absmax, held-out moments) are saved with their config in
`calibration.safetensors`; `requantize` re-runs GPTQ from that file alone.

On any error the model's weights are restored and nothing is written.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from engine.models.loader import TextToImageModel
from engine.quant.act_quant import add_act_quant, fake_quant_dynamic, fake_quant_static, remove_act_quant, static_scale
from engine.quant.calibration_hessians import (
    CALIBRATION_FILE,
    AbsMax,
    BlockInputs,
    HeldOutMoments,
    calibration_set,
    load_calibration,
    output_error,
    run_sampler,
    save_calibration,
)
from engine.quant.gptq import GPTQ, GPTQResult, rtn_grouped
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
    calibration_path: Path
    results: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> quantized weight


def _fp16_round(name: str, bias: torch.Tensor) -> torch.Tensor:
    b16 = bias.detach().to(torch.float16)
    if not torch.isfinite(b16).all():
        raise ValueError(f"{name}: bias values exceed the float16 range")
    return b16.to(bias.dtype)


def _set_weight(t: Target, weight: torch.Tensor) -> None:
    with torch.no_grad():
        t.module.weight.copy_(weight.to(t.module.weight.dtype))
        if t.module.bias is not None:
            t.module.bias.copy_(_fp16_round(t.name, t.module.bias))


def _next_inputs(args: tuple, kwargs: dict, output) -> tuple[tuple, dict]:
    """A joint-attention block returns (encoder_hidden_states, hidden_states): the next
    block's inputs, with the same temb."""
    if args or not isinstance(output, tuple) or len(output) != 2:
        raise ValueError("block-by-block GPTQ expects blocks called with keywords that return "
                         "(encoder_hidden_states, hidden_states), as diffusers' MMDiT blocks do")
    encoder, hidden = output
    return args, {**kwargs, "hidden_states": hidden, "encoder_hidden_states": encoder}


def _gptq_args(params: dict) -> dict:
    return {k: params[k] for k in ("bits", "symmetric", "group_size", "act_order", "damp", "block_size")}


@torch.no_grad()
def gptq_block_by_block(blocks: nn.ModuleList, targets: list[Target], inputs: BlockInputs, params: dict,
                        install_act: Callable[[Target], None], progress: Progress | None = None
                        ) -> tuple[dict[str, GPTQResult], dict[str, GPTQ]]:
    """Quantize every target, block after block, each from the quantized blocks before it."""
    results, collectors = {}, {}
    calls = inputs.calls
    args = _gptq_args(params)
    for k, block in enumerate(blocks):
        mine = [t for t in targets if t.block == k]
        gptqs = {t.name: GPTQ(t.module, t.name) for t in mine}
        hooks = [t.module.register_forward_pre_hook(lambda m, a, g=gptqs[t.name]: g.add_batch(a[0])) for t in mine]
        try:
            for a, kw in calls:
                block(*a, **kw)
        finally:
            for h in hooks:
                h.remove()
        for t in mine:
            result = gptqs[t.name].quantize(**{**args, "bits": t.bits})
            _set_weight(t, result.weight)
            results[t.name], collectors[t.name] = result, gptqs[t.name]
            install_act(t)
        if k + 1 < len(blocks):
            calls = [_next_inputs(a, kw, block(*a, **kw)) for a, kw in calls]
        if progress:
            progress("quantize", k + 1, len(blocks), f"GPTQ block {k + 1}/{len(blocks)}")
    return results, collectors


def _stored(quant) -> QuantizedTensor:
    """The packed-checkpoint form of a GPTQ / grouped-RTN result."""
    if quant.n_groups == 1:
        return quant.per_channel()
    return QuantizedTensor(codes=quant.codes, scale=quant.scales.reshape(-1).clone(),
                           zero=quant.zeros.reshape(-1).clone(), bits=quant.bits, symmetric=quant.symmetric,
                           shape=tuple(quant.codes.shape), group_size=quant.group_size)


def quantize_calibrated(model: TextToImageModel, method: str, params: dict, sampling: dict, folder: Path,
                        progress: Progress | None = None) -> CalibratedQuant:
    """Calibrate, quantize in place (weights, fp16 biases, activation quantizers) and measure
    per-layer errors; returns the layer table, the codes to pack and the timings."""
    denoiser = model.denoiser
    targets = targets_of(denoiser, method, params)
    if not targets:
        raise ValueError("no layer to quantize: the bits name no role the model's blocks have")
    group_size = params.get("group_size")
    check_group_size(targets, group_size)
    originals = {t.name: (t.module.weight.detach().clone(),
                          None if t.module.bias is None else t.module.bias.detach().clone()) for t in targets}
    try:
        return _quantize(model, method, params, sampling, Path(folder), targets, originals, progress)
    except BaseException:
        with torch.no_grad():
            for t in targets:
                weight, bias = originals[t.name]
                t.module.weight.copy_(weight)
                if bias is not None:
                    t.module.bias.copy_(bias)
                remove_act_quant(t.module)
        raise


def _quantize(model, method, params, sampling, folder, targets, originals, progress) -> CalibratedQuant:
    denoiser = model.denoiser
    cfg = params["calibration"]
    act_bits, act_mode = params.get("act_bits", 16), params.get("act_mode", "static")
    quantize_acts = act_bits != 16
    linears = {t.name: t.module for t in targets if isinstance(t.module, nn.Linear)}
    report = (lambda stage: lambda done, total: progress(stage, done, total)) if progress else (lambda stage: None)

    # 1. calibration with the full-precision model
    start = time.time()
    cal = calibration_set(model, cfg, sampling.get("prompts"))
    absmax = AbsMax(linears)
    recorder, handle = (BlockInputs.record(transformer_blocks(denoiser)[0]) if method == "gptq" else (None, None))
    try:
        run_sampler(model, cal.prompts, cal.noise, cfg, sampling, report("calibrate"))
    finally:
        absmax.remove()
        if handle is not None:
            handle.remove()
    quantizers = ({name: activation_quantizer(act_bits, act_mode, absmax.values[name]) for name in linears}
                  if quantize_acts else {})
    held = HeldOutMoments(linears, quantizers)
    try:
        run_sampler(model, cal.held_out_prompts, cal.held_out_noise, cfg, sampling, report("held-out"))
    finally:
        held.remove()
    empty = [name for name, n in held.tokens.items() if n == 0]
    if empty:
        raise ValueError(f"empty calibration set for {empty[0]}: the layer never ran during calibration")
    calibration_s = time.time() - start

    def install_act(t: Target) -> None:
        if quantize_acts and isinstance(t.module, nn.Linear):
            add_act_quant(t.module, act_bits, act_mode, absmax.values[t.name])

    # 2. quantization
    start = time.time()
    tensors: dict[str, torch.Tensor] = {}
    nsamples: dict[str, int] = {}
    if method == "gptq":
        results, collectors = gptq_block_by_block(transformer_blocks(denoiser), targets, recorder, params,
                                                  install_act, progress)
        packed = {name: _stored(r) for name, r in results.items()}
        weights = {name: r.weight for name, r in results.items()}
        for name, g in collectors.items():
            tensors[f"hessian.{name}"] = g.H
            nsamples[name] = g.nsamples
    else:
        packed, weights = {}, {}
        for t in targets:  # per output channel, as plain rtn
            packed[t.name] = quantize_tensor(t.module.weight.detach(), t.bits, params["symmetric"])
            weights[t.name] = dequantize(packed[t.name])
            _set_weight(t, weights[t.name])
            install_act(t)
    quantize_s = time.time() - start

    # 3. per-layer errors and the layer table
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
        w_fp = originals[name][0].float()
        entry["bits"] = t.bits
        entry["weight_err"] = relative_error(w_fp, weights[name])
        extra = {"act": f"int{act_bits} {act_mode}" if quantize_acts and name in linears else "none"}
        if name in linears:
            moments = held.sums[name]
            tensors[f"held_out.{name}"] = moments
            entry["out_err"] = output_error(moments, w_fp, weights[name])
            if method == "gptq":
                rtn = rtn_grouped(w_fp, t.bits, params["symmetric"], params["group_size"]).dequantize()
                extra["rtn_out_err"] = output_error(moments, w_fp, rtn)
            if quantize_acts and act_mode == "static":
                tensors[f"absmax.{name}"] = torch.tensor(absmax.values[name])
        entry["extra"] = json.dumps(extra)
        layers.append(entry)

    meta = {"method": method, "params": params, "model": str(model.path),
            "sampling": {"guidance": sampling["guidance"], "batch_size": sampling["batch_size"]},
            "nsamples": nsamples, "held_out_tokens": held.tokens}
    path = folder / CALIBRATION_FILE
    save_calibration(path, meta, tensors)
    metrics = {"calibration_s": calibration_s, "quantize_s": quantize_s}
    return CalibratedQuant(layers, packed, metrics, path, weights)


def requantize(denoiser: nn.Module, path: Path) -> dict[str, GPTQResult]:
    """Re-run GPTQ on a full-precision denoiser from a saved calibration file alone."""
    from engine.errors import DamagedFile
    from engine.file_checks import require_tensors

    meta, tensors = load_calibration(path)
    if meta.get("method") != "gptq":
        raise ValueError(f"{path}: calibration of method {meta.get('method')!r} holds no Hessians")
    params, nsamples = meta.get("params"), meta.get("nsamples")
    if not isinstance(params, dict) or "bits" not in params or not isinstance(nsamples, dict):
        raise DamagedFile(path, "its metadata has no GPTQ params and sample counts")
    modules = dict(denoiser.named_modules())
    unknown = [name for name in nsamples if name not in modules]
    if unknown:
        raise DamagedFile(path, f"layer {unknown[0]} is not in the model (calibrated for another model?)")
    require_tensors(path, tensors, [f"hessian.{name}" for name in nsamples])
    out = {}
    for name, n in nsamples.items():
        g = GPTQ(modules[name], name)
        hessian = tensors[f"hessian.{name}"]
        if hessian.shape != g.H.shape:
            raise DamagedFile(path, f"hessian.{name} has shape {list(hessian.shape)}, the layer needs {list(g.H.shape)}")
        g.H.copy_(hessian)
        try:
            g.nsamples = int(n)
            out[name] = g.quantize(**{**_gptq_args(params), "bits": params["bits"]})
        except (KeyError, TypeError, ValueError) as exc:  # metadata of the wrong shape or type
            raise DamagedFile(path, f"bad GPTQ metadata for {name}: {type(exc).__name__}: {exc}") from None
    return out


def prepare_quantized(denoiser: nn.Module, method: str, params: dict) -> None:
    """Give a freshly loaded full-precision denoiser the activation quantizers of a calibrated
    run (their static scales are placeholders), so that the run's packed checkpoint loads into
    it with `load_state_dict(strict=True)` and it computes what the run evaluated."""
    if params.get("act_bits", 16) == 16:
        return
    for t in targets_of(denoiser, method, params):
        if isinstance(t.module, nn.Linear):
            add_act_quant(t.module, params["act_bits"], params["act_mode"], absmax=1.0)
