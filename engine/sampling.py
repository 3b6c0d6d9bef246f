"""Seeded sampling with classifier-free guidance: DDIM for the noise-prediction UNet, and
flow-matching Euler (diffusers' `FlowMatchEulerDiscreteScheduler`) for rectified-flow models
such as the MMDiT, which also take the pooled prompt vector.

Every variant of an experiment gets the same prompts and the same initial noise (drawn on the
CPU from the experiment's seed, whatever the device), so variants are compared pairwise.
"""

from __future__ import annotations

from typing import Callable

import torch

from engine.models.loader import TextToImageModel

Progress = Callable[[int, int], None]


def initial_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn((n, *shape), generator=generator, dtype=torch.float32)


@torch.no_grad()
def sample_images(
    model: TextToImageModel,
    prompts: list[str],
    noise: torch.Tensor,
    steps: int,
    guidance: float,
    batch_size: int,
    on_progress: Progress | None = None,
) -> torch.Tensor:
    """Images in [-1, 1], shape [N, C, H, W], on the CPU. Progress counts denoising steps
    over all images: (images done x steps + steps of the current batch, N x steps)."""
    if model.is_flow:
        return sample_flow(model, prompts, noise, steps, guidance, batch_size, on_progress)
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(model.scheduler_config)
    scheduler.set_timesteps(steps)
    device = model.device
    use_guidance = guidance != 1.0
    uncond = model.encode([""])[0] if use_guidance else None
    total = len(prompts) * steps
    out = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = prompts[start : start + batch_size]
        b = len(batch_prompts)
        cond = model.encode(batch_prompts)[0]
        states = torch.cat([uncond.expand(b, -1, -1), cond]) if use_guidance else cond
        x = noise[start : start + b].to(device)
        for i, t in enumerate(scheduler.timesteps):
            inp = torch.cat([x, x]) if use_guidance else x
            eps = model.denoiser(inp, t, states).sample
            if use_guidance:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
            if on_progress:
                on_progress(start * steps + b * (i + 1), total)
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)


def guided(model: TextToImageModel, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor,
           pooled: torch.Tensor, guidance: float) -> torch.Tensor:
    """The flow model's guided velocity; `states` and `pooled` hold the unconditional half
    first when guidance != 1 (batch 2B for B images)."""
    use_guidance = guidance != 1.0
    inp = torch.cat([x, x]) if use_guidance else x
    v = model.denoiser(inp, states, pooled, t.expand(inp.shape[0])).sample
    if use_guidance:
        v_uncond, v_cond = v.chunk(2)
        v = v_uncond + guidance * (v_cond - v_uncond)
    return v


@torch.no_grad()
def sample_flow(
    model: TextToImageModel,
    prompts: list[str],
    noise: torch.Tensor,
    steps: int,
    guidance: float,
    batch_size: int,
    on_progress: Progress | None = None,
) -> torch.Tensor:
    """Flow-matching Euler sampling from sigma = 1 (noise) to 0, as `sample_images`."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    device = model.device
    use_guidance = guidance != 1.0
    uncond = model.encode([""]) if use_guidance else None
    total = len(prompts) * steps
    out = []
    for start in range(0, len(prompts), batch_size):
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)
        scheduler.set_timesteps(steps, device=device)
        batch_prompts = prompts[start : start + batch_size]
        b = len(batch_prompts)
        states, pooled = model.encode(batch_prompts)
        if use_guidance:
            states = torch.cat([uncond[0].expand(b, -1, -1), states])
            pooled = torch.cat([uncond[1].expand(b, -1), pooled])
        x = noise[start : start + b].to(device)
        for i, t in enumerate(scheduler.timesteps):
            v = guided(model, x, t, states, pooled, guidance)
            x = scheduler.step(v, t, x).prev_sample
            if on_progress:
                on_progress(start * steps + b * (i + 1), total)
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)
