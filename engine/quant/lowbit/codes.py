"""A packed checkpoint's quantized layers as the low-bit modules hold them in memory.

This is the one place that knows the file's bit layout: each layer's codes are read with the
packing module's own `unpack_codes` (whatever the format version) and re-laid out for memory:
8-bit codes one per byte, 4-bit codes two per byte (code 2i in the low nibble of byte i, code
2i + 1 in the high one). Other widths are refused: they would need a third layout and would
not save memory over int8 in this form (`REAL_BITS`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from engine.quant import packing

REAL_BITS = (4, 8)


@dataclass
class PackedLayer:
    name: str
    bits: int
    symmetric: bool
    shape: tuple[int, ...]
    group_size: int | None
    codes: torch.Tensor  # uint8: numel bytes (8 bits) or ceil(numel / 2) bytes (4 bits)
    scale: torch.Tensor  # float16 [grids]
    zero: torch.Tensor | None  # uint8 [grids] for asymmetric layers; symmetric use 2^(bits-1)
    bias: torch.Tensor | None  # float16 [out]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def grids(self) -> int:
        return self.shape[0] * (self.shape[1] // self.group_size) if self.group_size else self.shape[0]


def memory_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (one per element, < 2^bits) in the in-memory layout of `bits`."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    if bits == 4:
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        pairs = flat.reshape(-1, 2)
        return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()
    raise ValueError(f"{bits}-bit codes cannot be held for real execution (supported: {REAL_BITS})")


def unpack_memory_codes(codes: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `memory_codes`: one uint8 code per element (1-D, `numel` long)."""
    if bits == 8:
        return codes
    low, high = codes & 0x0F, codes >> 4
    return torch.stack([low, high], dim=1).reshape(-1)[:numel]


def read_packed_layers(path: str | Path) -> list[PackedLayer]:
    """The quantized layers of a packed checkpoint, in file order, with codes in memory layout.
    ValueError for a layer whose width `REAL_BITS` does not include; DamagedFile for a damaged
    file (its header is checked first)."""
    from engine.file_checks import check_safetensors

    check_safetensors(path)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if packing.META_KEY not in meta:
            raise ValueError(f"{path}: not a packed checkpoint (no {packing.META_KEY} metadata)")
        info = json.loads(meta[packing.META_KEY])
        version = info.get("version", packing.FORMAT_VERSION)
        entries = packing._parse_layers(info)
        keys = set(f.keys())
        tensors = {key: f.get_tensor(key).reshape(-1) for key in packing.QUANT_KEYS if key in keys}
    for name, bits, *_ in entries:
        if bits not in REAL_BITS:
            raise ValueError(f"{path}: layer {name} has {bits}-bit codes; real execution supports "
                             f"{' and '.join(map(str, REAL_BITS))} bits")
    pos = {key: 0 for key in packing.QUANT_KEYS}

    def take(key: str, n: int) -> torch.Tensor:
        t = tensors.get(key, torch.empty(0))
        if pos[key] + n > t.numel():
            raise ValueError(f"{path}: {key} is too short for the layers in the metadata")
        pos[key] += n
        return t[pos[key] - n : pos[key]].clone()

    layers = []
    for name, bits, symmetric, shape, has_bias, group in entries:
        numel = math.prod(shape)
        nbytes = packing.code_bytes(numel, bits, version)
        codes = packing.unpack_codes(take(packing.CODES, nbytes), bits, numel, version)
        layer = PackedLayer(name, bits, symmetric, tuple(shape), group, memory_codes(codes, bits),
                            scale=torch.empty(0), zero=None, bias=None)
        layer.scale = take(packing.SCALES, layer.grids)
        if not symmetric:
            layer.zero = take(packing.ZEROS, layer.grids)
        if has_bias:
            layer.bias = take(packing.BIASES, shape[0])
        layers.append(layer)
    return layers
