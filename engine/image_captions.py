"""A folder of training images with captions (method `qat`'s `train_images`). Torch-free.

Layout, either of:
- `metadata.jsonl` (Hugging Face's ImageFolder convention): one JSON object a line with
  `file_name` (relative to the folder) and `text` (the caption); or
- image files (.png, .jpg, .jpeg, .webp, .bmp) each with a caption file of the same stem,
  `cat.png` + `cat.txt` (the whole file, stripped, is the caption).

Every image must have a non-empty caption; a problem is a one-line `ImageFolderError` naming the
file. Pairs are sorted by file name, so a seeded draw picks the same images on every machine.
"""

from __future__ import annotations

import json
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"


class ImageFolderError(ValueError):
    pass


def _from_metadata(folder: Path, metadata: Path) -> list[tuple[Path, str]]:
    pairs = []
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ImageFolderError(f"{metadata}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not isinstance(row.get("text"), str):
            raise ImageFolderError(f"{metadata}:{number}: needs a string `file_name` and a string `text`")
        image = folder / row["file_name"]
        if not image.is_file():
            raise ImageFolderError(f"{metadata}:{number}: no such image {image}")
        if not row["text"].strip():
            raise ImageFolderError(f"{metadata}:{number}: the caption of {row['file_name']} is empty")
        pairs.append((image, row["text"].strip()))
    return pairs


def _from_caption_files(folder: Path) -> list[tuple[Path, str]]:
    pairs = []
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            raise ImageFolderError(f"{image}: no caption file {caption.name} (or give a {METADATA_FILE})")
        text = caption.read_text(encoding="utf-8").strip()
        if not text:
            raise ImageFolderError(f"{caption}: the caption is empty")
        pairs.append((image, text))
    return pairs


def image_caption_pairs(folder: str | Path) -> list[tuple[Path, str]]:
    """(image path, caption) of every training image in `folder`, sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageFolderError(f"{folder}: no such folder of training images")
    metadata = folder / METADATA_FILE
    try:
        pairs = _from_metadata(folder, metadata) if metadata.is_file() else _from_caption_files(folder)
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageFolderError(f"{folder}: cannot read the training images ({exc})") from None
    if not pairs:
        raise ImageFolderError(f"{folder}: no training images (image files with same-stem .txt captions, "
                               f"or a {METADATA_FILE} of file_name and text)")
    return sorted(pairs)
