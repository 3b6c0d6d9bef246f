"""Swap a denoiser's quantized layers for low-bit modules built from its packed checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.quant import act_quant
from engine.quant.lowbit.codes import read_packed_layers
from engine.quant.lowbit.modules import QuantConv2d, QuantLinear


def model_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers as held in memory (shared storage once)."""
    seen, total = set(), 0
    tensors = list(module.parameters()) + [b for b in module.buffers() if b is not None]
    for t in tensors:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


@dataclass
class LowbitReport:
    layers: int
    bytes_before: int
    bytes_after: int


def _carry_act_quant(old: nn.Module, new: nn.Module) -> None:
    """Keep a Linear's int8 activation quantizer (hook and static scale) on its replacement."""
    hook = act_quant.act_quant_of(old)
    if hook is None:
        return
    if act_quant.SCALE_BUFFER in old._buffers:
        new.register_buffer(act_quant.SCALE_BUFFER, old._buffers[act_quant.SCALE_BUFFER].clone())
    handle = new.register_forward_pre_hook(hook)
    setattr(new, act_quant._HOOKS, (hook, handle))


@torch.no_grad()
def to_lowbit(denoiser: nn.Module, checkpoint: str | Path) -> LowbitReport:
    """Replace every layer the checkpoint stores as codes by a QuantLinear / QuantConv2d on the
    same device, after checking that its dequantized weight and bias equal the (simulated) ones
    the denoiser holds: the real model computes what the stored file says, nothing else."""
    before = model_bytes(denoiser)
    modules = dict(denoiser.named_modules())
    layers = read_packed_layers(checkpoint)
    built = []
    for layer in layers:
        old = modules.get(layer.name)
        if isinstance(old, nn.Linear):
            new = QuantLinear(layer)
        elif isinstance(old, nn.Conv2d):
            new = QuantConv2d(layer, old)
        else:
            raise ValueError(f"{checkpoint}: layer {layer.name} is a {type(old).__name__}; real execution "
                             "supports Linear and Conv2d")
        device = old.weight.device
        new = new.to(device)
        if not torch.equal(new.dequantized_weight(), old.weight.float()):
            raise RuntimeError(f"{checkpoint}: {layer.name} codes do not reproduce the simulated weight")
        if (old.bias is None) != (new.bias is None) or (
                old.bias is not None and not torch.equal(new.bias.float(), old.bias.float())):
            raise RuntimeError(f"{checkpoint}: {layer.name} bias differs from the simulated one")
        _carry_act_quant(old, new)
        built.append((layer.name, new))
    for name, new in built:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else denoiser
        setattr(parent, child, new)
    return LowbitReport(layers=len(built), bytes_before=before, bytes_after=model_bytes(denoiser))
