"""What the adapters of real diffusers pipelines (SD 1.x / 2.x, SD 3.x) share: loading a local
folder offline, the experiment's scheduler, sampling through the pipeline's own `__call__` with
given prompt embeddings and initial latents, and decoding with the VAE.

Loading builds each model empty and fills it from its files (`low_cpu_mem_usage`, through
`accelerate`), so a pipeline never holds random weights beside its loaded ones (SD 3.5 Medium
took 10-11 GiB to load its 6.3 GB without it); the denoiser, the largest, is read tensor by tensor
without a memory map (`engine.models.stream_load`). Loading never downloads: `HF_HUB_OFFLINE=1`
is set and `local_files_only=True` is passed; only safetensors weights are read. `transformers` is imported here, never at qtui or engine start-up.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from engine.models.adapters.base import Conditioning, PipelineAdapter


class DiffusersAdapter(PipelineAdapter):
    pipeline_class: str  # diffusers class name
    denoiser_attr: str  # "unet" or "transformer"

    def load_kwargs(self) -> dict:
        return {}

    def __init__(self, info, options, device):
        super().__init__(info, options, device)
        os.environ["HF_HUB_OFFLINE"] = "1"
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

        self.kind = info.class_name
        try:
            denoiser = self._load_denoiser(diffusers)
            pipe = getattr(diffusers, self.pipeline_class).from_pretrained(
                self.path, dtype=self.dtype, local_files_only=True, use_safetensors=True, variant=info.variant,
                low_cpu_mem_usage=True, **{self.denoiser_attr: denoiser}, **self.load_kwargs())
        except (OSError, ValueError, EnvironmentError) as exc:
            from engine.models.loader import ModelLoadError

            raise ModelLoadError(f"{self.path}: cannot load {self.pipeline_class} ({exc})") from None
        if options.scheduler:
            pipe.scheduler = self._scheduler(diffusers, pipe.scheduler, options.scheduler)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self.denoiser.eval()
        self.scheduler_config = dict(pipe.scheduler.config)

    def _load_denoiser(self, diffusers):
        """The denoiser, read tensor by tensor (engine.models.stream_load): the largest component,
        whose memory-mapped file would otherwise stay resident beside its converted weights."""
        from engine.models.loader import read_index
        from engine.models.stream_load import load_model

        folder = self.path / self.denoiser_attr
        _, class_name = read_index(self.path)[self.denoiser_attr]
        ships = self.info.variant and any(f".{self.info.variant}" in f.name for f in folder.glob("*.safetensors*"))
        variant = self.info.variant if ships else None
        return load_model(getattr(diffusers, class_name), folder, variant, self.dtype)

    def denoiser_slot(self):
        return self.pipe, self.denoiser_attr  # what `pipe(...)` calls

    def _scheduler(self, diffusers, current, name: str):
        from engine.models.loader import ModelLoadError

        compatible = sorted(c.__name__ for c in current.compatibles)
        cls = getattr(diffusers, name, None)
        if cls is None or name not in compatible + [type(current).__name__]:
            raise ModelLoadError(f"{self.path}: scheduler {name!r} does not fit this pipeline; compatible: "
                                 f"{', '.join(compatible)}")
        return cls.from_config(current.config)

    @property
    def cache_modules(self):
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return (self.denoiser, *[getattr(self.pipe, n) for n in names if getattr(self.pipe, n, None) is not None])

    def call_kwargs(self, cond: Conditioning, negative: Conditioning | None) -> dict:
        """The prompt-embedding arguments of the pipeline's `__call__`."""
        return {"prompt_embeds": cond.states, "negative_prompt_embeds": None if negative is None else negative.states}

    @torch.no_grad()
    def sample_batch(self, prompts: Sequence[str], latents, steps, guidance, negative_prompt="", on_step=None):
        cond = self.encode(prompts)
        negative = self.encode([negative_prompt] * len(prompts)) if guidance > 1 else None

        def callback(pipe, i, t, kwargs):
            # Some schedulers take more denoiser calls than `steps` (PNDM's warm-up): progress
            # counts the schedule's own length, scaled to `steps`, so it ends at steps exactly.
            if on_step:
                on_step((i + 1) * steps // max(len(pipe.scheduler.timesteps), 1))
            return kwargs

        out = self.pipe(**self.call_kwargs(cond, negative), latents=latents.to(self.device, self.dtype),
                        num_inference_steps=steps, guidance_scale=guidance, height=self.height, width=self.width,
                        output_type="latent", callback_on_step_end=callback)
        return out.images

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.pipe.vae.config.scaling_factor

    def scale(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's latents as the denoiser sees them (the inverse of `unscale`)."""
        return latents * self.pipe.vae.config.scaling_factor

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Clean latents (float32, CPU) of images in [-1, 1]: a seeded draw from the VAE's
        latent distribution, scaled (training data for method `qat`)."""
        vae = self.pipe.vae
        dist = vae.encode(images.to(self.device, vae.dtype)).latent_dist
        return self.scale(dist.sample(generator=gen)).float().cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        images = vae.decode(self.unscale(latents.to(self.device, vae.dtype)), return_dict=False)[0]
        return images.clamp(-1, 1).float().cpu()
