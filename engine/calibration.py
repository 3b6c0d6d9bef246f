"""A seeded calibration set for a text-to-image denoiser: the training loss's own inputs.

Each sample is an image from the model's data, a prompt for it (a random template, or the empty
prompt with probability `unconditional`, as in training with prompt dropout), a timestep and
the true noise. The denoiser sees the noisy image and is scored by the mean squared error of
its prediction against the training target (the adapter's `noised`,
engine.models.adapters.objectives):
- noise prediction (the UNet, DDPM): x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise, target noise;
- rectified flow (the MMDiT, SD 3): x_t = (1 - sigma) x_0 + sigma noise, target noise - x_0.
Timesteps cover the whole training schedule: one per equal stratum of it, in random order.

Models without their training images (real pipelines) draw the clean images from the
full-precision model itself: latents it samples from the experiment's prompts, with the
experiment's steps, guidance and negative prompt unless the variant's own calibration keys give
other steps or guidance (`generation_for`).

The same (model, samples, seed, generation) always gives the same set, so every variant of an
experiment, and the Fisher cache, sees exactly the same calibration data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from engine.models.loader import TextToImageModel

UNCONDITIONAL = 0.1  # the digits models' prompt dropout in training
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class CalibrationSet:
    noisy: torch.Tensor  # x_t [N, C, H, W]
    timesteps: torch.Tensor  # [N], as the denoiser takes them (int64 for DDPM, float for flow)
    states: torch.Tensor  # encoded prompts [N, L, D]
    pooled: torch.Tensor  # pooled prompt vectors [N, D]
    target: torch.Tensor  # what the denoiser should predict [N, C, H, W]
    flow: bool  # rectified flow (velocity target, MMDiT call) or noise prediction
    prompts: list[str]
    indices: torch.Tensor  # which source images were used [N]

    def __len__(self) -> int:
        return len(self.timesteps)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """(x_t, t, states, pooled, target) in consecutive batches of at most `batch_size`."""
        for start in range(0, len(self), batch_size):
            part = slice(start, start + batch_size)
            yield (self.noisy[part], self.timesteps[part], self.states[part], self.pooled[part],
                   self.target[part])


def predict(denoiser: nn.Module, flow: bool, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor,
            pooled: torch.Tensor) -> torch.Tensor:
    """The denoiser's prediction for a batch, called the way its kind is trained (the float
    inputs in the denoiser's dtype: a calibration set is float32, a model may be half)."""
    dtype = next(denoiser.parameters()).dtype
    x, states, pooled = x.to(dtype), states.to(dtype), pooled.to(dtype)
    if flow:
        return denoiser(x, states, pooled, t).sample
    return denoiser(x, t, states).sample


def training_loss(denoiser: nn.Module, flow: bool, batch: Batch) -> torch.Tensor:
    """The training loss of one batch: mean squared error against the true target, in float32."""
    x, t, states, pooled, target = batch
    return (predict(denoiser, flow, x, t, states, pooled).float() - target.float()).pow(2).mean()


def stratified(n: int, total: int, generator: torch.Generator) -> torch.Tensor:
    """n indices in [0, total): one uniform draw in each of n equal strata, shuffled."""
    strata = torch.randperm(n, generator=generator).double()
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return ((strata + u) * total / n).floor().clamp(max=total - 1).long()


@torch.no_grad()
def build_calibration(
    model: TextToImageModel,
    images: torch.Tensor,
    prompt_choices: Sequence[Sequence[str]],
    samples: int,
    seed: int,
    unconditional: float = UNCONDITIONAL,
) -> CalibrationSet:
    """A calibration set of `samples` items drawn with `seed` from `images` [N, C, H, W] (in the
    denoiser's input space) and `prompt_choices` (the prompts that fit each image)."""
    if samples < 1:
        raise ValueError(f"the calibration set is empty ({samples} samples)")
    if len(images) != len(prompt_choices) or len(images) == 0:
        raise ValueError(f"{len(images)} images but {len(prompt_choices)} prompt lists")
    if tuple(images.shape[1:]) != tuple(model.sample_shape):
        raise ValueError(f"images of shape {tuple(images.shape[1:])} do not fit the model's {model.sample_shape}")
    gen = torch.Generator().manual_seed(seed)
    if samples <= len(images):
        indices = torch.randperm(len(images), generator=gen)[:samples]
    else:
        indices = torch.randint(0, len(images), (samples,), generator=gen)
    choice = torch.rand(samples, generator=gen)
    drop = torch.rand(samples, generator=gen) < unconditional
    prompts = []
    for i, index in enumerate(indices.tolist()):
        options = prompt_choices[index]
        prompts.append("" if drop[i] else options[int(choice[i] * len(options))])
    noise = torch.randn((samples, *images.shape[1:]), generator=gen)
    noisy, timesteps, target = model.noised(images[indices].float(), noise, gen)
    cond = model.encode(prompts)
    device = model.device
    return CalibrationSet(noisy=noisy.to(device), timesteps=timesteps.to(device), states=cond.states.float(),
                          pooled=cond.pooled.float(), target=target.to(device), flow=model.flow, prompts=prompts,
                          indices=indices)


def digits_source() -> tuple[torch.Tensor, list[list[str]]]:
    """The digits images and, for each, its prompt under every training template."""
    from engine.models.adapters.digits import digits_training_data

    return digits_training_data()


def generation_for(calibration: dict, sampling) -> dict:
    """How a real pipeline samples its calibration latents: the variant's `calibration.steps`
    and `calibration.guidance` where given, else the experiment's (`sampling`: a run's
    SamplingConfig), with the experiment's negative prompt. The keyword arguments of
    `calibration_for` and of the model's `calibration_key`."""
    return {"steps": calibration.get("steps", sampling.steps),
            "guidance": float(calibration.get("guidance", sampling.guidance)),
            "negative_prompt": sampling.negative_prompt}


def calibration_for(model: TextToImageModel, samples: int, seed: int, prompts: list[str] | None = None,
                    on_progress: Callable[[int, int], None] | None = None, **generation) -> CalibrationSet:
    """The calibration set of a loaded model, from the data its family was trained on (or, for
    real pipelines, latents it generates from the experiment's `prompts` as `generation` says:
    steps, guidance, negative_prompt; `on_progress(done, total)` counts denoising steps)."""
    images, choices = model.calibration_source(samples, seed, prompts, on_progress=on_progress, **generation)
    return build_calibration(model, images, choices, samples, seed)
