"""`StableDiffusion3Pipeline` (SD 3 / 3.5): the denoiser is `pipe.transformer` (MMDiT), text from
two CLIP encoders (token states and pooled vectors) and, unless `drop_t5`, T5 (without it the
pipeline pads the T5 part of the states with zeros, as SD 3.x users commonly run it); sampled
with the pipeline's flow-matching Euler scheduler through `pipe(...)`."""

from __future__ import annotations

import torch

from engine.models.adapters.base import Conditioning
from engine.models.adapters.diffusers_pipeline import DiffusersAdapter
from engine.models.adapters.objectives import RectifiedFlow


class StableDiffusion3Adapter(RectifiedFlow, DiffusersAdapter):
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_attr = "transformer"

    def load_kwargs(self):
        return {} if self.info.has_t5 else {"text_encoder_3": None, "tokenizer_3": None}

    @torch.no_grad()
    def encode(self, prompts):
        prompts = list(prompts)
        states, _, pooled, _ = self.pipe.encode_prompt(prompts, prompts, prompts, self.device, 1, False)
        return Conditioning(states, pooled)

    def call_kwargs(self, cond, negative):
        return {"prompt_embeds": cond.states, "pooled_prompt_embeds": cond.pooled,
                "negative_prompt_embeds": None if negative is None else negative.states,
                "negative_pooled_prompt_embeds": None if negative is None else negative.pooled}

    def unscale(self, latents):
        vae = self.pipe.vae.config
        return latents / vae.scaling_factor + vae.shift_factor

    def scale(self, latents):
        vae = self.pipe.vae.config
        return (latents - vae.shift_factor) * vae.scaling_factor


ADAPTER = StableDiffusion3Adapter
