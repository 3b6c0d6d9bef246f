"""Shared fixtures: tiny models that the tests train and save themselves, and a tiny catalogue."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_TOML = """
[experiments.tiny]
description = "a tiny configuration for tests"
model = "{model}"
feature_model = "{classifier}"
samples = 20
steps = 3
guidance = 2.0
seed = 0
batch_size = 10
bootstrap = 10

[experiments.tiny.variants.fp]
method = "none"

[experiments.tiny.variants.A]
description = "all W4"
method = "rtn"
bits = 4

[experiments.tiny.variants.B]
description = "conv W4, attention W8"
method = "rtn"
bits = {{ conv = 4, attention = 8, linear = 4 }}

[experiments.tiny.variants.C]
description = "conv W8, attention W4, linear stays FP"
method = "rtn"
bits = {{ conv = 8, attention = 4 }}
symmetric = false
"""


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny digits UNet (a few training steps) and a tiny classifier, saved with save_pretrained."""
    import torch

    from engine.train.digits_classifier import ClassifierTrainConfig, train_digits_classifier
    from engine.train.digits_unet import UNetTrainConfig, train_digits_unet

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    quiet = lambda *a, **k: None
    train_digits_unet(root / "unet", UNetTrainConfig(steps=3, batch_size=8, block_out_channels=(8, 16, 16)), log=quiet)
    train_digits_classifier(root / "classifier", ClassifierTrainConfig(epochs=1), log=quiet)
    return {"model": root / "unet", "classifier": root / "classifier"}


@pytest.fixture(scope="session")
def tiny_mmdit(tmp_path_factory) -> Path:
    """A 2-block MMDiT of width 16 (a few training steps), saved with save_pretrained."""
    import torch

    from engine.train.digits_mmdit import MMDiTTrainConfig, train_digits_mmdit

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("mmdit") / "digits-mmdit"
    cfg = MMDiTTrainConfig(steps=3, batch_size=8, num_layers=2, num_heads=2, head_dim=8, text_dim=16)
    train_digits_mmdit(out, cfg, log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny random StableDiffusionPipeline folder (tests/tiny_pipelines.py)."""
    from tests.tiny_pipelines import build_sd

    return build_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """A tiny random StableDiffusion3Pipeline folder with T5 (tests/tiny_pipelines.py)."""
    from tests.tiny_pipelines import build_sd3

    return build_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.fixture
def tiny_experiments(tmp_path, tiny_models) -> Path:
    """experiments.toml with the `tiny` experiment (variants fp, A, B, C) on the tiny models."""
    path = tmp_path / "experiments.toml"
    path.write_text(TINY_TOML.format(model=tiny_models["model"], classifier=tiny_models["classifier"]))
    return path


def engine(*args: str, cwd: Path | None = None, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run the `engine` CLI as a user would, in a subprocess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **kwargs.pop("env", {}))
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], cwd=cwd, capture_output=True, text=True,
        timeout=timeout, env=env, **kwargs,
    )


@pytest.fixture(scope="session")
def inception_home(tmp_path_factory) -> Path:
    """A TORCH_HOME holding a random-weights Inception file where pytorch-fid looks for its
    weights (hub/checkpoints/pt_inception-2015-12-05-6726825d.pth), built once per session."""
    from engine.models.inception import WEIGHTS_NAME, write_random_weights

    home = tmp_path_factory.mktemp("torch_home")
    write_random_weights(home / "hub" / "checkpoints" / WEIGHTS_NAME)
    return home


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny random open_clip model in open_clip's local-dir layout (32x32 images)."""
    import torch

    from engine.train.digits_clip import ClipTrainConfig, save_local_dir

    torch.manual_seed(0)
    cfg = ClipTrainConfig(layers=1, width=32, heads=2, embed_dim=16, patch_size=8)
    import open_clip

    from engine.train.digits_clip import model_config

    model_cfg = model_config(cfg)
    model_cfg["vision_cfg"]["image_size"] = 32
    folder = tmp_path_factory.mktemp("clip")
    save_local_dir(folder, open_clip.model.CLIP(**model_cfg), cfg, list(range(49408)), model_cfg=model_cfg,
                   preprocess={"size": 32})
    return folder
