"""The evaluation protocol shared by every variant, in one entry point: `Evaluator`.

Built from a run's config (feature model, reference statistics, CLIP model), it turns the
sampled images with their prompts (and class labels, where there are classes) into metrics:

- `fid`, `fid_ci_low`, `fid_ci_high`: FID against the reference with a bootstrap interval
  (`engine.metrics.fid.fid_bootstrap`), `fid_floor`: a perfect generator's expected FID at
  this run's sample count (engine/metrics/floor.py, from the reference's Gaussian fit);
- `kid`, `kid_ci_low`, `kid_ci_high` where the reference keeps its features (engine/metrics/kid.py);
- `prompt_acc` where the feature model classifies (the digits classifier) and labels are given;
- `clip_score`, `clip_score_ci_low`, `clip_score_ci_high`: mean per-sample CLIP score
  (100 * max(cos, 0)) with a percentile bootstrap interval over the same resamples as FID.

Per-sample evaluation data: `eval.npz` in the run folder
-------------------------------------------------------
Written by `Evaluator.evaluate`, read by `load_eval`, so that paired comparisons between runs
can be recomputed without sampling again (sample i of every run of one protocol had the same
prompt and initial noise). Arrays (numpy `.npz`, uncompressed):

    features         float32 [N, d]  feature vectors (exactly the values FID was computed from)
    labels           int64 [N]       class asked for by sample i (absent without classes)
    preds            int64 [N]       class predicted by the feature model (absent unless it classifies)
    clip             float32 [N]     per-sample CLIP score (absent without a CLIP model)
    prompts          str [N]         prompt of sample i
    feature_model    str []          feature model id, with its weights digest ("inception@<sha12>")
    clip_model       str []          CLIP model id with its weights digest ("" without one)
    reference        str []          reference id ("digits", "folder:<key>", "npz:<sha12>")
    reference_stats  str []          npz with the reference's mu and sigma, relative to the run folder
                                     (or absolute), pytorch-fid's format: `load_stats` reads it
    seed             int64 []        the seed of the bootstrap resamples
    version          int64 []        1

`EvalData.reference_stats()` loads the reference statistics back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.atomic_files import atomic_path
from engine.metrics.fid import FeatureStats, bootstrap_counts, fid_bootstrap, frechet_distance, feature_stats
from engine.metrics.floor import gaussian_floor
from engine.metrics.kid import kid
from engine.metrics.reference import Reference, load_reference, load_stats

EVAL_FILE = "eval.npz"
EVAL_VERSION = 1


@dataclass
class EvalData:
    folder: Path
    features: np.ndarray
    prompts: list[str]
    labels: np.ndarray | None
    preds: np.ndarray | None
    clip: np.ndarray | None
    feature_model: str
    clip_model: str
    reference: str
    reference_path: str
    seed: int

    def reference_stats(self) -> FeatureStats:
        path = Path(self.reference_path)
        return load_stats(path if path.is_absolute() else self.folder / path)[0]


def save_eval(folder: Path, data: dict) -> Path:
    path = Path(folder) / EVAL_FILE
    with atomic_path(path) as tmp:
        np.savez(tmp, **{k: v for k, v in data.items() if v is not None})
    return path


def load_eval(folder: str | Path) -> EvalData:
    """The per-sample data of a run; `engine.errors.DamagedFile` if its file is damaged."""
    from engine.file_checks import check_npz
    from engine.paired_runs import EVAL_ARRAYS

    folder = Path(folder)
    f = check_npz(folder / EVAL_FILE, EVAL_ARRAYS)
    get = f.get
    return EvalData(
        folder=folder,
        features=f["features"],
        prompts=[str(p) for p in f["prompts"]],
        labels=get("labels"),
        preds=get("preds"),
        clip=get("clip"),
        feature_model=str(f["feature_model"]),
        clip_model=str(f["clip_model"]),
        reference=str(f["reference"]),
        reference_path=str(f["reference_stats"]),
        seed=int(f["seed"]),
    )


def mean_with_interval(values: np.ndarray, n_boot: int, seed: int, alpha: float = 0.05) -> tuple[float, float, float]:
    """Mean and percentile bootstrap interval, on the resamples `bootstrap_counts` gives FID."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if n_boot < 1:
        return mean, mean, mean
    boots = np.array([counts @ values for counts in bootstrap_counts(len(values), n_boot, seed)]) / len(values)
    low, high = np.percentile(boots, [50.0 * alpha, 100.0 - 50.0 * alpha])
    return mean, float(low), float(high)


def run_floor(ref: FeatureStats, n_gen: int, cache_dir: Path | None = None) -> float:
    """The FID floor at n_gen samples; fewer draws at Inception size (each costs two eigh, about
    a minute at 2048 dimensions on two cores). It depends only on the reference statistics and
    n_gen, so with `cache_dir` it is computed once per protocol and kept in
    `cache_dir/fid_floor/<hash of the statistics, n_gen, draws>.json`."""
    import hashlib
    import json

    from engine.atomic_files import write_text

    draws = 20 if ref.mu.shape[0] <= 512 else 5
    if cache_dir is None:
        return gaussian_floor(ref, n_gen, draws=draws)[0]
    digest = hashlib.sha256()
    for part in (np.ascontiguousarray(ref.mu, dtype=np.float64), np.ascontiguousarray(ref.sigma, dtype=np.float64)):
        digest.update(part.tobytes())
    digest.update(f"{ref.n}|{n_gen}|{draws}".encode())
    path = Path(cache_dir) / "fid_floor" / f"{digest.hexdigest()[:32]}.json"
    try:
        return float(json.loads(path.read_text())["floor"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable: computed again
    floor = gaussian_floor(ref, n_gen, draws=draws)[0]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps({"floor": floor, "n_gen": n_gen, "draws": draws}))
    except OSError:
        pass  # a cache that cannot be written costs time, not correctness
    return floor


class Evaluator:
    def __init__(self, features, reference: Reference, clip=None, cache_dir: Path | None = None):
        self.features, self.reference, self.clip, self.cache_dir = features, reference, clip, cache_dir

    @classmethod
    def from_config(cls, config: dict, device: torch.device, cache_dir: Path) -> "Evaluator":
        """Feature model, reference and CLIP model of a run config (`Experiment.run_config`)."""
        from engine.metrics.features import load_feature_model

        features = load_feature_model(config["feature_model"], device)
        reference = load_reference(config.get("reference"), features, Path(cache_dir))
        clip = None
        spec = config.get("clip") or {}
        if spec.get("model"):
            from engine.metrics.clip_score import ClipScorer

            clip = ClipScorer.load(spec["model"], spec.get("weights"), device)
        return cls(features, reference, clip, Path(cache_dir))

    def evaluate(self, images: torch.Tensor, prompts: list[str], labels: list[int] | None, folder: Path,
                 n_boot: int, seed: int) -> dict[str, float]:
        """Metrics of the samples; writes `eval.npz` into `folder`."""
        feats, preds = self.features.extract(images)
        feats = feats.astype(np.float32).astype(np.float64)  # what eval.npz keeps
        if n_boot > 0:
            fid, low, high = fid_bootstrap(feats, self.reference.stats, n_boot=n_boot, seed=seed)
        else:
            fid = low = high = frechet_distance(feature_stats(feats), self.reference.stats)
        metrics = {"fid": fid, "fid_ci_low": low, "fid_ci_high": high}
        metrics["fid_floor"] = run_floor(self.reference.stats, len(feats), self.cache_dir)
        ref_features = getattr(self.reference, "features", None)
        if ref_features is not None:
            metrics.update(zip(("kid", "kid_ci_low", "kid_ci_high"), kid(feats, ref_features)))
        label_array = np.asarray(labels, dtype=np.int64) if labels is not None else None
        if preds is not None and label_array is not None:
            metrics["prompt_acc"] = float((preds == label_array).mean())
        clip = None
        if self.clip is not None:
            clip = self.clip.scores(images, prompts).astype(np.float32)
            mean, c_low, c_high = mean_with_interval(clip, n_boot, seed)
            metrics.update(clip_score=mean, clip_score_ci_low=c_low, clip_score_ci_high=c_high)
        ref_path = self.reference.path
        if ref_path is not None:
            ref_path = Path(os.path.relpath(Path(ref_path).resolve(), Path(folder).resolve()))
        save_eval(folder, {
            "features": feats.astype(np.float32),
            "labels": label_array,
            "preds": None if preds is None else np.asarray(preds, dtype=np.int64),
            "clip": clip,
            "prompts": np.asarray(prompts, dtype=np.str_),
            "feature_model": np.asarray(self.features.id),
            "clip_model": np.asarray(self.clip.model_id if self.clip is not None else ""),
            "reference": np.asarray(self.reference.id),
            "reference_stats": np.asarray(str(ref_path) if ref_path is not None else ""),
            "seed": np.int64(seed),
            "version": np.int64(EVAL_VERSION),
        })
        return metrics
