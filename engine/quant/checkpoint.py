"""Store a quantized denoiser's packed checkpoint and load it back, and count checkpoint bytes.

Every method leaves the denoiser holding its simulated quantized weights and returns the integer
codes (`QuantResult.packed`); `store_and_reload` writes them packed, loads the file back into the
denoiser and checks that every tensor equals the simulated one, so whatever is evaluated next
comes from the stored file.

Memory: writing streams the file layer by layer, and loading reads one tensor at a time into
the module's own parameters (`packing.load_packed_into`), so neither makes a copy of the model:
at SD 3.5 Medium's size (2.24B parameters) a float32 copy would be 9 GB. Sizes come from shapes
and dtypes (`engine.quant.safetensors_stream.file_size`), never by serialising.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from engine.quant.packing import load_packed_into, save_packed
from engine.quant.safetensors_stream import file_size, state_entries


def dense_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the model's safetensors checkpoint with floating tensors in dtype (what
    save_pretrained writes), counted from shapes: nothing is copied or serialised."""
    return file_size(state_entries(model.state_dict(), dtype))


def store_and_reload(denoiser: nn.Module, packed: dict, half: list[str], path: Path) -> int:
    """Write the packed checkpoint, load it back into `denoiser` tensor by tensor, checking that
    each equals the simulated weight exactly; returns the file's size in bytes."""
    size = save_packed(path, denoiser, packed, half)
    load_packed_into(denoiser, path, expect_equal=True)
    return size
