"""FID: agreement with pytorch-fid, analytic cases, bootstrap interval and split-half floor."""

from __future__ import annotations

import numpy as np
import pytest
from pytorch_fid.fid_score import calculate_frechet_distance as reference_fd
from threadpoolctl import threadpool_info

from engine.metrics.fid import (
    FeatureStats,
    _fast_distance,
    _psd_sqrt,
    feature_stats,
    fid,
    fid_bootstrap,
    frechet_distance,
    split_half_floor,
)

# pytorch-fid 0.3.0 calls scipy's sqrtm(disp=False), deprecated since scipy 1.16; it also prints
# a message when it adds eps. Neither matters here.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _gaussian(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    """Correlated Gaussian features: a random linear map of white noise, plus a mean shift."""
    mix = np.eye(d) + 0.3 * rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ mix + shift


def _reference(a: FeatureStats, b: FeatureStats) -> float:
    return float(reference_fd(a.mu, a.sigma, b.mu, b.sigma))


def test_feature_stats_is_float64_mean_and_unbiased_covariance() -> None:
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    st = feature_stats(x)
    x64 = x.astype(np.float64)
    centred = x64 - x64.mean(axis=0)
    assert st.n == 50 and st.mu.dtype == np.float64 and st.sigma.shape == (4, 4)
    np.testing.assert_allclose(st.mu, x64.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(st.sigma, centred.T @ centred / 49, rtol=1e-12)


@pytest.mark.parametrize(("n", "d"), [(300, 16), (400, 64), (40, 64)], ids=["d16", "d64", "singular-n<d"])
def test_matches_pytorch_fid(n: int, d: int) -> None:
    rng = np.random.default_rng(d + n)
    a, b = feature_stats(_gaussian(rng, n, d)), feature_stats(_gaussian(rng, n, d, shift=0.2))
    if n < d:
        assert np.linalg.matrix_rank(a.sigma) < d
    assert frechet_distance(a, b) == pytest.approx(_reference(a, b), rel=1e-6)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning", "ignore::RuntimeWarning")
def test_matches_pytorch_fid_on_the_eps_branch() -> None:
    # sqrtm of a nonzero nilpotent matrix is infinite, so both implementations must add eps * I.
    a = FeatureStats(mu=np.zeros(2), sigma=np.array([[0.0, 1.0], [0.0, 0.0]]), n=2)
    b = FeatureStats(mu=np.ones(2), sigma=np.eye(2), n=2)
    assert frechet_distance(a, b) == pytest.approx(_reference(a, b), rel=1e-6)


def test_large_imaginary_component_raises_like_pytorch_fid() -> None:
    # sqrtm(diag(-1, 1)) = diag(i, 1): not a covariance product, rejected by both.
    a = FeatureStats(mu=np.zeros(2), sigma=np.diag([-1.0, 1.0]), n=2)
    b = FeatureStats(mu=np.zeros(2), sigma=np.eye(2), n=2)
    with pytest.raises(ValueError):
        _reference(a, b)
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(a, b)


def test_identical_sets_give_zero() -> None:
    # Exact value 0; what remains is sqrtm(S @ S) round-off, ~1e-15 relative to Tr(S) for this
    # well-conditioned S, so 1e-9 * Tr(S) leaves a wide margin yet catches any real error.
    x = _gaussian(np.random.default_rng(1), 500, 32)
    assert abs(fid(x, x)) < 1e-9 * np.trace(feature_stats(x).sigma)


def test_mean_shift_gives_squared_shift_norm_and_is_monotone() -> None:
    # y = x + s has exactly the covariance of x, so the trace terms cancel: FID = ||s||^2.
    rng = np.random.default_rng(2)
    x = _gaussian(rng, 500, 32)
    direction = rng.standard_normal(32)
    values = []
    for scale in (0.1, 0.3, 1.0, 3.0):
        s = scale * direction
        values.append(fid(x + s, x))
        assert values[-1] == pytest.approx(s @ s, rel=1e-8)
    assert all(lo < hi for lo, hi in zip(values, values[1:]))


def test_diagonal_covariances_match_closed_form() -> None:
    # For diagonal covariances Tr(sqrtm(S1 S2)) = sum sqrt(a_i b_i), so
    # FID = ||mu1 - mu2||^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(3)
    va, vb = rng.uniform(0.5, 2.0, 8), rng.uniform(0.5, 2.0, 8)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
    got = frechet_distance(FeatureStats(mu1, np.diag(va), 100), FeatureStats(mu2, np.diag(vb), 100))
    assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("n_gen", [400, 30], ids=["full-rank", "singular-n<d"])
def test_fast_bootstrap_distance_equals_frechet_distance(n_gen: int) -> None:
    rng = np.random.default_rng(4)
    ref = feature_stats(_gaussian(rng, 600, 48))
    gen = feature_stats(_gaussian(rng, n_gen, 48, shift=0.1))
    fast = _fast_distance(gen, ref.mu, _psd_sqrt(ref.sigma), float(np.trace(ref.sigma)))
    assert fast == pytest.approx(frechet_distance(gen, ref), rel=1e-6)


def test_bootstrap_contains_point_and_is_reproducible() -> None:
    rng = np.random.default_rng(5)
    ref = feature_stats(_gaussian(rng, 2000, 16))
    gen = _gaussian(rng, 500, 16, shift=0.1)
    point, low, high = fid_bootstrap(gen, ref, n_boot=100, seed=7)
    assert point == pytest.approx(frechet_distance(feature_stats(gen), ref), rel=1e-12)
    assert low < point < high
    assert fid_bootstrap(gen, ref, n_boot=100, seed=7) == (point, low, high)
    assert fid_bootstrap(gen, ref, n_boot=100, seed=8) != (point, low, high)


def test_bootstrap_restores_blas_thread_settings() -> None:
    before = [lib["num_threads"] for lib in threadpool_info()]
    rng = np.random.default_rng(9)
    fid_bootstrap(_gaussian(rng, 100, 8), feature_stats(_gaussian(rng, 100, 8)), n_boot=5)
    assert [lib["num_threads"] for lib in threadpool_info()] == before


def test_bootstrap_interval_shrinks_with_more_samples() -> None:
    rng = np.random.default_rng(6)
    ref = feature_stats(_gaussian(rng, 2000, 16))
    widths = []
    for n in (100, 400, 1600):
        _, low, high = fid_bootstrap(_gaussian(rng, n, 16, shift=0.2), ref, n_boot=100)
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2] > 0


def test_bootstrap_width_tracks_true_sampling_spread() -> None:
    # The interval should describe how much FID varies between independent draws of n samples:
    # compare its width with the 2.5-97.5% range of FID over 200 independent draws. Resamples
    # contain duplicates and are a bit noisier, so the bootstrap is somewhat conservative
    # (about 1.2-1.7x in trials); a factor-2 band either way catches a wrong scale.
    rng = np.random.default_rng(7)
    d, n = 8, 300
    ref = feature_stats(_gaussian(rng, 3000, d))
    mix = np.eye(d) + 0.3 * rng.standard_normal((d, d)) / np.sqrt(d)
    draws = [rng.standard_normal((n, d)) @ mix + 0.1 for _ in range(200)]
    true_lo, true_hi = np.percentile([frechet_distance(feature_stats(x), ref) for x in draws], [2.5, 97.5])
    _, low, high = fid_bootstrap(draws[0], ref, n_boot=200)
    assert 0.5 < (high - low) / (true_hi - true_lo) < 2.0


def test_split_half_floor_is_small_and_reproducible() -> None:
    rng = np.random.default_rng(8)
    real = _gaussian(rng, 1000, 16)
    floor = split_half_floor(real, seed=3)
    shifted = fid(_gaussian(rng, 500, 16, shift=0.3), real)  # ||shift||^2 = 1.44 plus the floor
    assert 0.0 < floor < 0.25 * shifted
    assert split_half_floor(real, seed=3) == floor
