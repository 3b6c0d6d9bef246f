"""The cache of method `fisher`'s statistics, so that the variants of an experiment compute them once.

Fisher statistics depend only on the weights and the calibration set; measured sensitivities
also on the precision measured. Both are stored as safetensors under the runs folder's `cache/`,
keyed by a hash of the denoiser's and text encoders' weights, the scheduler, the model kind and
the calibration config, with the layer names in the metadata (an entry whose layers differ, or
that cannot be read, is recomputed). Each entry is computed under a file lock, so parallel runs
wait for the first instead of repeating its work.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from engine.atomic_files import atomic_path
from engine.models.loader import TextToImageModel
from engine.quant.fisher import ERROR_KEYS, FisherStats, Sensitivity, error_key
from engine.quant.roles import quantizable_layers

CACHE_VERSION = 2


class FisherCache:
    """Fisher statistics and measured sensitivities of one model and calibration config, in
    `cache_dir/fisher-<key>.safetensors` and `cache_dir/sensitivity-<key>-<precision>.safetensors`.
    Computation happens under a file lock, so runs in parallel compute each entry once."""

    def __init__(self, cache_dir: Path, model: TextToImageModel, calibration: dict):
        self.dir = cache_dir
        self.key = cache_key(model, calibration)
        self.names = [name for name, _, _ in quantizable_layers(model.denoiser)]
        self.calibration = calibration

    @contextmanager
    def _locked(self, name: str):
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self, path: Path) -> tuple[dict, dict] | None:
        from safetensors import safe_open

        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
            return None
        if meta.get("version") != str(CACHE_VERSION) or json.loads(meta.get("names", "[]")) != self.names:
            return None
        return arrays, meta

    def _write(self, path: Path, arrays: dict, meta: dict) -> None:
        from safetensors.numpy import save_file

        meta = {**meta, "version": str(CACHE_VERSION), "names": json.dumps(self.names),
                "calibration": json.dumps(self.calibration, sort_keys=True)}
        with atomic_path(path) as tmp:
            save_file(arrays, str(tmp), metadata=meta)

    def fisher(self, compute: Callable[[], FisherStats]) -> tuple[FisherStats, bool]:
        """(statistics, whether they came from the cache)."""
        path = self.dir / f"fisher-{self.key}.safetensors"
        with self._locked(f"fisher-{self.key}"):
            found = self._read(path)
            if found is not None:
                arrays, meta = found
                stats = FisherStats(names=self.names, fisher=arrays["fisher"],
                                    errors={k: arrays[f"err.{k}"] for k in ERROR_KEYS},
                                    loss=float(meta["loss"]), seconds=float(meta["seconds"]))
                return stats, True
            stats = compute()
            arrays = {"fisher": stats.fisher.astype(np.float64)}
            arrays.update({f"err.{k}": v.astype(np.float64) for k, v in stats.errors.items()})
            self._write(path, arrays, {"loss": repr(stats.loss), "seconds": repr(stats.seconds)})
            return stats, False

    def sensitivity(self, bits: int, symmetric: bool, compute: Callable[[], Sensitivity]) -> tuple[Sensitivity, float]:
        """(the sensitivities of every layer at `bits`, seconds it took to measure them)."""
        tag = error_key(bits, symmetric)
        path = self.dir / f"sensitivity-{self.key}-{tag}.safetensors"
        with self._locked(f"sensitivity-{self.key}-{tag}"):
            found = self._read(path)
            if found is not None:
                arrays, meta = found
                result = Sensitivity(base=float(meta["base_loss"]), increase=arrays["increase"],
                                     curvature=arrays["curvature"])
                return result, float(meta["seconds"])
            start = time.perf_counter()
            result = compute()
            seconds = time.perf_counter() - start
            arrays = {"increase": result.increase.astype(np.float64), "curvature": result.curvature.astype(np.float64)}
            self._write(path, arrays, {"base_loss": repr(result.base), "seconds": repr(seconds)})
            return result, seconds


def cache_key(model: TextToImageModel, calibration: dict) -> str:
    """Hash of everything the statistics depend on: the denoiser's and text encoder's weights,
    the scheduler, the model kind and the calibration config."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"kind": model.kind, "scheduler": model.scheduler_config,
                              "calibration": calibration, "version": CACHE_VERSION},
                             sort_keys=True, default=str).encode())
    for module in model.cache_modules:
        for key, tensor in module.state_dict().items():
            t = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{key}:{t.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]
