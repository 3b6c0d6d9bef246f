"""Training data for QAT on a diffusers pipeline: clean latents with their captions, in a file.

Two sources (`TrainingData`):
- `images`: a folder of images with captions (engine.image_captions). Each image is resized
  (shorter side) and centre-cropped to the run's height x width, scaled to [-1, 1] and encoded
  by the pipeline's VAE (a seeded draw from its latent distribution), then scaled as the
  denoiser sees latents (`scaling_factor`, and `shift_factor` for SD 3).
- data-free (no folder): `samples` latents that the full-precision pipeline generates before
  anything is quantized, from seeded draws of the experiment's prompts, with the experiment's
  sampler (its steps, guidance, negative prompt and batch size) and initial latents of their own
  stream (`engine.sampling.GENERATED`, never the evaluation's). The captions are the prompts.

Memory: the latents are written batch by batch to `POOL_FILE` (a safetensors file: one float32
tensor `latents` [N, C, H, W], the captions in its metadata) and read back row by row for each
training batch, so only one batch of latents is in memory at a time, whatever N.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

POOL_FILE = "qat_latents.safetensors"
TENSOR = "latents"
META_KEY = "qtui_qat_captions"
ENCODE_BATCH = 8  # images through the VAE at a time
DEFAULT_SAMPLES = 64  # data-free latents when `train_samples` is not given

Progress = Callable[..., None]


@dataclass
class TrainingData:
    """Where a pipeline's QAT data comes from (method `qat`'s keys and the run)."""

    images: str | None = None  # `train_images`: a folder of images with captions
    samples: int | None = None  # `train_samples`: latents generated data-free (None: DEFAULT_SAMPLES)
    sampling: dict | None = None  # the experiment's sampling config, with its `prompts`
    folder: Path | None = None  # where the pool file is written (the run's folder; needed for pipelines)


class LatentPool:
    """A `POOL_FILE`: N clean latents and their captions; `read(indices)` loads those rows only."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        entry = header[TENSOR]
        self.shape = tuple(entry["shape"][1:])
        self.n = entry["shape"][0]
        self.captions: list[str] = json.loads(header["__metadata__"][META_KEY])
        self.row_bytes = 4 * math.prod(self.shape)
        self.start = 8 + size + entry["data_offsets"][0]

    def read(self, indices: torch.Tensor) -> torch.Tensor:
        rows = []
        with open(self.path, "rb") as f:
            for i in indices.tolist():
                f.seek(self.start + i * self.row_bytes)
                rows.append(torch.frombuffer(bytearray(f.read(self.row_bytes)), dtype=torch.float32))
        return torch.stack(rows).view(len(rows), *self.shape)


def write_pool(path: Path, shape: tuple[int, ...], captions: list[str], batches: Iterator[torch.Tensor]) -> LatentPool:
    """Stream `batches` (float32 [b, *shape], len(captions) rows in all) into a safetensors file."""
    n = len(captions)
    nbytes = 4 * n * math.prod(shape)
    header = {TENSOR: {"dtype": "F32", "shape": [n, *shape], "data_offsets": [0, nbytes]},
              "__metadata__": {META_KEY: json.dumps(captions)}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    written = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for batch in batches:
            f.write(batch.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            written += len(batch)
    if written != n:
        raise RuntimeError(f"{path}: wrote {written} latents for {n} captions")
    return LatentPool(path)


def load_image(path: Path, height: int, width: int) -> torch.Tensor:
    """[3, height, width] in [-1, 1]: the shorter side resized, then centre-cropped."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from None
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def image_pool(model, folder: str, seed: int, path: Path, progress: Progress | None) -> LatentPool:
    from engine.image_captions import image_caption_pairs

    pairs = image_caption_pairs(folder)
    gen = torch.Generator().manual_seed(seed)

    def batches():
        for start in range(0, len(pairs), ENCODE_BATCH):
            part = pairs[start : start + ENCODE_BATCH]
            pixels = torch.stack([load_image(p, model.height, model.width) for p, _ in part])
            yield model.encode_images(pixels, gen)
            if progress:
                progress("qat data", start + len(part), len(pairs), "encoding the training images")

    return write_pool(path, model.sample_shape, [c for _, c in pairs], batches())


def generated_pool(model, n: int, sampling: dict, seed: int, path: Path, progress: Progress | None) -> LatentPool:
    from engine.sampling import GENERATED, InitialLatents

    gen = torch.Generator().manual_seed(seed)
    captions = model.calibration_prompts(n, gen, sampling["prompts"])
    noise = InitialLatents(n, model.sample_shape, seed, stream=GENERATED)
    step, total = sampling["batch_size"], n * sampling["steps"]

    def batches():
        for start in range(0, n, step):
            part = captions[start : start + step]
            report = (lambda i: progress("qat data", start * sampling["steps"] + len(part) * i, total,
                                         "full-precision samples")) if progress else None
            yield model.sample_batch(part, noise[start : start + len(part)], sampling["steps"], sampling["guidance"],
                                     negative_prompt=sampling.get("negative_prompt", ""), on_step=report)

    return write_pool(path, model.sample_shape, captions, batches())


def build_pool(model, data: TrainingData, seed: int, progress: Progress | None) -> LatentPool:
    """The training latents of `model` (a diffusers pipeline's adapter) from `data`."""
    if data.folder is None:
        raise ValueError("QAT on a diffusers pipeline needs a folder for its training latents")
    path = Path(data.folder) / POOL_FILE
    if data.images is not None:
        return image_pool(model, data.images, seed, path, progress)
    prompts = (data.sampling or {}).get("prompts")
    if not prompts:
        raise ValueError(f"method 'qat' on {model.kind} needs training data: give the variant "
                         "`train_images = \"<folder>\"` (images with captions) or the experiment `prompts` "
                         "(data-free: the full-precision model's own samples)")
    samples = DEFAULT_SAMPLES if data.samples is None else data.samples
    if samples < 1:
        raise ValueError(f"train_samples must be at least 1, got {samples}")
    return generated_pool(model, samples, data.sampling, seed, path, progress)
