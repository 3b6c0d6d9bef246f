"""The shipped embedded default, exercised for real (the one slower end-to-end test)."""

from __future__ import annotations

import json

import pytest
import torch

from engine.models.registry import SHIPPED_DIR
from engine.store import Store
from tests.conftest import REPO, engine


def test_classifier_held_out_accuracy():
    from engine.data.digits import load_digits_16, split_indices
    from engine.models.loader import load_feature_model

    images, labels = load_digits_16()
    _, held_out = split_indices(len(images), held_out=0.2, seed=0)
    model = load_feature_model(SHIPPED_DIR / "digits-classifier", torch.device("cpu"))
    with torch.no_grad():
        accuracy = (model(images[held_out]).argmax(1) == labels[held_out]).float().mean().item()
    assert accuracy >= 0.97


def test_ablation_on_the_shipped_model(tmp_path):
    """Full precision draws the prompted digit; W8 stays close to it; W4 costs more."""
    result = engine("run", "attention-ablation", "--variant", "fp", "--variant", "D", "--variant", "A",
                    "--samples", "200", "--experiments", str(REPO / "experiments.toml"),
                    "--runs-dir", str(tmp_path), timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    store = Store.open(tmp_path)
    metrics = {r["variant"]: store.metrics(r["id"]) for r in store.runs()}
    assert metrics["fp"]["prompt_acc"] >= 0.8
    assert metrics["D"]["prompt_acc"] >= metrics["fp"]["prompt_acc"] - 0.05
    assert metrics["A"]["size_ratio"] <= 0.14 and metrics["D"]["size_ratio"] <= 0.26
    layers = store.layers(store.runs()[0]["id"])
    roles = {l["role"] for l in layers}
    assert roles == {"conv", "attention", "linear"}
    training = json.loads((SHIPPED_DIR / "digits-unet" / "training.json").read_text())
    assert training["train_config"]["seed"] == 0
