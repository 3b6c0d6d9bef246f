"""Inception FID features and reference statistics against pytorch-fid's own code paths, on a
random-weights file in pytorch-fid's layout (built once per session, see conftest)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from engine.models.inception import WEIGHTS_NAME, InceptionWeightsMissing, load_fid_inception, resolve_weights

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def _write_pngs(folder, n, seed, size=(24, 20)):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def pf_model(inception_home):
    """pytorch-fid's own InceptionV3, loading the weights file itself (found via TORCH_HOME)."""
    from pytorch_fid.inception import InceptionV3

    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(inception_home))
    try:
        model = InceptionV3([3]).eval()
    finally:
        mp.undo()
    return model


@pytest.fixture(scope="module")
def ours(inception_home):
    from engine.metrics.features import load_feature_model

    return load_feature_model({"id": "inception", "path": str(inception_home / "hub" / "checkpoints" / WEIGHTS_NAME)},
                              torch.device("cpu"))


def test_features_equal_pytorch_fids_model_and_preprocessing(pf_model, ours):
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (2, 3, 20, 28), dtype=np.uint8)
    with torch.no_grad():
        expected = pf_model(torch.from_numpy(u8).float() / 255)[0].squeeze(3).squeeze(2).double().numpy()
    got = ours.extract_uint8(u8)
    assert got.shape == (2, 2048)
    np.testing.assert_array_equal(got, expected)
    # the random weights give usable (not vanishing) features
    assert 1e-3 < np.abs(got).mean() < 10
    # float images in [-1, 1]: quantized to PNG levels first, grey repeated to RGB
    grey = torch.from_numpy(u8[:, :1]).float() / 127.5 - 1.0
    np.testing.assert_array_equal(ours.extract(grey)[0], ours.extract_uint8(np.repeat(u8[:, :1], 3, axis=1)))


def test_folder_statistics_equal_pytorch_fids_and_npz_round_trip(tmp_path, pf_model, ours):
    """The project's folder statistics are pytorch-fid's to round-off; `engine stats`' npz reads
    back in pytorch-fid. (With equal statistics, FID is equal: `frechet_distance` is tested
    against `calculate_frechet_distance` in test_fid.py, and its 2048-d fast form in
    bench/bench_fid.py; scipy's sqrtm on 2048-d takes minutes on this machine, too slow here.)"""
    from pytorch_fid.fid_score import compute_statistics_of_path

    from engine.metrics.reference import folder_features, load_stats, save_stats, stats_with_floor

    a = _write_pngs(tmp_path / "a", 3, seed=1)
    (a / "notes.txt").write_text("not an image")
    mu_pf, sigma_pf = compute_statistics_of_path(str(a), pf_model, batch_size=2, dims=2048, device="cpu",
                                                 num_workers=0)
    stats, _ = stats_with_floor(folder_features(a, ours, batch_size=3))
    np.testing.assert_allclose(stats.mu, mu_pf, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(stats.sigma, sigma_pf, rtol=1e-10, atol=1e-15)
    out = save_stats(tmp_path / "a.npz", stats)
    mu_back, sigma_back = compute_statistics_of_path(str(out), pf_model, 2, 2048, "cpu", 0)
    np.testing.assert_array_equal(mu_back, stats.mu)
    np.testing.assert_array_equal(sigma_back, stats.sigma)
    assert np.array_equal(load_stats(out)[0].sigma, sigma_pf) or np.allclose(load_stats(out)[0].sigma, sigma_pf)


def test_folder_reference_is_cached_by_content(tmp_path, ours, monkeypatch):
    from engine.metrics import reference

    folder = _write_pngs(tmp_path / "ref", 3, seed=2, size=(16, 16))
    first = reference.load_reference(str(folder), ours, tmp_path / "cache")
    calls = []
    monkeypatch.setattr(reference, "folder_features", lambda *a, **k: calls.append(1) or np.zeros((3, 2048)))
    again = reference.load_reference(str(folder), ours, tmp_path / "cache")
    assert calls == [] and np.array_equal(first.stats.sigma, again.stats.sigma) and first.id == again.id
    _write_pngs(folder, 1, seed=3, size=(16, 16))  # img00.png changes: recomputed
    changed = reference.load_reference(str(folder), ours, tmp_path / "cache")
    assert calls == [1] and changed.id != first.id


def test_reference_dimension_mismatch_is_a_clear_error(tmp_path, ours):
    from engine.metrics.fid import FeatureStats
    from engine.metrics.reference import ReferenceError, load_reference, save_stats

    path = save_stats(tmp_path / "small.npz", FeatureStats(mu=np.zeros(128), sigma=np.eye(128), n=10))
    with pytest.raises(ReferenceError, match="dimension 128.*2048"):
        load_reference(str(path), ours, tmp_path / "cache")
    with pytest.raises(ReferenceError, match="does not exist"):
        load_reference(str(tmp_path / "missing.npz"), ours, tmp_path / "cache")


def test_missing_weights_fail_fast_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    start = time.perf_counter()
    with pytest.raises(InceptionWeightsMissing) as err:
        load_fid_inception()
    assert time.perf_counter() - start < 2.0
    expected = tmp_path / "empty" / "hub" / "checkpoints" / WEIGHTS_NAME
    assert str(expected) in str(err.value) and "nothing is downloaded" in str(err.value)
    with pytest.raises(InceptionWeightsMissing, match="inception_weights file .*nope.pth does not exist"):
        resolve_weights(tmp_path / "nope.pth")


def test_weights_from_torch_hub_dir_and_bad_file(tmp_path, inception_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(inception_home))
    assert resolve_weights(None) == inception_home / "hub" / "checkpoints" / WEIGHTS_NAME
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not pytorch-fid's Inception weights"):
        load_fid_inception(bad)


def test_image_extensions_are_pytorch_fids():
    from pytorch_fid.fid_score import IMAGE_EXTENSIONS as pf

    from engine.metrics.reference import IMAGE_EXTENSIONS

    assert set(IMAGE_EXTENSIONS) == pf


def test_engine_stats_writes_pytorch_fid_statistics(tmp_path, inception_home, pf_model):
    from pytorch_fid.fid_score import compute_statistics_of_path

    from tests.conftest import engine

    folder = _write_pngs(tmp_path / "imgs", 3, seed=4, size=(16, 16))
    out = tmp_path / "stats.npz"
    env = {"TORCH_HOME": str(inception_home)}
    result = engine("stats", str(folder), "--out", str(out), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    mu, sigma = compute_statistics_of_path(str(out), pf_model, 2, 2048, "cpu", 0)
    mu_pf, sigma_pf = compute_statistics_of_path(str(folder), pf_model, 2, 2048, "cpu", 0)
    np.testing.assert_allclose(mu, mu_pf, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(sigma, sigma_pf, rtol=1e-10, atol=1e-15)
    again = engine("stats", str(folder), "--out", str(out), env=env)
    assert again.returncode == 2 and "already exists" in again.stderr
    missing = engine("stats", str(folder), "--out", str(tmp_path / "x.npz"),
                     env={"TORCH_HOME": str(tmp_path / "none")})
    assert missing.returncode == 2 and WEIGHTS_NAME in missing.stderr and not (tmp_path / "x.npz").exists()
