"""Weight quantization core: RTN quantizer, layer roles, the `quantize_` verb and packing."""

from engine.quant.apply import QuantReport, RTNConfig, quantize_
from engine.quant.packing import bits_per_weight, load_packed, pack_codes, packed_nbytes, save_dense, save_packed, unpack_codes
from engine.quant.roles import ROLES, layer_role, quantizable_layers
from engine.quant.rtn import (
    QuantizedTensor,
    dequantize,
    fake_quantize,
    quantize_tensor,
    relative_error,
)

__all__ = [
    "ROLES",
    "QuantReport",
    "QuantizedTensor",
    "RTNConfig",
    "bits_per_weight",
    "dequantize",
    "fake_quantize",
    "layer_role",
    "load_packed",
    "pack_codes",
    "packed_nbytes",
    "quantizable_layers",
    "quantize_",
    "quantize_tensor",
    "relative_error",
    "save_dense",
    "save_packed",
    "unpack_codes",
]
