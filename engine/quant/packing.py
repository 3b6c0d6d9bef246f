"""Real low-bit storage: bit-packed codes in a safetensors file, and dense size references.

Layout of a packed file, for each quantized layer `name`:
  `{name}.weight.packed`  uint8, codes packed 4 (bits <= 2), 2 (bits <= 4) or 1 per byte
  `{name}.weight.scale`   float16 [out_channels]
  `{name}.weight.zero`    uint8 [out_channels], only when asymmetric (symmetric: 2^(bits-1))
plus every other state-dict tensor as-is (floating point ones in float32). Per-layer bits,
symmetric and shape live in the metadata as one JSON string under the key "qtui_quant".
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from engine.quant.rtn import QuantizedTensor, dequantize

META_KEY = "qtui_quant"
FORMAT_VERSION = 1
SUFFIXES = ("packed", "scale", "zero")


def codes_per_byte(bits: int) -> int:
    """How many `bits`-bit codes share one byte: 4, 2 or 1."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
    return 4 if bits <= 2 else 2 if bits <= 4 else 1


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (< 2^bits) into a 1-D uint8 tensor, low bits first, zero-padded."""
    per_byte = codes_per_byte(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    flat = codes.detach().cpu().reshape(-1)
    if flat.numel() and int(flat.max()) >= 2**bits:
        raise ValueError(f"code {int(flat.max())} does not fit in {bits} bits")
    if per_byte == 1:
        return flat.clone()
    width = 8 // per_byte
    pad = (-flat.numel()) % per_byte
    groups = torch.cat([flat, flat.new_zeros(pad)]).to(torch.int16).reshape(-1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int16) * width
    return (groups << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `numel` codes as a 1-D uint8 tensor."""
    per_byte = codes_per_byte(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("packed codes must be a 1-D uint8 tensor")
    if packed.numel() != math.ceil(numel / per_byte):
        raise ValueError(f"{packed.numel()} bytes cannot hold exactly {numel} {bits}-bit codes")
    if per_byte == 1:
        return packed.clone()
    width = 8 // per_byte
    shifts = torch.arange(per_byte, dtype=torch.int16) * width
    values = (packed.to(torch.int16)[:, None] >> shifts) & (2**width - 1)
    return values.reshape(-1)[:numel].to(torch.uint8)


def _plain(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """CPU contiguous tensors, floating ones cast to `dtype`; tied tensors get their own copy."""
    out, seen = {}, set()
    for key, t in state.items():
        t = t.detach().cpu()
        t = (t.to(dtype) if t.is_floating_point() else t).contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone() if ptr in seen else t  # safetensors refuses shared storage
        seen.add(ptr)
    return out


def save_packed(path: str | Path, model: nn.Module, packed: dict[str, QuantizedTensor]) -> int:
    """Write `model` with the layers in `packed` stored as low-bit codes; return bytes on disk."""
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for name, qt in packed.items():
        key = f"{name}.weight"
        if key not in state:
            raise ValueError(f"{key} is not in the model's state dict")
        if tuple(state[key].shape) != tuple(qt.shape):
            raise ValueError(f"{key}: shape {tuple(state[key].shape)} != quantized {qt.shape}")
        tensors[f"{key}.packed"] = pack_codes(qt.codes, qt.bits)
        tensors[f"{key}.scale"] = qt.scale.detach().cpu().to(torch.float16).contiguous()
        if not qt.symmetric:
            tensors[f"{key}.zero"] = qt.zero.detach().cpu().to(torch.uint8).contiguous()
        layers[name] = {"bits": qt.bits, "symmetric": qt.symmetric, "shape": list(qt.shape)}
    quantized = {f"{name}.weight" for name in packed}
    rest = {key: t for key, t in state.items() if key not in quantized}
    for key, t in _plain(rest, torch.float32).items():
        if key in tensors:
            raise ValueError(f"state dict key {key} collides with a packed tensor name")
        tensors[key] = t
    meta = {META_KEY: json.dumps({"version": FORMAT_VERSION, "layers": layers})}
    save_file(tensors, str(path), metadata=meta)
    return os.path.getsize(path)


def load_packed(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a `save_packed` file back as a float32 state dict, quantized weights dequantized.

    A file without quantization metadata (e.g. from `save_dense`) loads as a plain state dict.
    """
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        layers = json.loads(meta[META_KEY])["layers"] if META_KEY in meta else {}
        owned = {f"{name}.weight.{s}" for name in layers for s in SUFFIXES}
        state = {}
        for key in f.keys():
            if key not in owned:
                t = f.get_tensor(key)
                state[key] = t.float() if t.is_floating_point() else t
        for name, info in layers.items():
            key = f"{name}.weight"
            bits, symmetric, shape = int(info["bits"]), bool(info["symmetric"]), tuple(info["shape"])
            codes = unpack_codes(f.get_tensor(f"{key}.packed"), bits, math.prod(shape))
            scale = f.get_tensor(f"{key}.scale")
            if symmetric:
                zero = torch.full((shape[0],), 2 ** (bits - 1), dtype=torch.uint8)
            else:
                zero = f.get_tensor(f"{key}.zero")
            qt = QuantizedTensor(codes.reshape(shape), scale, zero, bits, symmetric, shape)
            state[key] = dequantize(qt)
    return state


def save_dense(path: str | Path, model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Write the plain state dict with floating tensors in `dtype`; return bytes on disk."""
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
    save_file(_plain(model.state_dict(), dtype), str(path))
    return os.path.getsize(path)
