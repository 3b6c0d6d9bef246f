"""One code path for every model: a directory with a diffusers-style `model_index.json`,
loaded component by component with `from_pretrained`.

Kinds handled here:
- `QtuiDigitsPipeline`: the embedded text-to-image default (UNet2DConditionModel + PromptEncoder
  + scheduler config + open_clip tokenizer), sampled with DDIM.
- `QtuiDigitsMMDiTPipeline`: the embedded MMDiT (SD3Transformer2DModel + PromptEncoder +
  FlowMatchEulerDiscreteScheduler config + tokenizer), a rectified-flow model like SD 3.
- `QtuiDigitClassifier`: the embedded feature model (FID features and prompt accuracy).
Real pipelines (Stable Diffusion, SD 3.5) plug in here as further kinds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.models.registry import INDEX_FILE

DIGITS_PIPELINE = "QtuiDigitsPipeline"
DIGITS_MMDIT_PIPELINE = "QtuiDigitsMMDiTPipeline"
# Each text-to-image kind: (denoiser folder, diffusers class name of the denoiser).
TEXT_TO_IMAGE_KINDS = {
    DIGITS_PIPELINE: ("unet", "UNet2DConditionModel"),
    DIGITS_MMDIT_PIPELINE: ("transformer", "SD3Transformer2DModel"),
}
FLOW_KINDS = (DIGITS_MMDIT_PIPELINE,)
DIGITS_CLASSIFIER = "QtuiDigitClassifier"


class ModelLoadError(Exception):
    pass


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def read_index(path: Path) -> dict:
    index = Path(path) / INDEX_FILE
    try:
        return json.loads(index.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{index}: no such file (not a saved model directory)") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{index}: not valid JSON ({exc})") from None


@dataclass
class TextToImageModel:
    """A loaded text-to-image model: the denoiser is the part that gets quantized."""

    kind: str
    path: Path
    denoiser: nn.Module
    text_encoder: nn.Module
    scheduler_config: dict
    tokenizer_name: str
    max_length: int
    device: torch.device

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        import open_clip

        tokenizer = open_clip.get_tokenizer(self.tokenizer_name)
        return tokenizer(prompts, context_length=self.max_length)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenize(prompts).to(self.device)
        return self.text_encoder(ids)

    @property
    def is_flow(self) -> bool:
        """A rectified-flow model (velocity prediction, flow-matching Euler sampling)."""
        return self.kind in FLOW_KINDS

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.denoiser.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)


def load_text_to_image(path: str | Path, device: torch.device | None = None) -> TextToImageModel:
    import diffusers

    from engine.models.prompt_encoder import PromptEncoder

    path = Path(path)
    device = device or default_device()
    index = read_index(path)
    kind = index.get("_class_name")
    if kind not in TEXT_TO_IMAGE_KINDS:
        raise ModelLoadError(f"{path / INDEX_FILE}: model kind {kind!r} is not a text-to-image model qtui can load")
    folder, class_name = TEXT_TO_IMAGE_KINDS[kind]
    try:
        denoiser = getattr(diffusers, class_name).from_pretrained(path / folder, low_cpu_mem_usage=False)
        text_encoder = PromptEncoder.from_pretrained(path / "text_encoder", low_cpu_mem_usage=False)
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot load ({exc})") from None
    return TextToImageModel(
        kind=kind,
        path=path,
        denoiser=denoiser.to(device).eval(),
        text_encoder=text_encoder.to(device).eval(),
        scheduler_config=scheduler_config,
        tokenizer_name=index.get("tokenizer", ["open_clip", "ViT-B-32"])[1],
        max_length=text_encoder.config.max_length,
        device=device,
    )


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
