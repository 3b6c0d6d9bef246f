"""The training loss of a digits model, as `engine train` computes it, for fine-tuning.

Batches are drawn exactly as the training loops draw them (engine.train.common.PromptBatches:
random digit images, a random prompt template naming the class, 10% empty prompts), from a
seeded generator; the prompt encoder is frozen (it is not part of the quantized checkpoint).
- digits-unet (DDPM, epsilon): x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, t uniform over the
  1000 training steps, loss = mse(unet(x_t, t, states), noise) (engine/train/digits_unet.py);
- digits-mmdit (rectified flow): sigma logit-normal, x_t = (1 - sigma) x0 + sigma noise,
  loss = mse(transformer(x_t, states, pooled, t), noise - x0) (engine/train/digits_mmdit.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.loader import DIGITS_MMDIT_PIPELINE, DIGITS_PIPELINE, TextToImageModel

PROMPT_DROPOUT = 0.1  # as the digits training loops


class TrainingLoss:
    """Seeded batches of the model's training loss: `batch()` draws the next one (CPU
    generator), `loss(denoiser, batch)` scores a denoiser on it."""

    def __init__(self, model: TextToImageModel, batch_size: int, seed: int):
        from engine.data.digits import load_digits_16
        from engine.train.common import PromptBatches

        if model.kind not in (DIGITS_PIPELINE, DIGITS_MMDIT_PIPELINE):
            raise ValueError(f"no training data for model kind {model.kind!r}: QAT fine-tunes the digits models")
        self.model, self.batch_size = model, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.prompts = PromptBatches(model.max_length)
        self.images, self.labels = load_digits_16()
        self.flow = model.is_flow
        if self.flow:
            from diffusers import FlowMatchEulerDiscreteScheduler

            self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)
        else:
            from diffusers import DDPMScheduler

            self.scheduler = DDPMScheduler.from_config(model.scheduler_config)

    @torch.no_grad()
    def batch(self) -> tuple[torch.Tensor, ...]:
        b, gen = self.batch_size, self.gen
        x0, ids = self.prompts.sample(self.images, self.labels, b, PROMPT_DROPOUT, gen)
        noise = torch.randn(x0.shape, generator=gen)
        states, pooled = self.model.text_encoder(ids.to(self.model.device))
        if self.flow:
            from diffusers.training_utils import compute_density_for_timestep_sampling

            n_train = self.scheduler.config.num_train_timesteps
            u = compute_density_for_timestep_sampling("logit_normal", b, logit_mean=0.0, logit_std=1.0, generator=gen)
            index = (u * n_train).long().clamp(max=n_train - 1)
            t = self.scheduler.timesteps[index]
            sigma = self.scheduler.sigmas[index].view(-1, 1, 1, 1)
            xt, target = (1 - sigma) * x0 + sigma * noise, noise - x0
        else:
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=gen)
            a = self.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
            xt, target = a.sqrt() * x0 + (1 - a).sqrt() * noise, noise
        device = self.model.device
        return xt.to(device), t.to(device), states, pooled, target.to(device)

    def loss(self, denoiser: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        xt, t, states, pooled, target = batch
        pred = denoiser(xt, states, pooled, t).sample if self.flow else denoiser(xt, t, states).sample
        return F.mse_loss(pred, target)


@torch.no_grad()
def mean_loss(denoiser: nn.Module, loss: TrainingLoss, batches: list) -> float:
    return sum(loss.loss(denoiser, b).item() for b in batches) / len(batches)
