"""Quantized execution: a denoiser whose quantized layers keep their integer codes in memory.

`read_packed_layers` (codes.py) reads a run's packed checkpoint layer by layer; `to_lowbit`
(convert.py) swaps each quantized nn.Linear / nn.Conv2d for a `QuantLinear` / `QuantConv2d`
(modules.py) holding int8 or nibble-packed int4 codes and float16 scales as buffers, dequantized
one layer at a time inside forward; `model_bytes` counts what the denoiser holds.
"""

from engine.quant.lowbit.codes import REAL_BITS, PackedLayer, read_packed_layers
from engine.quant.lowbit.convert import model_bytes, to_lowbit
from engine.quant.lowbit.modules import QuantConv2d, QuantLinear

__all__ = ["REAL_BITS", "PackedLayer", "QuantConv2d", "QuantLinear", "model_bytes", "read_packed_layers", "to_lowbit"]
