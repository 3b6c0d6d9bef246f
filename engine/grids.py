"""Sample grids as PNG: one per run, and side-by-side comparisons of chosen sets of runs.

Samples are stored per run as `samples.safetensors` (uint8 images [N, H, W] plus labels), so
grids can be rebuilt without torch and compared across variants: sample i of every variant
had the same prompt and the same initial noise.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from engine.atomic_files import atomic_path

SAMPLES_FILE = "samples.safetensors"
COMPARISONS_DIR = "comparisons"


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1] (torch or numpy, [N, 1, H, W], [N, 3, H, W] or [N, H, W]) to uint8
    [N, H, W] (grey) or [N, H, W, 3] (RGB)."""
    arr = images.numpy() if hasattr(images, "numpy") else np.asarray(images)
    if arr.ndim == 4:
        arr = arr[:, 0] if arr.shape[1] == 1 else arr.transpose(0, 2, 3, 1)
    return np.clip(np.round((arr + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_samples(path: Path, images_u8: np.ndarray, labels: list[int] | None) -> None:
    """The samples as uint8 and their class labels (-1 for models without classes)."""
    from safetensors.numpy import save_file

    labels = [-1] * len(images_u8) if labels is None else labels
    with atomic_path(path) as tmp:
        save_file({"images": np.ascontiguousarray(images_u8), "labels": np.asarray(labels, dtype=np.int64)}, str(tmp))


def load_samples(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels `save_samples` wrote; `engine.errors.DamagedFile` for a damaged file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from engine.errors import DamagedFile
    from engine.file_checks import check_safetensors, require_tensors

    require_tensors(path, check_safetensors(path), ("images", "labels"))
    try:
        data = load_file(str(path))
    except (SafetensorError, ValueError) as exc:
        raise DamagedFile(path, f"not a valid samples file: {exc}") from None
    if data["images"].dtype != np.uint8 or len(data["labels"]) != len(data["images"]):
        raise DamagedFile(path, "not a valid samples file: images must be uint8 with one label each")
    return data["images"], data["labels"]


def tile(images: np.ndarray, rows: int, cols: int, pad: int = 1) -> np.ndarray:
    """Lay out uint8 images [N, H, W] (or [N, H, W, 3]) row by row on a grey background."""
    h, w = images.shape[1:3]
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, *images.shape[3:]), 96, dtype=np.uint8)
    for i, img in enumerate(images[: rows * cols]):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    return canvas


def save_png(canvas: np.ndarray, path: Path, scale: int = 2) -> Path:
    from PIL import Image

    image = Image.fromarray(canvas, mode="L" if canvas.ndim == 2 else "RGB")
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def run_grid(images_u8: np.ndarray, path: Path, cols: int = 10, rows: int = 10) -> Path:
    """The first rows x cols samples; sample i asks for digit i % 10, so columns are classes."""
    rows = min(rows, max(1, (len(images_u8) + cols - 1) // cols))
    return save_png(tile(images_u8, rows, cols), path)


def comparison_path(runs_dir: Path, experiment: str, run_ids: list[int]) -> Path:
    """One file per set of runs: `comparisons/EXPERIMENT-runs-1-4-9.png` (or a digest of the
    ids when there are many), so a grid is only ever rewritten with the same runs."""
    ids = sorted(set(run_ids))
    tag = "-".join(map(str, ids)) if len(ids) <= 8 else f"{len(ids)}-{hashlib.sha1(str(ids).encode()).hexdigest()[:10]}"
    return Path(runs_dir) / COMPARISONS_DIR / f"{experiment}-runs-{tag}.png"


def comparison_grid(columns: list[tuple[str, Path]], path: Path, rows: int = 10) -> Path:
    """One column per run, labelled (same prompts, same noise in each row), from samples files."""
    stacks = []
    for _, samples_path in columns:
        images, _ = load_samples(samples_path)
        stacks.append(images[:rows])
    n = min(len(s) for s in stacks)
    interleaved = np.stack([s[:n] for s in stacks], axis=1).reshape(n * len(stacks), *stacks[0].shape[1:])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(tile(interleaved, n, len(stacks)), path)
    add_labels(path, [label for label, _ in columns], stacks[0].shape[2])
    return path


def add_labels(path: Path, labels: list[str], cell: int, pad: int = 1, scale: int = 2) -> None:
    """A strip above the grid with each column's label: across when every label fits its
    column, else written upwards (so long names stay whole)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    column = (cell + pad) * scale
    sizes = [font.getbbox(label) for label in labels]
    widths = [box[2] - box[0] for box in sizes]
    height = max((box[3] - box[1] for box in sizes), default=8) + 4
    upright = any(w > column - 2 for w in widths)
    strip_height = (max(widths, default=0) + 6) if upright else height
    with Image.open(path) as grid:
        grid = grid.convert("L" if grid.mode == "L" else "RGB")
        out = Image.new(grid.mode, (grid.width, grid.height + strip_height), 255 if grid.mode == "L" else (255,) * 3)
        out.paste(grid, (0, strip_height))
    draw = ImageDraw.Draw(out)
    for i, (label, w) in enumerate(zip(labels, widths)):
        left = pad * scale + i * column
        if upright:
            text = Image.new("L", (w + 2, height), 255)
            ImageDraw.Draw(text).text((1, 1), label, fill=0, font=font)
            text = text.rotate(90, expand=True)
            out.paste(text.convert(out.mode), (left + max(0, (column - text.width) // 2), strip_height - text.height - 2))
        else:
            draw.text((left + (column - w) // 2, 2), label, fill=0, font=font)
    with atomic_path(path) as tmp:
        out.save(tmp, format="PNG")
