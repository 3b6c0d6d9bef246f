"""LSQ fake quantization (Esser et al., "Learned Step Size Quantization"): a learnable step size
per output channel (weights) or per tensor (activations), the rounding passed straight through
(STE), and the step's gradient scaled by 1 / sqrt(elements x qmax) so that it moves at the rate
of the weights.

Weights: symmetric, the full 2^b grid [-2^(b-1), 2^(b-1) - 1] (as RTN's symmetric grid), step
initialised to RTN's, 2 absmax / (2^b - 1). Activations: the int8 grid of
engine.quant.act_quant, [-127, 127], step initialised to absmax / 127 from the first batches.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def grad_scaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x in the forward pass; its gradient times `factor` in the backward pass."""
    scaled = x * factor
    return (x - scaled).detach() + scaled


class WeightLSQ(nn.Module):
    """Parametrization of a layer's weight: w -> fake-quantized w with a learned per-channel step."""

    def __init__(self, weight: torch.Tensor, bits: int):
        super().__init__()
        self.bits = bits
        self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        flat = weight.detach().reshape(weight.shape[0], -1)
        init = 2 * flat.abs().amax(dim=1) / (2**bits - 1)
        self.step = nn.Parameter(torch.where(init > 0, init, torch.ones_like(init)).float())
        self.grad_factor = 1.0 / math.sqrt(flat.shape[1] * self.qmax)

    def scale(self) -> torch.Tensor:
        return grad_scaled(self.step, self.grad_factor).abs().clamp(min=1e-8)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = self.scale().view(-1, *[1] * (w.dim() - 1)).to(w.dtype)
        return round_ste((w / s).clamp(self.qmin, self.qmax)) * s


class ActLSQ(nn.Module):
    """Fake-quantizes a layer's input, symmetric int8 with one learned step per layer."""

    def __init__(self, absmax: float, bits: int = 8):
        super().__init__()
        self.qmax = 2 ** (bits - 1) - 1
        self.step = nn.Parameter(torch.tensor(absmax / self.qmax if absmax > 0 else 1.0))
        self.grad_factor = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_factor == 1.0:
            self.grad_factor = 1.0 / math.sqrt(x[0].numel() * self.qmax)
        s = grad_scaled(self.step, self.grad_factor).abs().clamp(min=1e-8).to(x.dtype)
        return round_ste((x / s).clamp(-self.qmax, self.qmax)) * s
