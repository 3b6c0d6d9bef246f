"""The denoiser's tensor names and shapes from its safetensors header, torch-free.

Used by the config loader to check model-dependent keys (layer groups, size budgets) before
anything runs. Only headers are read (`safe_open` with the numpy framework), never the data.
"""

from __future__ import annotations

import math
from pathlib import Path

from engine.mixed_precision import LayerShape, ModelTensors

DENOISER_DIRS = ("unet", "transformer")
INTEGER_BYTES = {"I8": 1, "U8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8, "BOOL": 1}


def denoiser_files(model_dir: Path) -> list[Path]:
    """The safetensors files of the model's denoiser (`unet/` or `transformer/`), or []."""
    for sub in DENOISER_DIRS:
        folder = Path(model_dir) / sub
        if (folder / "config.json").is_file():
            return sorted(folder.glob("*.safetensors"))
    return []


def read_model_tensors(model_dir: Path) -> ModelTensors | None:
    """Candidate layers and sizes of the denoiser, or None if there is nothing readable."""
    from safetensors import safe_open

    files = denoiser_files(model_dir)
    if not files:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    fp32_bytes: dict[str, int] = {}
    header = 0
    try:
        for path in files:
            with open(path, "rb") as fh:
                header += 8 + int.from_bytes(fh.read(8), "little")
            with safe_open(str(path), framework="np") as f:
                for key in f.keys():
                    part = f.get_slice(key)
                    shape = tuple(part.get_shape())
                    shapes[key] = shape
                    fp32_bytes[key] = math.prod(shape) * INTEGER_BYTES.get(part.get_dtype(), 4)
    except Exception:  # noqa: BLE001 - an unreadable file: the worker reports it exactly
        return None
    layers, owned = [], set()
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) < 2:
            continue
        name = key[: -len(".weight")]
        bias = shapes.get(f"{name}.bias")
        has_bias = bias is not None and bias == (shape[0],)
        certain = len(shape) in (3, 4) or has_bias
        layers.append(LayerShape(name=name, shape=shape, has_bias=has_bias, certain=certain))
        owned.add(key)
        if has_bias:
            owned.add(f"{name}.bias")
    other = sum(size for key, size in fp32_bytes.items() if key not in owned)
    return ModelTensors(layers=layers, other_fp32_bytes=other, total_fp32_bytes=sum(fp32_bytes.values()),
                        header_bytes=header)
