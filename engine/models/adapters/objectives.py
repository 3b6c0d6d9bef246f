"""The two training objectives of the supported denoisers, as adapter mixins.

- `NoisePrediction` (UNets: the digits UNet, SD 1.x / 2.x): called as `unet(x, t, states)`;
  x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise with the DDPM schedule of the scheduler config; the
  target is the noise (`epsilon`) or the velocity sqrt(a_t) noise - sqrt(1 - a_t) x_0
  (`v_prediction`, SD 2.x at 768 px).
- `RectifiedFlow` (MMDiTs: the digits MMDiT, SD 3.x): called as
  `transformer(x, states, pooled, t)`; x_t = (1 - sigma) x_0 + sigma noise, target noise - x_0,
  sigma on the flow-matching scheduler's training grid.
Timesteps are stratified over the whole schedule (engine.calibration.stratified).
"""

from __future__ import annotations

import torch

from engine.models.adapters.base import Conditioning


class NoisePrediction:
    flow = False

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.denoiser(x, t, cond.states).sample

    def noised(self, x0, noise, gen):
        from diffusers import DDPMScheduler

        from engine.calibration import stratified

        scheduler = DDPMScheduler.from_config(self.scheduler_config)
        prediction = scheduler.config.prediction_type
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"{self.path}: calibration needs a noise- or v-prediction model, not {prediction!r}")
        shape = (-1, *[1] * (x0.dim() - 1))
        timesteps = stratified(len(x0), scheduler.config.num_train_timesteps, gen)
        alphas = scheduler.alphas_cumprod[timesteps].float().view(shape)
        x_t = alphas.sqrt() * x0 + (1 - alphas).sqrt() * noise
        target = noise if prediction == "epsilon" else alphas.sqrt() * noise - (1 - alphas).sqrt() * x0
        return x_t, timesteps, target


class RectifiedFlow:
    flow = True

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.denoiser(x, cond.states, cond.pooled, t).sample

    def noised(self, x0, noise, gen):
        from diffusers import FlowMatchEulerDiscreteScheduler

        from engine.calibration import stratified

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        shape = (-1, *[1] * (x0.dim() - 1))
        index = stratified(len(x0), len(scheduler.timesteps), gen)
        sigma = scheduler.sigmas[index].float().view(shape)
        return (1 - sigma) * x0 + sigma * noise, scheduler.timesteps[index].float(), noise - x0
