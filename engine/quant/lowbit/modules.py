"""Linear and Conv2d layers that hold their weight as integer codes plus float16 scales.

The weight exists in floating point only inside `forward`, one layer at a time:
    w = (codes - zero) * scale          (per output channel, or per channel and group)
computed exactly as `engine.quant.rtn.dequantize` computes the simulated weight, so a real
layer's output equals the simulated layer's bit for bit (same weight, same F.linear/F.conv2d).
The float16 bias (as the packed checkpoint stores it) is cast to the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.quant.lowbit.codes import PackedLayer, unpack_memory_codes


class _QuantWeight(nn.Module):
    """Buffers `codes` (uint8, memory layout of codes.py), `scale` (float16), `zero` (uint8,
    asymmetric layers only) and `bias` (float16, if any)."""

    def _init_codes(self, layer: PackedLayer) -> None:
        self.bits, self.symmetric, self.weight_shape = layer.bits, layer.symmetric, tuple(layer.shape)
        self.group_size, self.grids, self.numel = layer.group_size, layer.grids, layer.numel
        self.register_buffer("codes", layer.codes.contiguous())
        self.register_buffer("scale", layer.scale.to(torch.float16).contiguous())
        self.register_buffer("zero", None if layer.symmetric else layer.zero.contiguous())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.to(torch.float16).contiguous())

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = unpack_memory_codes(self.codes, self.bits, self.numel).reshape(self.grids, -1).float()
        zero = self.zero.float()[:, None] if self.zero is not None else float(2 ** (self.bits - 1))
        weight = ((codes - zero) * self.scale.float()[:, None]).reshape(self.weight_shape)
        return weight if dtype == torch.float32 else weight.to(dtype)

    def _bias(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(x.dtype if x.is_floating_point() else torch.float32)

    def _weight_for(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight()
        return w if x.dtype == torch.float32 else w.to(x.dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"shape={self.weight_shape}, bits={self.bits}, symmetric={self.symmetric}{group}"


class QuantLinear(_QuantWeight):
    def __init__(self, layer: PackedLayer):
        super().__init__()
        if len(layer.shape) != 2:
            raise ValueError(f"{layer.name}: a Linear weight is 2-D, got shape {layer.shape}")
        self._init_codes(layer)
        self.out_features, self.in_features = layer.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._weight_for(x), self._bias(x))


class QuantConv2d(_QuantWeight):
    def __init__(self, layer: PackedLayer, conv: nn.Conv2d):
        super().__init__()
        if tuple(conv.weight.shape) != tuple(layer.shape):
            raise ValueError(f"{layer.name}: codes of shape {layer.shape} for a conv of {tuple(conv.weight.shape)}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"{layer.name}: padding_mode {conv.padding_mode!r} is not supported")
        self._init_codes(layer)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self._weight_for(x), self._bias(x), self.stride, self.padding, self.dilation, self.groups)
