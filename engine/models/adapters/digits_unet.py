"""`QtuiDigitsPipeline`: the embedded noise-prediction UNet, sampled with DDIM (eta 0) built from
its DDPM scheduler config (or the experiment's scheduler), with classifier-free guidance when
guidance != 1."""

from __future__ import annotations

import torch

from engine.models.adapters.digits import DigitsAdapter
from engine.models.adapters.objectives import NoisePrediction


class DigitsUNetAdapter(NoisePrediction, DigitsAdapter):
    @torch.no_grad()
    def sample_batch(self, prompts, latents, steps, guidance, negative_prompt="", on_step=None):
        scheduler = self.scheduler("DDIMScheduler")
        scheduler.set_timesteps(steps)
        use_guidance = guidance != 1.0
        b = len(prompts)
        cond = self.encode(prompts).states
        states = torch.cat([self.encode([negative_prompt]).states.expand(b, -1, -1), cond]) if use_guidance else cond
        x = latents.to(self.device, self.dtype)
        for i, t in enumerate(scheduler.timesteps):
            inp = torch.cat([x, x]) if use_guidance else x
            eps = self.denoiser(inp, t, states).sample
            if use_guidance:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            x = scheduler.step(eps, t, x, **({"eta": 0.0} if "eta" in _step_args(scheduler) else {})).prev_sample
            if on_step:
                on_step(i + 1)
        return x


def _step_args(scheduler) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)


ADAPTER = DigitsUNetAdapter
