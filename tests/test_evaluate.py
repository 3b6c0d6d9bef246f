"""The evaluation entry point: metrics from a run config, eval.npz round trip, and the
configuration errors for feature model, reference and CLIP model (torch-free, ConfigError)."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch

from engine.config import load_catalogue
from engine.errors import ConfigError
from engine.models.inception import WEIGHTS_NAME
from tests.conftest import TINY_TOML


def _catalogue(tmp_path, tiny_models, **keys):
    text = TINY_TOML.format(model=tiny_models["model"], classifier=tiny_models["classifier"])
    for key, value in keys.items():
        line = f'{key} = "{value}"\n'
        if re.search(rf"^{key} = ", text, re.M):
            text = re.sub(rf"^{key} = .*\n", line, text, count=1, flags=re.M)
        else:
            text = text.replace("bootstrap = 10\n", "bootstrap = 10\n" + line, 1)
    path = tmp_path / "experiments.toml"
    path.write_text(text)
    return path


def test_evaluator_metrics_and_eval_file(tmp_path, tiny_models, tiny_clip_dir):
    from engine.evaluate import Evaluator, load_eval
    from engine.metrics.fid import feature_stats, fid_bootstrap

    exp = load_catalogue(_catalogue(tmp_path, tiny_models, clip_model=f"local-dir:{tiny_clip_dir}")).get("tiny")
    config = exp.run_config("fp")
    evaluator = Evaluator.from_config(config, torch.device("cpu"), tmp_path / "cache")
    labels = [i % 10 for i in range(30)]
    prompts = [f"a handwritten digit {i}" for i in labels]
    images = torch.rand(30, 1, 16, 16) * 2 - 1
    run = tmp_path / "run"
    run.mkdir()
    metrics = evaluator.evaluate(images, prompts, labels, run, n_boot=20, seed=0)
    assert {"fid", "fid_ci_low", "fid_ci_high", "fid_floor", "prompt_acc", "clip_score", "clip_score_ci_low",
            "clip_score_ci_high"} <= set(metrics)
    assert metrics["clip_score_ci_low"] <= metrics["clip_score"] <= metrics["clip_score_ci_high"]

    data = load_eval(run)
    assert data.features.dtype == np.float32 and data.features.shape == (30, 128)
    assert data.labels.tolist() == labels and data.prompts == prompts and data.preds.shape == (30,)
    assert data.clip.shape == (30,) and data.clip.mean() == pytest.approx(metrics["clip_score"], rel=1e-6)
    assert data.feature_model.startswith("digits-classifier@") or "@" in data.feature_model
    assert data.reference == "digits" and data.clip_model.startswith("local-dir:")
    assert (data.preds == np.asarray(labels)).mean() == metrics["prompt_acc"]
    # the metrics are recomputed exactly from the file
    again = fid_bootstrap(data.features, data.reference_stats(), n_boot=20, seed=data.seed)
    assert again == (metrics["fid"], metrics["fid_ci_low"], metrics["fid_ci_high"])
    assert feature_stats(data.features).n == 30


def test_default_clip_model_is_digits_clip_for_digits_models(tmp_path, tiny_models):
    from engine.models.registry import SHIPPED_DIR

    if not (SHIPPED_DIR / "digits-clip").is_dir():
        pytest.skip("models/digits-clip not present")
    exp = load_catalogue(_catalogue(tmp_path, tiny_models)).get("tiny")
    assert exp.run_config("fp")["clip"] == {"model": f"local-dir:{SHIPPED_DIR / 'digits-clip'}", "weights": None}
    assert exp.run_config("fp").get("reference") is None  # the real digits (left out at its default)
    off = load_catalogue(_catalogue(tmp_path, tiny_models, clip_model="none")).get("tiny")
    assert off.run_config("fp").get("clip") is None


def test_missing_inception_weights_is_a_config_error_within_2s(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    path = _catalogue(tmp_path, tiny_models, feature_model="inception")
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_catalogue(path)
    assert time.perf_counter() - start < 2.0
    message = str(err.value)
    assert "feature_model" in message and str(tmp_path / "th" / "hub" / "checkpoints" / WEIGHTS_NAME) in message
    assert ":" + str(err.value.line) in message and err.value.line is not None
    with pytest.raises(ConfigError, match="inception_weights: inception_weights file .*none.pth does not exist"):
        load_catalogue(_catalogue(tmp_path, tiny_models, feature_model="inception", inception_weights="none.pth"))


def test_reference_errors(tmp_path, tiny_models):
    from engine.metrics.fid import FeatureStats
    from engine.metrics.reference import save_stats

    with pytest.raises(ConfigError, match="reference: .*missing.npz does not exist"):
        load_catalogue(_catalogue(tmp_path, tiny_models, reference="missing.npz"))
    save_stats(tmp_path / "inc.npz", FeatureStats(mu=np.zeros(2048), sigma=np.eye(2048), n=3))
    with pytest.raises(ConfigError, match="dimension 2048, but feature model .* gives 128"):
        load_catalogue(_catalogue(tmp_path, tiny_models, reference="inc.npz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        load_catalogue(_catalogue(tmp_path, tiny_models, reference="empty"))
    save_stats(tmp_path / "ok.npz", FeatureStats(mu=np.zeros(128), sigma=np.eye(128), n=3))
    exp = load_catalogue(_catalogue(tmp_path, tiny_models, reference="ok.npz")).get("tiny")
    assert exp.run_config("fp")["reference"] == str((tmp_path / "ok.npz").resolve())


def test_clip_config_errors(tmp_path, tiny_models, tiny_clip_dir):
    with pytest.raises(ConfigError, match="clip_weights: is required with clip_model = \"ViT-B-32\"|clip_weights: is required"):
        load_catalogue(_catalogue(tmp_path, tiny_models, clip_model="ViT-B-32"))
    with pytest.raises(ConfigError, match="clip_weights: .*nope.bin does not exist"):
        load_catalogue(_catalogue(tmp_path, tiny_models, clip_model="ViT-B-32", clip_weights="nope.bin"))
    with pytest.raises(ConfigError, match="clip_model: .*no open_clip_config.json"):
        load_catalogue(_catalogue(tmp_path, tiny_models, clip_model=f"local-dir:{tmp_path}"))
    with pytest.raises(ConfigError, match="not 'local-dir:<folder>'"):
        load_catalogue(_catalogue(tmp_path, tiny_models, clip_model="no-such-arch"))
    (tmp_path / "w.bin").write_bytes(b"x")
    exp = load_catalogue(_catalogue(tmp_path, tiny_models, clip_model="ViT-B-32", clip_weights="w.bin")).get("tiny")
    assert exp.run_config("fp")["clip"] == {"model": "ViT-B-32", "weights": str((tmp_path / "w.bin").resolve())}


def test_run_fails_clearly_for_unreadable_clip_weights(tmp_path, tiny_models, tiny_clip_dir):
    """Checks that need torch happen in the run: a local-dir whose weights file is not a
    checkpoint fails there with the folder named."""
    import shutil

    from engine.evaluate import Evaluator
    from engine.metrics.clip_score import ClipLoadError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_clip_dir, broken)
    (broken / "open_clip_model.safetensors").write_bytes(b"not a checkpoint")
    exp = load_catalogue(_catalogue(tmp_path, tiny_models, clip_model=f"local-dir:{broken}")).get("tiny")
    with pytest.raises(ClipLoadError, match="broken: cannot load the open_clip model"):
        Evaluator.from_config(exp.run_config("fp"), torch.device("cpu"), tmp_path / "cache")


def test_reference_cache_written_by_several_processes_at_once(tmp_path):
    """Two runs of one experiment started together both compute and cache the reference
    statistics: each writes its own temporary file, so neither rename fails."""
    import subprocess
    import sys
    import time

    start = time.time() + 1.0
    code = ("import sys, time, numpy as np\n"
            "from pathlib import Path\n"
            "from engine.metrics.fid import feature_stats\n"
            "from engine.metrics import reference\n"
            "stats = feature_stats(np.random.default_rng(0).normal(size=(50, 8)))\n"
            "while time.time() < float(sys.argv[2]): pass\n"
            "for _ in range(20): reference.save_stats(Path(sys.argv[1]) / 'ref.npz', stats)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(start)], stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    assert sorted(f.name for f in tmp_path.iterdir()) == ["ref.npz"]
