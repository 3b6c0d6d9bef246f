"""Sample grids as PNG: one per run, and one side-by-side comparison per experiment.

Samples are stored per run as `samples.safetensors` (uint8 images [N, H, W] plus labels), so
grids can be rebuilt without torch and compared across variants: sample i of every variant
had the same prompt and the same initial noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLES_FILE = "samples.safetensors"


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1] (torch or numpy, [N, 1, H, W] or [N, H, W]) to uint8 [N, H, W]."""
    arr = images.numpy() if hasattr(images, "numpy") else np.asarray(images)
    if arr.ndim == 4:
        arr = arr[:, 0]
    return np.clip(np.round((arr + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_samples(path: Path, images_u8: np.ndarray, labels: list[int]) -> None:
    from safetensors.numpy import save_file

    save_file({"images": images_u8, "labels": np.asarray(labels, dtype=np.int64)}, str(path))


def load_samples(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from safetensors.numpy import load_file

    data = load_file(str(path))
    return data["images"], data["labels"]


def tile(images: np.ndarray, rows: int, cols: int, pad: int = 1) -> np.ndarray:
    """Lay out uint8 images [N, H, W] row by row on a grey background."""
    h, w = images.shape[1:]
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 96, dtype=np.uint8)
    for i, img in enumerate(images[: rows * cols]):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    return canvas


def save_png(canvas: np.ndarray, path: Path, scale: int = 2) -> Path:
    from PIL import Image

    image = Image.fromarray(canvas, mode="L")
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)
    return path


def run_grid(images_u8: np.ndarray, path: Path, cols: int = 10, rows: int = 10) -> Path:
    """The first rows x cols samples; sample i asks for digit i % 10, so columns are classes."""
    rows = min(rows, max(1, (len(images_u8) + cols - 1) // cols))
    return save_png(tile(images_u8, rows, cols), path)


def comparison_grid(columns: list[tuple[str, Path]], path: Path, rows: int = 10) -> Path:
    """One column per variant (same prompts, same noise in each row), from samples files."""
    stacks = []
    for _, samples_path in columns:
        images, _ = load_samples(samples_path)
        stacks.append(images[:rows])
    n = min(len(s) for s in stacks)
    interleaved = np.stack([s[:n] for s in stacks], axis=1).reshape(n * len(stacks), *stacks[0].shape[1:])
    return save_png(tile(interleaved, n, len(stacks)), path)
