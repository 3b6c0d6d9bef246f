"""QAT: insert LSQ fake quantizers, fine-tune with the training loss, convert to packed codes.

1. Every layer with bits (by role) gets its weight parametrized by a `WeightLSQ`; with
   act_bits = 8 every such Linear gets an `ActLSQ` on its input, its step initialised from the
   largest |input| over `init_batches` training batches (the FP model).
2. `steps` AdamW steps on the training loss (engine.quant.qat.loss: the digits data, or a
   pipeline's latents from engine.quant.qat.data), all of the denoiser's
   parameters and the steps trainable, the learning rate warmed up then cosine-decayed, gradient
   norm clipped at 1 (engine.train.common); seeded batches.
3. Conversion: each learned step is rounded to float16 (the checkpoint's scale), the codes are
   round(w / s) clamped to the grid, the layer's weight becomes (codes - 2^(b-1)) * s and its bias
   is rounded to float16, as `quantize_` leaves a layer; a Linear's learned input step becomes the
   static scale buffer of engine.quant.act_quant. What is evaluated is this converted model,
   loaded back from the packed checkpoint: the fine-tuned FP weights are discarded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from engine.quant.act_quant import SCALE_BUFFER, add_act_quant
from engine.quant.apply import _fp16
from engine.quant.qat.data import TrainingData, build_pool
from engine.quant.qat.fake_quant import ActLSQ, WeightLSQ
from engine.quant.qat.loss import DIGITS_KINDS, TrainingLoss, mean_loss, training_loss
from engine.quant.roles import quantizable_layers
from engine.quant.rtn import QuantizedTensor, dequantize, relative_error

Progress = Callable[..., None]


@dataclass
class QATConfig:
    bits: dict[str, int]  # role -> 4 or 8
    steps: int
    act_bits: int = 16
    lr: float = 1e-4
    batch_size: int = 64
    seed: int = 0
    warmup: int = 10
    init_batches: int = 4
    eval_batches: int = 4


@dataclass
class QATResult:
    layers: list[dict]
    packed: dict[str, QuantizedTensor]
    metrics: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    pool: object = None  # the pipeline's training latents (engine.quant.qat.data.LatentPool)


def _act_hook(module: nn.Module, args: tuple):
    return (module.qat_act(args[0]), *args[1:])


def insert_fake_quant(denoiser: nn.Module, cfg: QATConfig, loss: TrainingLoss) -> list[tuple[str, nn.Module, str, int]]:
    """Parametrize the targets' weights; attach input quantizers (static steps from `init_batches`
    batches of `loss`, a stream of its own so that W4 and W4A8 fine-tune on the same batches)."""
    targets = [(name, m, role, cfg.bits[role]) for name, m, role in quantizable_layers(denoiser) if role in cfg.bits]
    if not targets:
        raise ValueError("no layer to quantize: the bits name no role this model has")
    if cfg.act_bits == 8:
        absmax = {name: 0.0 for name, m, _, _ in targets if isinstance(m, nn.Linear)}
        hooks = [m.register_forward_pre_hook(
                     lambda mod, a, n=name: absmax.__setitem__(n, max(absmax[n], a[0].detach().abs().max().item())))
                 for name, m, _, _ in targets if name in absmax]
        try:
            with torch.no_grad():
                for _ in range(cfg.init_batches):
                    loss.loss(denoiser, loss.batch())
        finally:
            for h in hooks:
                h.remove()
    for name, m, role, bits in targets:
        parametrize.register_parametrization(m, "weight", WeightLSQ(m.weight, bits).to(m.weight.device))
        if cfg.act_bits == 8 and isinstance(m, nn.Linear):
            m.qat_act = ActLSQ(absmax[name]).to(m.weight.device)
            m._qat_act_handle = m.register_forward_pre_hook(_act_hook)
    return targets


def finetune(denoiser: nn.Module, cfg: QATConfig, loss: TrainingLoss, progress: Progress | None) -> list[float]:
    from engine.train.common import cosine_lr, optimizer_step

    params = [p for p in denoiser.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    losses = []
    denoiser.train()
    try:
        for step in range(cfg.steps):
            value = loss.loss(denoiser, loss.batch())
            optimizer_step(opt, params, value, cosine_lr(cfg.lr, step, cfg.steps, min(cfg.warmup, cfg.steps)))
            losses.append(value.item())
            if progress:
                progress("finetune", step + 1, cfg.steps, f"loss {losses[-1]:.4f}")
    finally:
        denoiser.eval()
    return losses


@torch.no_grad()
def convert(targets: list[tuple[str, nn.Module, str, int]], originals: dict[str, torch.Tensor],
            act_bits: int) -> tuple[list[dict], dict[str, QuantizedTensor]]:
    """Fake quantizers -> codes, fp16 scales and biases, static int8 input scales."""
    packed, entries = {}, {}
    for name, m, role, bits in targets:
        lsq: WeightLSQ = m.parametrizations.weight[0]
        scale16 = lsq.step.detach().abs().clamp(min=2**-24).to(torch.float16)
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        w = m.weight.detach().float()
        s = scale16.float().view(-1, *[1] * (w.dim() - 1))
        half = 2 ** (bits - 1)
        codes = (torch.round(w / s).clamp(-half, half - 1) + half).to(torch.uint8)
        qt = QuantizedTensor(codes=codes, scale=scale16, zero=torch.full_like(scale16, half, dtype=torch.uint8),
                             bits=bits, symmetric=True, shape=tuple(w.shape))
        m.weight.copy_(dequantize(qt, dtype=m.weight.dtype))
        if m.bias is not None:
            m.bias.copy_(_fp16(name, "bias", m.bias.data).to(m.bias.dtype))
        if hasattr(m, "qat_act"):
            step = m.qat_act.step.detach().abs().item()
            m._qat_act_handle.remove()
            del m.qat_act, m._qat_act_handle
            add_act_quant(m, act_bits, "static", absmax=step * (2 ** (act_bits - 1) - 1))
            m._buffers[SCALE_BUFFER] = torch.tensor(step, dtype=torch.float32, device=m.weight.device)
        packed[name] = qt
        entries[name] = {"bits": bits, "weight_err": relative_error(originals[name], m.weight)}
    return entries, packed


def quantize_qat(model, cfg: QATConfig, progress: Progress | None = None, data=None) -> QATResult:
    """Fine-tune `model.denoiser` with fake quantization and leave it holding the converted
    quantized weights (and int8 input quantizers); returns the codes and the layer table.

    The digits models train on their own data; a diffusers pipeline on the latents `data`
    (engine.quant.qat.data.TrainingData) names, built before anything is quantized. Fine-tuning,
    conversion and the loss metrics run in float32; a denoiser loaded in another dtype is cast to
    float32 for them and back to its dtype at the end (its weights then hold the same codes)."""
    denoiser = model.denoiser
    torch.manual_seed(cfg.seed)
    if model.kind in DIGITS_KINDS and data is not None and (data.images is not None or data.samples is not None):
        key = "train_images" if data.images is not None else "train_samples"
        raise ValueError(f"{key}: the digits models fine-tune on the digits data; leave it out")
    pool = None if model.kind in DIGITS_KINDS else build_pool(model, data or TrainingData(), cfg.seed, progress)
    dtype = denoiser.dtype
    if dtype != torch.float32:
        denoiser.float()
    loss = training_loss(model, cfg.batch_size, cfg.seed, pool)
    held_out = training_loss(model, cfg.batch_size, cfg.seed + 1_000_003, pool)
    eval_batches = [held_out.batch() for _ in range(cfg.eval_batches)]
    originals = {name: m.weight.detach().float().clone() for name, m, role in quantizable_layers(denoiser)
                 if role in cfg.bits}
    metrics = {"qat_fp_loss": mean_loss(denoiser, held_out, eval_batches)}
    targets = insert_fake_quant(denoiser, cfg, training_loss(model, cfg.batch_size, cfg.seed + 1, pool))
    metrics["qat_start_loss"] = mean_loss(denoiser, held_out, eval_batches)  # fake quant, before fine-tuning
    start = time.time()
    losses = finetune(denoiser, cfg, loss, progress)
    metrics["finetune_s"] = time.time() - start
    entries, packed = convert(targets, originals, cfg.act_bits)
    metrics["qat_quant_loss"] = mean_loss(denoiser, held_out, eval_batches)
    metrics["finetune_final_loss"] = sum(losses[-20:]) / len(losses[-20:])
    if dtype != torch.float32:
        denoiser.to(dtype)
    layers = []
    for name, m, role in quantizable_layers(denoiser):
        entry = {"name": name, "role": role, "params": m.weight.numel(), "bits": None, "weight_err": None}
        entry.update(entries.get(name, {}))
        layers.append(entry)
    return QATResult(layers=layers, packed=packed, metrics=metrics, losses=losses, pool=pool)
