"""One code path for every model: a directory with a diffusers-style `model_index.json`.

Text-to-image models load through their family's adapter (engine.models.adapters): the embedded
`QtuiDigitsPipeline` (UNet + PromptEncoder, DDIM) and `QtuiDigitsMMDiTPipeline` (MMDiT,
flow-matching Euler), and local `StableDiffusionPipeline` / `StableDiffusion3Pipeline` folders.
`QtuiDigitClassifier` is the embedded feature model (FID features and prompt accuracy).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from engine.models.adapters.base import PipelineAdapter, default_device
from engine.models.registry import INDEX_FILE
from engine.run_config import ModelOptions

DIGITS_PIPELINE = "QtuiDigitsPipeline"
DIGITS_MMDIT_PIPELINE = "QtuiDigitsMMDiTPipeline"
DIGITS_CLASSIFIER = "QtuiDigitClassifier"
TextToImageModel = PipelineAdapter  # the loaded model the run pipeline works with


class ModelLoadError(Exception):
    pass


def read_index(path: Path) -> dict:
    index = Path(path) / INDEX_FILE
    try:
        return json.loads(index.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{index}: no such file (not a saved model directory)") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{index}: not valid JSON ({exc})") from None


def load_text_to_image(path: str | Path, device: torch.device | None = None,
                       options: ModelOptions | None = None) -> PipelineAdapter:
    """The adapter of the model folder `path` (loaded offline, on `device`)."""
    from engine.models.adapters import load_adapter

    try:
        return load_adapter(path, options, device)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot load ({exc})") from None


def load_feature_model(path: str | Path, device: torch.device | None = None) -> nn.Module:
    from engine.models.classifier import DigitClassifier

    path = Path(path)
    kind = read_index(path).get("_class_name")
    if kind != DIGITS_CLASSIFIER:
        raise ModelLoadError(f"{path / INDEX_FILE}: model kind {kind!r} is not a feature model qtui can load")
    try:
        model = DigitClassifier.from_pretrained(path, low_cpu_mem_usage=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot load ({exc})") from None
    return model.to(device or default_device()).eval()


def write_index(path: Path, kind: str, components: dict) -> None:
    import diffusers

    index = {"_class_name": kind, "_diffusers_version": diffusers.__version__, **components}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
