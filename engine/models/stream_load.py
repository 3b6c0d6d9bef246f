"""A diffusers model loaded tensor by tensor with plain file reads, so that its load peaks at its
weights plus one tensor.

`from_pretrained` (with `low_cpu_mem_usage`) builds the model empty, but it reads the weights
through a memory map of the whole safetensors file: every page it touches stays resident until the
file is closed, so loading SD 3.5 Medium's 4.5 GB transformer in bfloat16 from its fp16 file held
the file's pages and the converted weights at once (a resident peak of 11.8 GiB for a 6.3 GB
pipeline). Here each tensor is read with `readinto` into a buffer of its own size, cast to the
run's dtype and put in place; the buffer is dropped before the next one is read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from engine.quant.safetensors_stream import DTYPE_NAMES

TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The safetensors files of one component (one file or the shards its index names)."""
    stem = "diffusion_pytorch_model"
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    indexes = [folder / f"{stem}{suffix}.index.json"]  # the older name of a variant's index
    if variant:
        indexes.insert(0, folder / f"{stem}.safetensors.index.{variant}.json")
    for index in indexes:
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / shard for shard in shards]
    single = folder / f"{stem}{suffix}"
    if not single.exists():
        raise FileNotFoundError(f"{single}: no such weights file")
    return [single]


def read_tensors(path: Path):
    """(name, tensor) for every tensor of a safetensors file, one at a time, by plain reads."""
    from engine.file_checks import check_safetensors

    from engine.errors import DamagedFile

    header = check_safetensors(path)  # DamagedFile for a truncated or garbage file
    with open(path, "rb") as fh:
        start = 8 + int.from_bytes(fh.read(8), "little")
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in TORCH_DTYPES:
                raise DamagedFile(path, f"tensor {name} has dtype {entry['dtype']}, which qtui does not load")
            dtype = TORCH_DTYPES[entry["dtype"]]
            begin, end = entry["data_offsets"]
            buffer = torch.empty(end - begin, dtype=torch.uint8)
            fh.seek(start + begin)
            if end > begin and fh.readinto(memoryview(buffer.numpy())) != end - begin:
                raise DamagedFile(path, f"truncated inside tensor {name}")
            shape = entry["shape"]
            yield name, (buffer.view(dtype).reshape(shape) if math.prod(shape) else torch.empty(shape, dtype=dtype))


def load_model(cls, folder: Path, variant: str | None, dtype: torch.dtype) -> nn.Module:
    """`cls.from_pretrained(folder, variant=..., dtype=...)`, built empty and filled by
    `read_tensors`; every parameter and persistent buffer must come from the files."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    folder = Path(folder)
    with init_empty_weights():
        model = cls.from_config(cls.load_config(folder))
    expected = set(model.state_dict())
    keep_fp32 = tuple(getattr(cls, "_keep_in_fp32_modules", None) or ())  # as from_pretrained keeps them
    seen = set()
    for path in weight_files(folder, variant):
        for name, tensor in read_tensors(path):
            if name not in expected:
                raise ValueError(f"{path}: tensor {name} is not in {cls.__name__}")
            fp32 = dtype in (torch.float16, torch.bfloat16) and any(part in keep_fp32 for part in name.split("."))
            target = torch.float32 if fp32 else dtype
            set_module_tensor_to_device(model, name, "cpu", value=tensor,
                                        dtype=target if tensor.is_floating_point() else None)
            seen.add(name)
    missing = sorted(expected - seen)
    if missing:
        raise ValueError(f"{folder}: the weights lack {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
    return model.eval()
