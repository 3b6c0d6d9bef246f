"""The FID floor is computed once per protocol: cached by the reference statistics, the sample
count and the draws, and the cached value is the computed one."""

from __future__ import annotations

import numpy as np
import pytest

from engine import evaluate
from engine.metrics.fid import FeatureStats


def _ref(seed: int) -> FeatureStats:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, 8))
    return FeatureStats(mu=x.mean(0), sigma=np.cov(x, rowvar=False), n=200)


def test_the_floor_is_cached_per_reference_and_sample_count(tmp_path, monkeypatch):
    ref = _ref(0)
    direct = evaluate.run_floor(ref, 50)
    cached = evaluate.run_floor(ref, 50, tmp_path)
    assert cached == direct and len(list((tmp_path / "fid_floor").iterdir())) == 1

    def refuse(*a, **k):
        raise AssertionError("computed again")

    monkeypatch.setattr(evaluate, "gaussian_floor", refuse)
    assert evaluate.run_floor(ref, 50, tmp_path) == direct  # read back, not computed
    with pytest.raises(AssertionError, match="computed again"):
        evaluate.run_floor(ref, 60, tmp_path)  # another sample count: its own entry
    with pytest.raises(AssertionError, match="computed again"):
        evaluate.run_floor(_ref(1), 50, tmp_path)  # other statistics: their own entry


def test_an_unreadable_cache_entry_is_computed_again(tmp_path):
    ref = _ref(0)
    evaluate.run_floor(ref, 50, tmp_path)
    entry = next((tmp_path / "fid_floor").iterdir())
    entry.write_text("{not json")
    assert evaluate.run_floor(ref, 50, tmp_path) == evaluate.run_floor(ref, 50)
