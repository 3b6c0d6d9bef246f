"""`StableDiffusionPipeline` (SD 1.x / 2.x): the denoiser is `pipe.unet`, one CLIP text encoder,
the pipeline's scheduler (PNDM, DDIM, ... with epsilon or v prediction) stepping through
`pipe(...)`. The safety checker is not loaded (it would alter the images being measured)."""

from __future__ import annotations

import torch

from engine.models.adapters.base import Conditioning
from engine.models.adapters.diffusers_pipeline import DiffusersAdapter
from engine.models.adapters.objectives import NoisePrediction


class StableDiffusionAdapter(NoisePrediction, DiffusersAdapter):
    pipeline_class = "StableDiffusionPipeline"
    denoiser_attr = "unet"

    def load_kwargs(self):
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    @torch.no_grad()
    def encode(self, prompts):
        states, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, False)
        return Conditioning(states, states.new_zeros(len(states), 0))


ADAPTER = StableDiffusionAdapter
