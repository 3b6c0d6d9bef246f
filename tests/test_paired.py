"""Paired bootstrap, KID and the FID floor on synthetic features (numpy only, fast)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.metrics.fid import feature_stats, frechet_distance
from engine.metrics.floor import gaussian_floor
from engine.metrics.kid import kid
from engine.metrics.fid import ReferenceSqrt, ResampledFID
from engine.metrics.paired import BETTER, SAME, WORSE, bootstrap_resamples, paired_fid, paired_mean, verdict

D = 8


def features(n, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, D)) @ np.diag(np.linspace(0.5, 2.0, D)) + shift


def test_identical_sets_give_zero_and_a_zero_interval():
    ref = feature_stats(features(400, 0))
    a = features(200, 1)
    idx = bootstrap_resamples(200, 50, seed=3)
    r = paired_fid(a, a.copy(), ref, idx)
    assert (r.diff, r.low, r.high) == (0.0, 0.0, 0.0) and r.verdict == SAME
    m = paired_mean("clip_score", a[:, 0], a[:, 0].copy(), idx)
    assert (m.diff, m.low, m.high) == (0.0, 0.0, 0.0)


def test_a_shifted_set_is_worse_and_its_interval_excludes_zero():
    ref = feature_stats(features(1000, 0))
    base = features(300, 1)
    shifted = base + 0.3  # the same samples, moved away from the reference
    idx = bootstrap_resamples(300, 100, seed=0)
    r = paired_fid(shifted, base, ref, idx)
    direct = frechet_distance(feature_stats(shifted), ref) - frechet_distance(feature_stats(base), ref)
    assert r.diff == pytest.approx(direct, rel=1e-9)
    assert 0 < r.low <= r.diff <= r.high and r.verdict == WORSE
    assert paired_fid(base, shifted, ref, idx).verdict == BETTER


def test_a_resample_equals_the_direct_computation():
    ref = feature_stats(features(500, 0))
    x = features(120, 2)
    counts = bootstrap_resamples(120, 1, seed=9)[0]
    fast = ResampledFID(x, ReferenceSqrt.of(ref))(counts)
    rows = np.repeat(np.arange(120), counts)
    assert fast == pytest.approx(frechet_distance(feature_stats(x[rows]), ref), rel=1e-9)


def test_paired_interval_covers_the_true_difference_95_percent_of_the_time():
    """The difference of the means of paired per-sample scores (true difference 0.2, per-sample
    scores skewed and correlated across the two runs): the interval covers 0.2 in ~95% of
    400 simulated experiments."""
    rng = np.random.default_rng(0)
    true, n, hits, sims = 0.2, 150, 0, 400
    for s in range(sims):
        shared = rng.exponential(1.0, n)  # the prompt/noise effect both runs share
        b = shared + rng.normal(0, 0.5, n)
        a = shared + true + rng.normal(0, 0.5, n)
        r = paired_mean("clip_score", a, b, bootstrap_resamples(n, 300, seed=s))
        hits += r.low <= true <= r.high
    assert 0.91 <= hits / sims <= 0.98, hits / sims


def test_verdicts_follow_each_metrics_direction():
    assert verdict("fid", -2, -1) == BETTER and verdict("fid", 1, 2) == WORSE
    assert verdict("clip_score", 1, 2) == BETTER and verdict("prompt_acc", -2, -1) == WORSE
    assert verdict("fid", -1, 1) == SAME and verdict("kid", 0.0, 0.0) == SAME


def direct_kid(x, y):
    k = lambda u, v: (u @ v / x.shape[1] + 1) ** 3
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_kid_equals_the_direct_computation_and_brackets_it():
    x, y = features(30, 1, shift=0.2), features(25, 2)
    value, low, high = kid(x, y)
    assert value == pytest.approx(direct_kid(x, y), rel=1e-10)
    assert low < value < high


def test_kid_is_unbiased_where_fid_is_not():
    """Same distribution at small n: KID averages to ~0 (within its error), FID stays > 0."""
    y = features(400, 0)
    kids = [kid(features(50, s), y)[0] for s in range(1, 41)]
    assert abs(np.mean(kids)) < 3 * np.std(kids) / np.sqrt(len(kids))
    assert frechet_distance(feature_stats(features(50, 1)), feature_stats(y)) > 0.3


def test_floor_at_the_runs_own_sample_count():
    ref = feature_stats(features(1797, 0))
    small, sd_small = gaussian_floor(ref, 100, draws=20)
    large, _ = gaussian_floor(ref, 1000, draws=20)
    trace = float(np.trace(ref.sigma))
    # the mean term alone is tr(S) (1/n_gen + 1/n_ref) in expectation
    assert small > trace * (1 / 100 + 1 / 1797) * 0.8 and small > large > 0 and sd_small > 0
