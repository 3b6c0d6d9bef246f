"""`QtuiDigitsMMDiTPipeline`: the embedded rectified-flow MMDiT, sampled with flow-matching Euler
(diffusers' `FlowMatchEulerDiscreteScheduler`, from sigma 1 to 0) and classifier-free guidance
when guidance != 1; it takes the pooled prompt vector too."""

from __future__ import annotations

import torch

from engine.models.adapters.digits import DigitsAdapter
from engine.models.adapters.objectives import RectifiedFlow


class DigitsMMDiTAdapter(RectifiedFlow, DigitsAdapter):
    @torch.no_grad()
    def sample_batch(self, prompts, latents, steps, guidance, negative_prompt="", on_step=None):
        scheduler = self.scheduler("FlowMatchEulerDiscreteScheduler")
        scheduler.set_timesteps(steps, device=self.device)
        use_guidance = guidance != 1.0
        b = len(prompts)
        cond = self.encode(prompts)
        states, pooled = cond.states, cond.pooled
        if use_guidance:
            uncond = self.encode([negative_prompt])
            states = torch.cat([uncond.states.expand(b, -1, -1), states])
            pooled = torch.cat([uncond.pooled.expand(b, -1), pooled])
        x = latents.to(self.device, self.dtype)
        for i, t in enumerate(scheduler.timesteps):
            inp = torch.cat([x, x]) if use_guidance else x
            v = self.denoiser(inp, states, pooled, t.expand(inp.shape[0])).sample
            if use_guidance:
                v_uncond, v_cond = v.chunk(2)
                v = v_uncond + guidance * (v_cond - v_uncond)
            x = scheduler.step(v, t, x).prev_sample
            if on_step:
                on_step(i + 1)
        return x


ADAPTER = DigitsMMDiTAdapter
