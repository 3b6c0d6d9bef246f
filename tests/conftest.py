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
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], cwd=cwd, capture_output=True, text=True,
        timeout=timeout, env=env, **kwargs,
    )
