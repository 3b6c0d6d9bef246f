"""The evaluation protocol shared by every variant: FID with a bootstrap interval and
prompt accuracy, both from the digits classifier (features and predictions)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from engine.metrics.fid import FeatureStats, feature_stats, fid_bootstrap
from engine.metrics.floor import gaussian_floor
from engine.metrics.kid import kid


@torch.no_grad()
def classify(classifier: nn.Module, images: torch.Tensor, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features [N, d] (float64) and predicted classes [N] of images in [-1, 1]."""
    device = next(classifier.parameters()).device
    feats, preds = [], []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        f = classifier.features(x)
        feats.append(f.double().cpu())
        preds.append(classifier.head(f).argmax(1).cpu())
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


def reference_stats(classifier: nn.Module, real_images: torch.Tensor, n_gen: int | None = None
                    ) -> tuple[FeatureStats, float, np.ndarray]:
    """Statistics of the real data, the FID floor at n_gen generated samples (a perfect
    generator's expected FID, engine/metrics/floor.py) and the real features (for KID)."""
    feats, _ = classify(classifier, real_images)
    stats = feature_stats(feats)
    return stats, gaussian_floor(stats, n_gen or len(feats))[0], feats


def evaluate_samples(
    classifier: nn.Module,
    images: torch.Tensor,
    labels: list[int],
    ref: FeatureStats,
    n_boot: int,
    seed: int,
    ref_features: np.ndarray | None = None,
    save_to=None,
) -> dict[str, float]:
    """Metrics of one run; `ref_features` adds KID, `save_to` (a run folder) keeps the
    per-sample data for paired comparisons (engine/paired_runs.py)."""
    feats, preds = classify(classifier, images)
    extra = {}
    if ref_features is not None:
        extra = dict(zip(("kid", "kid_ci_low", "kid_ci_high"), kid(feats, ref_features)))
    if save_to is not None:
        from engine.paired_runs import EVAL_FILE, save_eval_data

        save_eval_data(save_to / EVAL_FILE, feats, labels, preds, ref)
    if n_boot > 0:
        fid, low, high = fid_bootstrap(feats, ref, n_boot=n_boot, seed=seed)
    else:
        from engine.metrics.fid import frechet_distance

        fid = low = high = frechet_distance(feature_stats(feats), ref)
    return {
        "fid": fid,
        "fid_ci_low": low,
        "fid_ci_high": high,
        "prompt_acc": float((preds == np.asarray(labels)).mean()),
        **extra,
    }
