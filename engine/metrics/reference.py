"""Reference statistics for FID: pytorch-fid's `.npz` files, folders of images, the real digits.

- A `.npz` holds `mu` [d] and `sigma` [d, d], as `python -m pytorch_fid --save-stats` writes it
  (and as `engine stats FOLDER --out FILE.npz` writes it: pytorch-fid reads it back).
- A folder is read as pytorch-fid reads it: the files with its image extensions, sorted by
  path, each opened with PIL and converted to RGB. Its statistics are computed once and cached
  in `runs/cache/reference-<key>.npz`, the key hashing the folder's file names and contents
  with the feature model's id (weights digest): change an image or the model and they are
  recomputed.
- The digits default: the 1797 real digits (`engine.data.digits`), cached the same way.

Cached files also keep `n` and `floor` (FID between two halves of the reference features,
where the features were available); pytorch-fid ignores extra keys.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.atomic_files import atomic_path
from engine.metrics.fid import FeatureStats, feature_stats, split_half_floor

# pytorch_fid.fid_score.IMAGE_EXTENSIONS (checked by tests), kept here to stay torch-free
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")
DIGITS = "digits"


class ReferenceError(Exception):
    pass


@dataclass
class Reference:
    """Statistics to compare against, with where they came from."""

    stats: FeatureStats
    id: str  # what they are: "digits", a folder's content key, or an npz file's digest
    path: Path | None  # the npz holding them (a cache file or the user's file)
    floor: float | None = None
    features: np.ndarray | None = None  # the reference's feature vectors where known (for KID)


def image_files(folder: Path) -> list[Path]:
    """The files pytorch-fid reads from a folder, in its order."""
    return sorted(f for ext in IMAGE_EXTENSIONS for f in Path(folder).glob(f"*.{ext}"))


def save_stats(path: Path, stats: FeatureStats, **extra) -> Path:
    """Write mu and sigma as pytorch-fid does (np.savez_compressed), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # a temporary per process and call: runs write at once
        np.savez_compressed(tmp, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n),
                            **{k: np.float64(v) for k, v in extra.items() if v is not None})
    return path


def load_stats(path: Path) -> tuple[FeatureStats, float | None]:
    path = Path(path)
    try:
        with np.load(path) as data:
            if "mu" not in data or "sigma" not in data:
                raise ReferenceError(f"{path}: no 'mu' and 'sigma' arrays (not pytorch-fid statistics)")
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
            n = int(data["n"]) if "n" in data else 0
            floor = float(data["floor"]) if "floor" in data else None
    except (OSError, ValueError) as exc:
        raise ReferenceError(f"{path}: cannot read reference statistics ({exc})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ReferenceError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not [d] and [d, d]")
    return FeatureStats(mu=mu, sigma=sigma, n=n), floor


def npz_dimension(path: Path) -> int:
    """The dimension of an npz's statistics, reading only the header of `mu` (torch-free)."""
    with np.load(path) as data:
        if "mu" not in data:
            raise ReferenceError(f"{path}: no 'mu' array (not pytorch-fid statistics)")
        return int(np.atleast_1d(data["mu"]).shape[0])


def folder_key(folder: Path, feature_id: str) -> str:
    files = image_files(folder)
    if not files:
        raise ReferenceError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    h = hashlib.sha256(feature_id.encode())
    for f in files:
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def read_images(files: list[Path]):
    """uint8 arrays [C=3, H, W] of image files, converted as pytorch-fid converts them."""
    from PIL import Image

    for f in files:
        with Image.open(f) as img:
            yield np.asarray(img.convert("RGB")).transpose(2, 0, 1)


def folder_features(folder: Path, extractor, batch_size: int = 50) -> np.ndarray:
    """Features of every image of a folder (batches of equal-sized consecutive images)."""
    files = image_files(folder)
    if not files:
        raise ReferenceError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    out, batch = [], []
    for image in read_images(files):
        if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
            out.append(extractor.extract_uint8(np.stack(batch)))
            batch = []
        batch.append(image)
    out.append(extractor.extract_uint8(np.stack(batch)))
    return np.concatenate(out)


def stats_with_floor(features: np.ndarray) -> tuple[FeatureStats, float | None]:
    floor = split_half_floor(features, seed=0) if len(features) >= 4 else None
    return feature_stats(features), floor


def _features_file(cached: Path) -> Path:
    return cached.with_name(cached.stem + ".features.npy")


def _cached_features(cached: Path) -> np.ndarray | None:
    path = _features_file(cached)
    return np.load(path) if path.is_file() else None


def _save_features(cached: Path, features: np.ndarray) -> None:
    path = _features_file(cached)
    with atomic_path(path) as tmp:  # a temporary per process and call: runs write at once
        np.save(tmp, np.asarray(features, dtype=np.float32))


def folder_reference(folder: Path, extractor, cache_dir: Path) -> Reference:
    key = folder_key(folder, extractor.id)
    cached = Path(cache_dir) / f"reference-{key}.npz"
    if cached.is_file():
        stats, floor = load_stats(cached)
        features = _cached_features(cached)
    else:
        features = folder_features(folder, extractor)
        stats, floor = stats_with_floor(features)
        save_stats(cached, stats, floor=floor)
        _save_features(cached, features)
    return Reference(stats=stats, id=f"folder:{key}", path=cached, floor=floor, features=features)


def digits_reference(extractor, cache_dir: Path) -> Reference:
    """The real digits in the extractor's feature space."""
    key = hashlib.sha256(f"{DIGITS}\0{extractor.id}".encode()).hexdigest()[:16]
    cached = Path(cache_dir) / f"reference-{key}.npz"
    features = _cached_features(cached) if cached.is_file() else None
    if cached.is_file() and features is not None:
        stats, floor = load_stats(cached)
    else:
        from engine.data.digits import load_digits_16

        real, _ = load_digits_16()
        features = extractor.extract(real)[0]
        stats, floor = stats_with_floor(features)
        save_stats(cached, stats, floor=floor)
        _save_features(cached, features)
    return Reference(stats=stats, id=DIGITS, path=cached, floor=floor, features=features)


def npz_reference(path: Path) -> Reference:
    from engine.metrics.clip_score import file_digest

    stats, floor = load_stats(path)
    return Reference(stats=stats, id=f"npz:{file_digest(path)}", path=Path(path), floor=floor)


def load_reference(spec: str | None, extractor, cache_dir: Path) -> Reference:
    """`spec` is None / "digits" (the real digits), a `.npz` file or a folder of images.
    The statistics' dimension must be the feature model's."""
    if spec is None or spec == DIGITS:
        ref = digits_reference(extractor, cache_dir)
    else:
        path = Path(spec)
        if path.is_dir():
            ref = folder_reference(path, extractor, cache_dir)
        elif path.is_file():
            ref = npz_reference(path)
        else:
            raise ReferenceError(f"reference {path} does not exist")
    d = ref.stats.mu.shape[0]
    if d != extractor.dim:
        raise ReferenceError(f"reference {spec}: statistics of dimension {d}, but feature model "
                             f"{extractor.id} gives {extractor.dim}")
    return ref
