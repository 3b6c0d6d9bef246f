"""The interface every pipeline family implements, so the digits models, Stable Diffusion and
SD 3 go through one run pipeline.

An adapter holds a loaded model and knows how to
- `encode(prompts)`: the text conditioning its denoiser takes (`Conditioning`);
- `denoiser`: the module that gets quantized (a UNet or an MMDiT);
- `latent_shape(height, width)`: the shape of one sample's initial latents;
- `sample_batch(prompts, latents, steps, guidance, negative_prompt, on_step)`: denoise given
  initial latents with its scheduler (the pipeline's own, or `options.scheduler`);
- `decode(latents)`: images in [-1, 1] (the VAE for Stable Diffusion, identity for digits);
- `predict(x, t, cond)` and `noised(x0, noise, gen)`: the denoiser's training objective, for
  calibration sets (engine.calibration).
What differs between a noise-prediction UNet and a rectified-flow MMDiT is in
`engine.models.adapters.objectives`; batching, progress and initial latents are
`engine.sampling`'s, the same for every family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.models.pipeline_index import PipelineInfo, check_size
from engine.run_config import ModelOptions

StepCallback = Callable[[int], None]  # called with the number of steps done in this batch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is float16 on CUDA and float32 elsewhere."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


@dataclass
class Conditioning:
    """Encoded prompts: per-token states [B, L, D] and, for MMDiT models, pooled vectors [B, P]
    (an empty [B, 0] tensor for UNets)."""

    states: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return len(self.states)


class PipelineAdapter(ABC):
    kind: str  # the model_index.json `_class_name`
    flow: bool  # rectified flow (velocity, MMDiT call) or noise prediction (UNet call)
    denoiser: nn.Module
    scheduler_config: dict

    def __init__(self, info: PipelineInfo, options: ModelOptions, device: torch.device | None):
        self.info = info
        self.path = Path(info.path)
        self.options = options
        self.device = device or default_device()
        self.dtype = resolve_dtype(options.dtype, self.device)
        self.height, self.width = check_size(info, options.height, options.width)

    # --- what each family provides -------------------------------------------------------
    @abstractmethod
    def encode(self, prompts: Sequence[str]) -> Conditioning: ...

    @abstractmethod
    def sample_batch(self, prompts: Sequence[str], latents: torch.Tensor, steps: int, guidance: float,
                     negative_prompt: str = "", on_step: StepCallback | None = None) -> torch.Tensor:
        """Denoised latents for one batch of prompts and their initial latents."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], float32 on the CPU."""

    @abstractmethod
    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor: ...

    @abstractmethod
    def noised(self, x0: torch.Tensor, noise: torch.Tensor, gen: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, timesteps, target) of the training objective for clean latents x0."""

    @property
    @abstractmethod
    def cache_modules(self) -> tuple[nn.Module, ...]:
        """The modules whose weights statistics computed from this model depend on."""

    # --- shared ----------------------------------------------------------------------------
    @property
    def is_flow(self) -> bool:
        return self.flow

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        h, w = height or self.height, width or self.width
        scale = self.info.vae_scale
        return (self.denoiser.config.in_channels, h // scale, w // scale)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """One sample's initial latents at the run's height and width."""
        return self.latent_shape()

    def eval_prompts(self, n: int, prompts: Sequence[str] | None) -> tuple[list[str], list[int] | None]:
        """The prompts of samples 0..n-1 (cycling through `prompts` in order) and their class
        labels where the model has classes (None otherwise)."""
        if not prompts:
            raise ValueError(f"{self.path}: this model has no built-in prompts; give the experiment "
                             "`prompts = \"<file>\"` or a list")
        return [prompts[i % len(prompts)] for i in range(n)], None

    def calibration_prompts(self, n: int, gen: torch.Generator, prompts: Sequence[str] | None) -> list[str]:
        """n seeded calibration prompts: drawn with replacement from the experiment's prompts."""
        if not prompts:
            raise ValueError(f"{self.path}: calibration needs prompts; give the experiment `prompts`")
        picks = torch.randint(0, len(prompts), (n,), generator=gen).tolist()
        return [prompts[i] for i in picks]

    def calibration_source(self) -> tuple[torch.Tensor, list[list[str]]]:
        """Clean training latents and, for each, the prompts that fit it (method `fisher`)."""
        raise ValueError(f"{self.kind} at {self.path}: method 'fisher' needs the model's training images in "
                         "latent space; qtui has them for the digits models only")
