"""Calibrate and quantize a UNet-style denoiser with DGQ or the per-tensor min-max baseline.

1. Calibration (`calibration_s`): `samples` seeded prompts (the same prompts and noise as the
   GPTQ calibration of `engine.quant.calibration_hessians`) are sampled with the
   full-precision model, by the experiment's sampler and guidance, over every step of a
   `steps`-step schedule. Hooks record each quantized layer's per-channel and per-position
   input min/max; the attention processors record their probabilities (`SoftmaxRecorder`).
2. Quantization (`quantize_s`): activation groups per layer (`groups.plan_groups`), delta per
   attention module (`log_quant.choose_delta`, or min/max for the baseline), then weights by
   round-to-nearest per output channel (every conv, attention and linear layer), and the
   quantizers are installed. Their state is buffers of the modules: the packed checkpoint
   holds it, and the run samples from the checkpoint loaded back.
Activation parameters are one set for the whole trajectory (not per timestep group).

On an error before the weights are touched, the hooks and processors are removed and the
model is left as it was.

Memory. Calibration is one sampling pass through the whole model, so every layer's statistics
are gathered at once; each is small and none grows with the number of samples or steps:
- per quantized layer (`IndexStats`): min and max per input channel and per input position,
  float32, on the activations' device: for Stable Diffusion 1.5 at 512 x 512 (282 layers,
  294,340 input channels in all, at most 64 x 64 = 4096 positions a layer) at most 11 MiB;
- per attention module (`softmax_stats.SoftmaxRecorder`): at most 1M sampled probabilities,
  float32 on the CPU (4 MB; SD 1.5's 32 modules: at most 128 MB; 4096 a call, so 10.5 MB
  with the defaults: 32 prompts in one batch, 20 steps), and a few numbers;
- the attention probabilities themselves only a block at a time (`chunks`).
The weights are then quantized by `engine.quant.quantize_` (RTN), whose report holds every
layer's codes for the checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from engine.quant.dgq.attention import (
    QuantSoftmaxAttnProcessor,
    SoftmaxSettings,
    attention_modules,
    remove_softmax_buffers,
    set_softmax_buffers,
)
from engine.quant.dgq.groups import IndexStats, add_group_quant, plan_groups, remove_group_quant
from engine.quant.dgq.log_quant import choose_delta
from engine.quant.dgq.softmax_stats import SoftmaxRecorder
from engine.quant.roles import ROLES, quantizable_layers

Progress = Callable[..., None]


@dataclass(frozen=True)
class DGQSettings:
    bits: int  # weights, RTN per output channel
    symmetric: bool
    act_bits: int
    groups: int
    attn_bits: int
    log_quant: bool
    start_token_fp: bool
    prompt_scaling: bool
    minmax: bool  # the baseline (groups = 1, uniform min-max attention)
    samples: int
    seed: int
    steps: int

    @classmethod
    def from_params(cls, params: dict, minmax: bool = False) -> "DGQSettings":
        cal = params["calibration"]
        return cls(bits=params["bits"], symmetric=params["symmetric"], act_bits=params["act_bits"],
                   groups=1 if minmax else params["groups"], attn_bits=params["attn_bits"],
                   log_quant=not minmax and params["log_quant"], start_token_fp=not minmax and params["start_token_fp"],
                   prompt_scaling=not minmax and params["prompt_scaling"], minmax=minmax,
                   samples=cal["samples"], seed=cal["seed"], steps=cal["steps"])

    @property
    def softmax(self) -> SoftmaxSettings:
        return SoftmaxSettings(bits=self.attn_bits, log=self.log_quant, start_fp=self.start_token_fp,
                               prompt_scaling=self.prompt_scaling, minmax=self.minmax)


@dataclass
class DGQResult:
    layers: list[dict]
    packed: dict
    half: list[str]
    metrics: dict[str, float]


def calibration_prompts(model, settings: DGQSettings, prompts: list[str] | None = None) -> tuple[list[str], torch.Tensor]:
    """The GPTQ calibration set's prompts and noise (engine.quant.calibration_hessians): for the
    digits models their training wordings other than the evaluation's, for other models a
    seeded part of the experiment's prompts; noise from the calibration stream."""
    from engine.quant.calibration_hessians import calibration_set

    cal = calibration_set(model, {"samples": settings.samples, "held_out": 1, "seed": settings.seed}, prompts)
    return cal.prompts, cal.noise  # the one held-out prompt is not used


def install_processors(denoiser: nn.Module, softmax: SoftmaxSettings, seed: int) -> dict[str, tuple]:
    """Our processor on every Attention module, recording; returns name -> (module, processor,
    the processor it replaced)."""
    out = {}
    for i, (name, module) in enumerate(attention_modules(denoiser)):
        proc = QuantSoftmaxAttnProcessor(name, softmax)
        proc.recorder = SoftmaxRecorder(softmax.start_fp and not softmax.minmax, seed + i)
        out[name] = (module, proc, module.processor)
        module.set_processor(proc)
    return out


def _restore(targets, attns) -> None:
    for _, module, _ in targets:
        remove_group_quant(module)
    for module, _, original in attns.values():
        module.set_processor(original)
        remove_softmax_buffers(module)


def quantize_dgq(model, settings: DGQSettings, sampling: dict, progress: Progress | None = None) -> DGQResult:
    """Calibrate on the model's own sampling trajectory (its adapter's sampler, guidance and
    negative prompt; `sampling["prompts"]` the experiment's prompts, None for the digits
    models), then quantize its denoiser."""
    from engine.quant.calibration_hessians import run_sampler

    prompts, noise = calibration_prompts(model, settings, sampling.get("prompts"))
    on_progress = (lambda done, total: progress("calibrate", done, total)) if progress else None
    cfg = {"steps": settings.steps}
    return quantize_denoiser(model.denoiser, settings,
                             lambda: run_sampler(model, prompts, noise, cfg, sampling, on_progress))


def quantize_denoiser(denoiser: nn.Module, settings: DGQSettings, run_calibration: Callable[[], object]) -> DGQResult:
    """Quantize any denoiser built from Conv/Linear layers and diffusers `Attention` modules
    (a UNet2DConditionModel of the digits model or of Stable Diffusion): `run_calibration()`
    runs the full-precision denoiser over the calibration data (the pipeline family's own
    sampler); nothing else here depends on the pipeline."""
    targets = quantizable_layers(denoiser)
    attns = install_processors(denoiser, settings.softmax, settings.seed)
    stats = {name: IndexStats() for name, _, _ in targets}
    handles = [module.register_forward_pre_hook(lambda m, a, s=stats[name]: s.update(a[0]))
               for name, module, _ in targets]
    try:
        start = time.time()
        run_calibration()
        for h in handles:
            h.remove()
        calibration_s = time.time() - start

        start = time.time()
        plans = {name: plan_groups(stats[name], settings.groups, settings.act_bits, name, settings.seed)
                 for name, _, _ in targets}
        softmax = {}
        for name, (module, proc, _) in attns.items():
            rec = proc.recorder
            if rec.prompts == 0:
                raise ValueError(f"{name}: attention never ran during calibration")
            if settings.minmax:
                delta, lo = rec.hi, rec.lo
            else:
                delta, lo = choose_delta(rec.values(), settings.attn_bits, settings.log_quant), 0.0
            softmax[name] = (delta, lo, rec)
    except BaseException:
        for h in handles:
            h.remove()
        _restore(targets, attns)
        raise

    from engine.quant import RTNConfig, quantize_

    report = quantize_(denoiser, RTNConfig(bits={role: settings.bits for role in ROLES}, symmetric=settings.symmetric))
    for name, module, _ in targets:
        add_group_quant(module, name, plans[name], settings.act_bits)
    for name, (module, proc, _) in attns.items():
        delta, lo, _ = softmax[name]
        set_softmax_buffers(module, delta, lo)
        proc.recorder, proc.active = None, True
    quantize_s = time.time() - start
    layers = layer_rows(report.layers, plans, softmax, settings)
    return DGQResult(layers=layers, packed=report.packed, half=report.half,
                     metrics={"calibration_s": calibration_s, "quantize_s": quantize_s})


def _softmax_row(name: str, delta: float, lo: float, rec: SoftmaxRecorder, settings: DGQSettings) -> dict:
    share = rec.start_share
    if settings.minmax:
        quantizer, mode = "uniform min-max", "static"
    else:
        quantizer = "log2" if settings.log_quant else "uniform [0, delta]"
        mode = "prompt" if settings.prompt_scaling else "static"
    extra = {"quantizer": quantizer, "attn_bits": settings.attn_bits, "cross": bool(rec.cross),
             "delta": delta, "delta_mode": mode, "calibrated_prompt_delta_mean": rec.mean_prompt_delta,
             "start_token_fp": settings.softmax.keeps_start(bool(rec.cross)), "start_share": share}
    if settings.minmax:
        extra["lo"] = lo
    return {"name": f"{name}.softmax", "role": "softmax", "params": 0, "bits": settings.attn_bits,
            "weight_err": None, "start_share": share, "extra": json.dumps(extra)}


def layer_rows(weight_rows: list[dict], plans: dict, softmax: dict, settings: DGQSettings) -> list[dict]:
    """One row per quantized layer (weights and input activations) in model order, and after
    each attention module's to_v a `softmax` row for its attention-score quantizer."""
    rows = []
    for row in weight_rows:
        plan = plans[row["name"]]
        extra = {"act_bits": settings.act_bits, "act_axis": plan.axis, "act_groups": plan.groups,
                 "spread": plan.spreads}
        rows.append({**row, "extra": json.dumps(extra)})
        parent = row["name"].rsplit(".", 1)[0]
        if row["name"].endswith(".to_v") and parent in softmax:
            rows.append(_softmax_row(parent, *softmax[parent], settings))
    return rows


def prepare_quantized(denoiser: nn.Module, settings: DGQSettings, state: dict[str, torch.Tensor]) -> None:
    """Give a freshly loaded full-precision denoiser the quantizers of a dgq/minmax run, their
    buffers shaped as in the run's checkpoint `state` (`load_packed`), so that the checkpoint
    loads into it with `load_state_dict(strict=True)` and it computes what the run evaluated."""
    from engine.quant.dgq.groups import AXIS_NAMES, GroupPlan

    for name, module, _ in quantizable_layers(denoiser):
        plan = GroupPlan(axis=AXIS_NAMES[int(state[f"{name}.dgq_axis"])], labels=state[f"{name}.dgq_group"],
                         scale=state[f"{name}.dgq_scale"], zero=state[f"{name}.dgq_zero"], spreads={})
        add_group_quant(module, name, plan, settings.act_bits)
    for name, module in attention_modules(denoiser):
        proc = QuantSoftmaxAttnProcessor(name, settings.softmax)
        proc.active = True
        module.set_processor(proc)
        set_softmax_buffers(module, float(state[f"{name}.softmax_delta"]), float(state[f"{name}.softmax_lo"]))
