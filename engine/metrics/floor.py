"""The FID floor at a run's own sample count: the FID a perfect generator would score.

A generator that samples the real distribution exactly still scores FID > 0 with n_gen
samples against n_ref reference samples, because both covariances are estimated. That floor
depends on n_gen (FID's bias shrinks roughly as 1/n), so it is computed at the run's own
count: `gaussian_floor` draws n_gen and n_ref vectors from the Gaussian fitted to the real
features (the model FID itself assumes), computes their FID, and averages `draws` such pairs
(it returns the mean and the standard deviation over draws). The reference statistics of the
real data are used as they are; only their Gaussian summary is needed, so this works for any
feature model. Numpy and scipy only.
"""

from __future__ import annotations

import numpy as np

from engine.metrics.fid import FeatureStats, _blas_threads_for, _fast_distance, _psd_sqrt, feature_stats


def gaussian_floor(ref: FeatureStats, n_gen: int, n_ref: int | None = None, draws: int = 20,
                   seed: int = 0) -> tuple[float, float]:
    """(mean, sd) over `draws` of FID(n_gen draws, n_ref draws) from N(ref.mu, ref.sigma).

    Statistics read from a pytorch-fid `.npz` carry no sample count (n_ref = 0): the n_gen draws
    are then compared with the reference statistics themselves, as if they were exact, which is
    how the run's own FID treats them."""
    n_ref = ref.n if n_ref is None else n_ref
    if n_gen < 2 or n_ref == 1 or n_ref < 0 or draws < 1:
        raise ValueError(f"need n_gen >= 2, n_ref >= 2 (or 0: exact statistics) and draws >= 1, "
                         f"got {n_gen}, {n_ref}, {draws}")
    mu = np.asarray(ref.mu, dtype=np.float64)
    d = mu.shape[0]
    rng = np.random.default_rng(seed)
    values = np.empty(draws)
    with _blas_threads_for(d):
        root = _psd_sqrt(np.asarray(ref.sigma, dtype=np.float64))
        exact = (mu, root, float(np.trace(ref.sigma)))
        for k in range(draws):
            gen = feature_stats(mu + rng.standard_normal((n_gen, d)) @ root)
            if n_ref == 0:
                values[k] = _fast_distance(gen, *exact)
                continue
            other = feature_stats(mu + rng.standard_normal((n_ref, d)) @ root)
            values[k] = _fast_distance(gen, other.mu, _psd_sqrt(other.sigma), float(np.trace(other.sigma)))
    return float(values.mean()), float(values.std(ddof=1)) if draws > 1 else 0.0
