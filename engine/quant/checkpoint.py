"""Store a quantized denoiser's packed checkpoint and load it back.

Every method leaves the denoiser holding its simulated quantized weights and returns the integer
codes (`QuantResult.packed`); `store_and_reload` writes them packed, loads the file back into the
denoiser and checks that every tensor equals the simulated one, so whatever is evaluated next
comes from the stored file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from engine.quant.packing import load_packed, save_packed


def dense_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the model's safetensors checkpoint in dtype (what save_pretrained writes)."""
    from safetensors.torch import save

    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    return len(save(state))


def store_and_reload(denoiser: nn.Module, packed: dict, half: list[str], path: Path) -> int:
    """Write the packed checkpoint, load it back into `denoiser`, check it equals the simulated
    weights exactly; returns the file's size in bytes."""
    size = save_packed(path, denoiser, packed, half)
    simulated = {k: v.detach().cpu().clone() for k, v in denoiser.state_dict().items()}
    loaded = load_packed(path)
    for key, value in simulated.items():
        if not torch.equal(loaded[key].to(value.dtype), value):
            raise RuntimeError(f"{path}: {key} differs from the simulated quantized weight")
    denoiser.load_state_dict(loaded, strict=True)
    return size
