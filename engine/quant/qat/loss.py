"""The training loss of the denoiser being fine-tuned, in seeded batches.

`training_loss(model, batch_size, seed, pool)` picks the loss of the model's family:
`TrainingLoss` for the digits models (their own training data), `PipelineLoss` for a diffusers
pipeline (latents of a `LatentPool`, engine.quant.qat.data). Both have `batch()` (the next seeded
batch) and `loss(denoiser, batch)`.

The digits models' loss is the one `engine train` computes. Batches are drawn exactly as the training loops draw them (engine.train.common.PromptBatches:
random digit images, a random prompt template naming the class, 10% empty prompts), from a
seeded generator; the prompt encoder is frozen (it is not part of the quantized checkpoint).
- digits-unet (DDPM, epsilon): x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, t uniform over the
  1000 training steps, loss = mse(unet(x_t, t, states), noise) (engine/train/digits_unet.py);
- digits-mmdit (rectified flow): sigma logit-normal, x_t = (1 - sigma) x0 + sigma noise,
  loss = mse(transformer(x_t, states, pooled, t), noise - x0) (engine/train/digits_mmdit.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.loader import DIGITS_MMDIT_PIPELINE, DIGITS_PIPELINE, TextToImageModel

DIGITS_KINDS = (DIGITS_PIPELINE, DIGITS_MMDIT_PIPELINE)

PROMPT_DROPOUT = 0.1  # as the digits training loops


class TrainingLoss:
    """Seeded batches of the model's training loss: `batch()` draws the next one (CPU
    generator), `loss(denoiser, batch)` scores a denoiser on it."""

    def __init__(self, model: TextToImageModel, batch_size: int, seed: int):
        from engine.data.digits import load_digits_16
        from engine.train.common import PromptBatches

        if model.kind not in DIGITS_KINDS:
            raise ValueError(f"no digits training data for model kind {model.kind!r}: use PipelineLoss")
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


@dataclass(frozen=True)
class PoolBatch:
    """One batch of `PipelineLoss`, as a recipe (rows, captions, noise seed): it is materialised
    when scored, so held-out batches hold no latents or text states."""

    rows: torch.Tensor
    prompts: tuple[str, ...]
    noise_seed: int


class PipelineLoss:
    """The training loss of a diffusers pipeline's denoiser on the clean latents of a pool:
    the adapter's objective (`noised`: UNets epsilon or v prediction per the scheduler's
    `prediction_type`, timesteps over the DDPM training schedule; SD 3 rectified flow, x_t =
    (1 - sigma) x0 + sigma noise, target noise - x0, sigmas of the flow-matching scheduler),
    captions encoded by the frozen text encoders, `PROMPT_DROPOUT` of them replaced by the empty
    prompt (so the unconditional half of guidance is trained too). Rows are drawn with
    replacement. The denoiser is called with float32 inputs (QAT trains in float32)."""

    def __init__(self, model: TextToImageModel, pool, batch_size: int, seed: int):
        self.model, self.pool, self.batch_size = model, pool, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self) -> PoolBatch:
        b, gen = self.batch_size, self.gen
        rows = torch.randint(0, self.pool.n, (b,), generator=gen)
        dropped = (torch.rand(b, generator=gen) < PROMPT_DROPOUT).tolist()
        prompts = tuple("" if drop else self.pool.captions[i] for i, drop in zip(rows.tolist(), dropped))
        return PoolBatch(rows, prompts, int(torch.randint(0, 2**62, (1,), generator=gen)))

    def loss(self, denoiser: nn.Module, batch: PoolBatch) -> torch.Tensor:
        gen = torch.Generator().manual_seed(batch.noise_seed)
        x0 = self.pool.read(batch.rows)
        noise = torch.randn(x0.shape, generator=gen)
        with torch.no_grad():
            xt, t, target = self.model.noised(x0, noise, gen)
            cond = self.model.encode(list(batch.prompts))
        device, f32 = self.model.device, torch.float32
        xt, target, t = xt.to(device, f32), target.to(device, f32), t.to(device)
        states, pooled = cond.states.to(f32), cond.pooled.to(f32)
        pred = denoiser(xt, states, pooled, t).sample if self.model.is_flow else denoiser(xt, t, states).sample
        return F.mse_loss(pred.float(), target)


def training_loss(model: TextToImageModel, batch_size: int, seed: int, pool=None):
    """The family's loss: the digits data for the digits models, else the pool's latents."""
    if model.kind in DIGITS_KINDS:
        return TrainingLoss(model, batch_size, seed)
    if pool is None:
        raise ValueError(f"no training data for model kind {model.kind!r}")
    return PipelineLoss(model, pool, batch_size, seed)


@torch.no_grad()
def mean_loss(denoiser: nn.Module, loss: TrainingLoss, batches: list) -> float:
    return sum(loss.loss(denoiser, b).item() for b in batches) / len(batches)
