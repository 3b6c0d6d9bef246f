"""Frechet Inception Distance (FID) on precomputed feature vectors.

The distance between two Gaussians fitted to feature sets,

    FID = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2)),

is computed the way pytorch-fid's `calculate_frechet_distance` computes it, so numbers are
comparable with published FIDs given the same features. This module only needs numpy and
scipy (no torch), so the TUI and tests can use it cheaply; extracting Inception features is
someone else's job.

Bootstrap intervals use an equivalent, faster form of the trace term because 200 general
`sqrtm` calls take seconds at 128 dimensions and hours at 2048: `ResampledFID` computes the FID
of any weighted resample of one feature set from the reference's precomputed square root (one
Gram matrix and one symmetric eigenvalue problem per resample); paired comparisons reuse it.

For small matrices BLAS runs single-threaded here (threadpoolctl, a scikit-learn dependency):
on a loaded 2-core machine multi-threaded OpenBLAS made one 128-d `sqrtm` take ~1 s instead
of ~10 ms, and a 200-resample bootstrap ~16 s instead of ~0.5 s.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np
from scipy import linalg
from threadpoolctl import ThreadpoolController

# pytorch-fid accepts a complex sqrtm result when the imaginary part of its diagonal is below this.
_IMAG_ATOL = 1e-3
# Up to this dimension BLAS runs single-threaded: on the loaded 2-core dev box one sqrtm +
# eigvalsh took 0.10 s vs 2.4 s (d=256) and 0.36 s vs 13.6 s (d=512) single vs multi-threaded.
_SINGLE_THREAD_MAX_DIM = 512
# Above this dimension the point estimate also uses the eigenvalue form (scipy's sqrtm takes
# about 17 s at d = 2048); bench/bench_fid.py checks both agree with pytorch-fid to 1e-6.
_SQRTM_MAX_DIM = 512


@dataclass
class FeatureStats:
    """Gaussian summary of a feature set: mean [d], covariance [d, d], sample count."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int


def feature_stats(features: np.ndarray) -> FeatureStats:
    """Mean and (unbiased, n-1) covariance of `features` [n, d] in float64, as pytorch-fid."""
    x = _as_features(features)
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors, got {x.shape[0]}")
    return FeatureStats(mu=x.mean(axis=0), sigma=np.atleast_2d(np.cov(x, rowvar=False)), n=x.shape[0])


def frechet_distance(a: FeatureStats, b: FeatureStats, eps: float = 1e-6) -> float:
    """Frechet distance between N(a.mu, a.sigma) and N(b.mu, b.sigma), as pytorch-fid.

    If sqrtm of the covariance product is not finite (singular product), eps * I is added to
    both covariances and the square root recomputed. A complex result whose diagonal has an
    imaginary part above 1e-3 raises ValueError; otherwise the real part is used.
    """
    mu1, mu2 = np.atleast_1d(a.mu).astype(np.float64), np.atleast_1d(b.mu).astype(np.float64)
    s1, s2 = np.atleast_2d(a.sigma).astype(np.float64), np.atleast_2d(b.sigma).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")

    with _blas_threads_for(s1.shape[0]):
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=_IMAG_ATOL):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(S1 S2)")
        covmean = covmean.real

    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid(gen_features: np.ndarray, ref_features: np.ndarray) -> float:
    """FID between two feature sets [n1, d] and [n2, d]."""
    return frechet_distance(feature_stats(gen_features), feature_stats(ref_features))


def fid_bootstrap(
    gen_features: np.ndarray,
    ref_stats: FeatureStats,
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """(fid, ci_low, ci_high) for generated features against fixed reference statistics.

    `fid` is the point estimate on all generated features (`frechet_distance`; above 512
    dimensions its equal eigenvalue form, see `ResampledFID`). The
    reference statistics are fixed; the generated features are resampled with replacement
    `n_boot` times (RNG seeded with `seed`, so the result is reproducible) and the interval
    is the (alpha/2, 1 - alpha/2) percentile interval of the resampled FIDs, shifted by
    `fid - median(resampled FIDs)` so that it is centred on the point estimate.

    Why the shift: FID is biased upwards at finite sample size, and a resample (about 63%
    distinct points) is noisier than the original, so every resampled FID lies above the
    point estimate and the plain percentile interval excludes it. The spread of the
    resampled FIDs is still a (slightly conservative) estimate of the sampling spread of
    FID at this sample size, which is what the interval reports. It says nothing about the
    finite-sample bias itself; compare against `split_half_floor` for that.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    x = _as_features(gen_features)
    n = x.shape[0]
    with _blas_threads_for(x.shape[1]):
        resampled = ResampledFID(x, ReferenceSqrt.of(ref_stats))
        if x.shape[1] <= _SQRTM_MAX_DIM:
            point = frechet_distance(feature_stats(x), ref_stats)
        else:
            point = resampled(np.ones(n, dtype=np.int64))
        boots = np.array([resampled(counts) for counts in bootstrap_counts(n, n_boot, seed)])
    boots += point - np.median(boots)
    low, high = np.percentile(boots, [50.0 * alpha, 100.0 - 50.0 * alpha])
    return point, float(low), float(high)


def bootstrap_counts(n: int, n_boot: int, seed: int):
    """The bootstrap resamples of n samples as counts [n] (how often each sample is drawn):
    n draws with replacement each, from numpy's default_rng(seed). Every metric of a run, and
    both runs of a paired comparison, use these same resamples for a given seed."""
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield np.bincount(rng.integers(0, n, size=n), minlength=n)


@dataclass
class ReferenceSqrt:
    """Reference statistics prepared once for many fast distances: mean, the symmetric PSD
    square root of the covariance, and its trace."""

    mu: np.ndarray
    sqrt: np.ndarray
    trace: float

    @classmethod
    def of(cls, stats: FeatureStats) -> "ReferenceSqrt":
        sigma = np.asarray(stats.sigma, dtype=np.float64)
        return cls(mu=np.asarray(stats.mu, dtype=np.float64), sqrt=_psd_sqrt(sigma), trace=float(np.trace(sigma)))


class ResampledFID:
    """FID of weighted resamples of one feature set [n, d] against fixed reference statistics:
    the core of bootstrap intervals and of paired comparisons (same counts for both runs).

    `self(counts)` is the FID of the multiset holding row i `counts[i]` times (a bootstrap
    resample is `np.bincount(indices, minlength=n)`), equal to `frechet_distance` on those rows
    up to round-off. With ref = R^(1/2) R^(1/2) precomputed and Z = X R^(1/2) computed once here,
    a resample costs one Gram matrix of its distinct rows of Z (a BLAS syrk) and one symmetric
    eigenvalue problem: Tr sqrtm(S R) = sum sqrt(eig(R^(1/2) S R^(1/2))).
    """

    def __init__(self, features: np.ndarray, ref: ReferenceSqrt):
        self.x = _as_features(features)
        if self.x.shape[1] != ref.mu.shape[0]:
            raise ValueError(f"features have dimension {self.x.shape[1]}, the reference {ref.mu.shape[0]}")
        self.ref = ref
        self.z = self.x @ ref.sqrt

    def __call__(self, counts: np.ndarray) -> float:
        from scipy.linalg.blas import dsyrk

        counts = np.asarray(counts)
        if counts.shape != (self.x.shape[0],):
            raise ValueError(f"counts must have shape ({self.x.shape[0]},), got {counts.shape}")
        idx = np.flatnonzero(counts)
        w = counts[idx].astype(np.float64)
        n = w.sum()
        x = self.x[idx]
        mu = (w @ x) / n
        centred = x - mu
        trace = float(w @ np.einsum("ij,ij->i", centred, centred)) / (n - 1)
        zc = (self.z[idx] - mu @ self.ref.sqrt) * np.sqrt(w)[:, None]
        # zc.T is Fortran-ordered: syrk reads it without a copy and returns zc.T @ zc (lower half)
        gram = dsyrk(1.0 / (n - 1), zc.T, trans=0, lower=1)
        eig = linalg.eigh(gram, lower=True, eigvals_only=True, overwrite_a=True, check_finite=False)
        diff = mu - self.ref.mu
        return float(diff @ diff + trace + self.ref.trace - 2.0 * np.sqrt(np.clip(eig, 0.0, None)).sum())


def split_half_floor(ref_features: np.ndarray, seed: int = 0) -> float:
    """FID between two random disjoint halves of the real features.

    This is what a perfect generator (sampling the real distribution) would score with
    n/2 samples on each side; the floor for the full n is somewhat lower because FID's
    bias shrinks roughly as 1/n.
    """
    x = _as_features(ref_features)
    if x.shape[0] < 4:
        raise ValueError(f"need at least 4 feature vectors to split, got {x.shape[0]}")
    perm = np.random.default_rng(seed).permutation(x.shape[0])
    half = x.shape[0] // 2
    return fid(x[perm[:half]], x[perm[half : 2 * half]])


def _as_features(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be [n, d], got shape {x.shape}")
    return x


@functools.cache
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()  # inspecting the loaded BLAS libraries costs ~1 ms: do it once


def _blas_threads_for(d: int) -> contextlib.AbstractContextManager[object]:
    """Single-threaded BLAS for d x d work when d is small, otherwise leave BLAS alone."""
    if d <= _SINGLE_THREAD_MAX_DIM:
        return _blas_controller().limit(limits=1, user_api="blas")
    return contextlib.nullcontext()


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(sigma: np.ndarray, ref_sqrt: np.ndarray) -> float:
    """Tr(sqrtm(sigma @ ref)) for PSD sigma and ref = ref_sqrt @ ref_sqrt.

    sigma @ ref has the same eigenvalues as ref_sqrt @ sigma @ ref_sqrt, which is symmetric
    PSD, so the trace of the principal square root is the sum of the square roots of its
    eigenvalues: one `eigvalsh` instead of a general Schur-based `sqrtm`.
    """
    m = ref_sqrt @ sigma @ ref_sqrt
    w = np.linalg.eigvalsh((m + m.T) / 2.0)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def _fast_distance(st: FeatureStats, ref_mu: np.ndarray, ref_sqrt: np.ndarray, ref_trace: float) -> float:
    """Frechet distance via `_trace_sqrt_product`; equal to `frechet_distance` up to round-off."""
    diff = st.mu - ref_mu
    return float(diff @ diff + np.trace(st.sigma) + ref_trace - 2.0 * _trace_sqrt_product(st.sigma, ref_sqrt))
