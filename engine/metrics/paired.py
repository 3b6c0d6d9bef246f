"""Paired bootstrap of the difference between two runs' metrics on the same samples.

Every variant of a protocol is sampled with the same prompts and the same initial noise, so
sample i of run a and sample i of run b answer the same question. Resampling the sample
indices once and applying the same indices to both runs keeps that pairing: the common part
of the two runs' sampling noise cancels in the difference, and the interval of the difference
is much narrower than the two runs' own intervals suggest (issue 9: fp 12.99 [10.05, 18.19]
and D 13.51 [10.52, 18.56] overlap, while FID(fp) - FID(D) = -0.53 [-0.95, -0.04]).

    diff = metric(a) - metric(b)                    on all n samples
    boot_k = metric(a[idx_k]) - metric(b[idx_k])    idx_k: n indices drawn with replacement
                                                    (`bootstrap_counts`: a run's own resamples)
    interval = percentiles (2.5, 97.5) of boot_k    (FID: shifted by diff - median(boot_k))

- Mean metrics (`clip_score`, `prompt_acc`): the mean of per-sample values; the percentile
  interval of the paired mean difference (its coverage is checked by simulation in
  tests/test_paired.py).
- FID: the distance of each run's resampled features to the same fixed reference statistics
  (`engine/metrics/fid.py`'s `ResampledFID`, one precomputed reference square root). FID is
  biased upwards at finite n and a resample is noisier than the sample, so the resampled
  differences are centred on the point estimate as `fid_bootstrap` does for one run.

A verdict reads the interval with the metric's direction: lower FID / KID is better, higher
CLIP score / prompt accuracy is better. An interval that contains 0 gives "no significant
difference" (at 95%). Numpy and scipy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.metrics.fid import FeatureStats, ReferenceSqrt, ResampledFID, _blas_threads_for, bootstrap_counts

LOWER_IS_BETTER = {"fid": True, "kid": True, "clip_score": False, "prompt_acc": False}
BETTER, WORSE, SAME = "better", "worse", "no significant difference"


@dataclass(frozen=True)
class PairedDiff:
    metric: str
    diff: float  # metric(a) - metric(b)
    low: float
    high: float
    n: int
    n_boot: int

    @property
    def verdict(self) -> str:
        """Is a better or worse than b (significant at 95%), or neither."""
        return verdict(self.metric, self.low, self.high)


def verdict(metric: str, low: float, high: float) -> str:
    if low <= 0.0 <= high:
        return SAME
    a_lower = high < 0.0
    return BETTER if a_lower == LOWER_IS_BETTER.get(metric, True) else WORSE


def bootstrap_resamples(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] counts (how often each sample is drawn): `engine.metrics.fid.bootstrap_counts`,
    the very resamples a run's own FID and CLIP intervals use for this seed."""
    if n < 2 or n_boot < 1:
        raise ValueError(f"need n >= 2 samples and n_boot >= 1, got n={n}, n_boot={n_boot}")
    return np.stack(list(bootstrap_counts(n, n_boot, seed)))


def _interval(point: float, boots: np.ndarray, alpha: float, centre: bool) -> tuple[float, float]:
    if centre:
        boots = boots + (point - np.median(boots))
    low, high = np.percentile(boots, [50.0 * alpha, 100.0 - 50.0 * alpha])
    return float(low), float(high)


def paired_mean(metric: str, a: np.ndarray, b: np.ndarray, counts: np.ndarray, alpha: float = 0.05) -> PairedDiff:
    """Difference of the means of per-sample values a[i] and b[i] (paired by sample i)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"{metric}: per-sample values must be two [n] arrays, got {a.shape} and {b.shape}")
    d = a - b
    boots = counts @ d / len(d)
    low, high = _interval(float(d.mean()), boots, alpha, centre=False)
    return PairedDiff(metric, float(d.mean()), low, high, len(d), len(counts))


def paired_fid(a: np.ndarray, b: np.ndarray, ref: FeatureStats, counts: np.ndarray, alpha: float = 0.05) -> PairedDiff:
    """FID(a) - FID(b) against the same reference, paired bootstrap over the shared resamples.

    Every FID here (point and resamples) comes from `ResampledFID`, the fast core of
    engine/metrics/fid.py; it equals `frechet_distance` (pytorch-fid's sqrtm) to round-off,
    checked to 1e-6 relative by tests/test_paired.py and bench/bench_paired.py."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"fid: features must be two [n, d] arrays of one shape, got {a.shape} and {b.shape}")
    n = a.shape[0]
    with _blas_threads_for(a.shape[1]):
        root = ReferenceSqrt.of(ref)
        fa, fb = ResampledFID(a, root), ResampledFID(b, root)
        ones = np.ones(n, dtype=np.int64)
        point = fa(ones) - fb(ones)
        if np.array_equal(a, b):  # identical features: every resampled difference is exactly 0
            boots = np.zeros(len(counts))
        else:
            boots = np.array([fa(c) - fb(c) for c in counts])
    low, high = _interval(point, boots, alpha, centre=True)
    return PairedDiff("fid", point, low, high, n, len(counts))
