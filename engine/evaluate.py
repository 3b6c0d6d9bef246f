"""The evaluation protocol shared by every variant: FID with a bootstrap interval and
prompt accuracy, both from the digits classifier (features and predictions)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from engine.metrics.fid import FeatureStats, feature_stats, fid_bootstrap, split_half_floor


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


def reference_stats(classifier: nn.Module, real_images: torch.Tensor) -> tuple[FeatureStats, float]:
    """Statistics of the real data and the floor: FID between two halves of it."""
    feats, _ = classify(classifier, real_images)
    return feature_stats(feats), split_half_floor(feats, seed=0)


def evaluate_samples(
    classifier: nn.Module,
    images: torch.Tensor,
    labels: list[int],
    ref: FeatureStats,
    n_boot: int,
    seed: int,
) -> dict[str, float]:
    feats, preds = classify(classifier, images)
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
    }
