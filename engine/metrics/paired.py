"""Paired bootstrap of the difference between two runs' metrics on the same samples.

Every variant of a protocol is sampled with the same prompts and the same initial noise, so
sample i of run a and sample i of run b answer the same question. Resampling the sample
indices once and applying the same indices to both runs keeps that pairing: the common part
of the two runs' sampling noise cancels in the difference, and the interval of the difference
is much narrower than the two runs' own intervals suggest (issue 9: fp 12.99 [10.05, 18.19]
and D 13.51 [10.52, 18.56] overlap, while FID(fp) - FID(D) = -0.53 [-0.95, -0.04]).

    diff = metric(a) - metric(b)                    on all n samples
    boot_k = metric(a[idx_k]) - metric(b[idx_k])    idx_k: n indices drawn with replacement
    interval = percentiles (2.5, 97.5) of boot_k    (FID: shifted by diff - median(boot_k))

- Mean metrics (`clip_score`, `prompt_acc`): the mean of per-sample values; the percentile
  interval of the paired mean difference (its coverage is checked by simulation in
  tests/test_paired.py).
- FID: the distance of each run's resampled features to the same fixed reference statistics
  (`engine/metrics/fid.py`'s fast core with one precomputed reference square root). FID is
  biased upwards at finite n and a resample is noisier than the sample, so the resampled
  differences are centred on the point estimate as `fid_bootstrap` does for one run.

A verdict reads the interval with the metric's direction: lower FID / KID is better, higher
CLIP score / prompt accuracy is better. An interval that contains 0 gives "no significant
difference" (at 95%). Numpy and scipy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.metrics.fid import FeatureStats, _blas_threads_for, _fast_distance, _psd_sqrt, feature_stats

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


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] sample indices drawn with replacement (seeded: reproducible)."""
    if n < 2 or n_boot < 1:
        raise ValueError(f"need n >= 2 samples and n_boot >= 1, got n={n}, n_boot={n_boot}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _interval(point: float, boots: np.ndarray, alpha: float, centre: bool) -> tuple[float, float]:
    if centre:
        boots = boots + (point - np.median(boots))
    low, high = np.percentile(boots, [50.0 * alpha, 100.0 - 50.0 * alpha])
    return float(low), float(high)


def paired_mean(metric: str, a: np.ndarray, b: np.ndarray, idx: np.ndarray, alpha: float = 0.05) -> PairedDiff:
    """Difference of the means of per-sample values a[i] and b[i] (paired by sample i)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"{metric}: per-sample values must be two [n] arrays, got {a.shape} and {b.shape}")
    d = a - b
    boots = d[idx].mean(axis=1)
    low, high = _interval(float(d.mean()), boots, alpha, centre=False)
    return PairedDiff(metric, float(d.mean()), low, high, len(d), len(idx))


def resampled_stats(x: np.ndarray, counts: np.ndarray) -> FeatureStats:
    """Mean and covariance of the resample with `counts[i]` copies of row i: the same numbers
    as `feature_stats(x[idx])`, from the distinct rows only (about 63% of them)."""
    n = int(counts.sum())
    keep = counts > 0
    w = counts[keep].astype(np.float64)
    rows = x[keep]
    mu = (w @ rows) / n
    centred = rows - mu
    sigma = (centred * w[:, None]).T @ centred / (n - 1)
    return FeatureStats(mu=mu, sigma=sigma, n=n)


class FidAgainstReference:
    """FID of feature sets against fixed reference statistics, with the reference's square root
    computed once (the fast core of engine/metrics/fid.py)."""

    def __init__(self, ref: FeatureStats):
        self.ref = ref
        self.mu = np.asarray(ref.mu, dtype=np.float64)
        with _blas_threads_for(self.mu.shape[0]):
            self.sqrt = _psd_sqrt(np.asarray(ref.sigma, dtype=np.float64))
        self.trace = float(np.trace(ref.sigma))

    def of_stats(self, st: FeatureStats) -> float:
        with _blas_threads_for(self.mu.shape[0]):
            return _fast_distance(st, self.mu, self.sqrt, self.trace)

    def of_resample(self, x: np.ndarray, idx: np.ndarray) -> float:
        return self.of_stats(resampled_stats(x, np.bincount(idx, minlength=x.shape[0])))


def paired_fid(a: np.ndarray, b: np.ndarray, ref: FeatureStats, idx: np.ndarray, alpha: float = 0.05,
               reference: FidAgainstReference | None = None) -> PairedDiff:
    """FID(a) - FID(b) against the same reference, paired bootstrap over the shared indices.

    Every FID here (point and resamples) comes from the fast core; it equals `frechet_distance`
    (pytorch-fid's sqrtm) to round-off, checked to 1e-6 relative by tests and bench_paired.py."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"fid: features must be two [n, d] arrays of one shape, got {a.shape} and {b.shape}")
    core = reference or FidAgainstReference(ref)
    point = core.of_stats(feature_stats(a)) - core.of_stats(feature_stats(b))
    same = np.array_equal(a, b)
    boots = np.zeros(len(idx))
    if not same:  # identical features: every resampled difference is exactly 0
        for k, row in enumerate(idx):
            boots[k] = core.of_resample(a, row) - core.of_resample(b, row)
    low, high = _interval(point, boots, alpha, centre=True)
    return PairedDiff("fid", point, low, high, a.shape[0], len(idx))
