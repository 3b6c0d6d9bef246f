"""Activation quantization (the "A8" of W4A8): the input of a quantized Linear is rounded to a
signed integer grid before the matrix product.

Symmetric, `bits`-bit (qmax = 2^(bits-1) - 1), simulated in float ("fake quant"):
    x_hat = clamp(round(x / s), -qmax, qmax) * s
- static: one scale per layer, s = absmax / qmax with absmax the largest |x| this layer saw on
  the calibration set. The scale is a buffer of the Linear (`act_scale`), so it is part of the
  state dict, stored in the run's checkpoint and loaded back with the weights.
- dynamic: one scale per token (per row of the input), s = max |x_row| / qmax, computed at run
  time; nothing is stored.
Each element's error is at most s / 2 inside the calibrated range; values beyond a static
range are clipped to +-absmax.
"""

from __future__ import annotations

import torch
from torch import nn

SCALE_BUFFER = "act_scale"
_HOOKS = "_qtui_act_quant_hook"


def qmax_for(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be an int in 2..8, got {bits!r}")
    return 2 ** (bits - 1) - 1


def fake_quant_static(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    q = qmax_for(bits)
    s = scale.to(x.dtype)
    return torch.round(x / s).clamp_(-q, q).mul_(s)


def fake_quant_dynamic(x: torch.Tensor, bits: int) -> torch.Tensor:
    q = qmax_for(bits)
    s = x.detach().abs().amax(dim=-1, keepdim=True) / q
    s = torch.where(s == 0, torch.ones_like(s), s)
    return torch.round(x / s).clamp_(-q, q).mul_(s)


def static_scale(absmax: float, bits: int) -> torch.Tensor:
    """The stored scale of a layer whose calibration inputs reach `absmax` (1.0 if all zero)."""
    scale = absmax / qmax_for(bits)
    return torch.tensor(scale if scale > 0 else 1.0, dtype=torch.float32)


class ActQuant:
    """Forward pre-hook of one Linear: quantizes its input (static scale from the buffer)."""

    def __init__(self, bits: int, mode: str):
        if mode not in ("static", "dynamic"):
            raise ValueError(f"activation mode must be static or dynamic, got {mode!r}")
        qmax_for(bits)
        self.bits, self.mode = bits, mode

    def quantize(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dynamic":
            return fake_quant_dynamic(x, self.bits)
        return fake_quant_static(x, getattr(module, SCALE_BUFFER), self.bits)

    def __call__(self, module: nn.Module, args: tuple):
        return (self.quantize(module, args[0]), *args[1:])


def add_act_quant(module: nn.Linear, bits: int, mode: str, absmax: float | None = None) -> ActQuant:
    """Quantize `module`'s input from now on; static mode needs the calibrated `absmax`."""
    if getattr(module, _HOOKS, None) is not None:
        raise ValueError("this layer already quantizes its activations")
    hook = ActQuant(bits, mode)
    if mode == "static":
        if absmax is None:
            raise ValueError("static activation quantization needs the calibrated absmax")
        module.register_buffer(SCALE_BUFFER, static_scale(absmax, bits).to(module.weight.device))
    handle = module.register_forward_pre_hook(hook)
    setattr(module, _HOOKS, (hook, handle))
    return hook


def act_quant_of(module: nn.Module) -> ActQuant | None:
    entry = getattr(module, _HOOKS, None)
    return entry[0] if entry else None


def remove_act_quant(module: nn.Module) -> None:
    entry = getattr(module, _HOOKS, None)
    if entry is None:
        return
    entry[1].remove()
    setattr(module, _HOOKS, None)
    if SCALE_BUFFER in module._buffers:
        del module._buffers[SCALE_BUFFER]
