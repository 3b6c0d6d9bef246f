"""What the two embedded digits pipelines share: a `PromptEncoder` over open_clip's tokenizer,
class prompts with labels ("a handwritten digit seven"), the digits images as calibration data,
and pixels as latents (no VAE)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch

from engine.models.adapters.base import Conditioning, PipelineAdapter


class DigitsAdapter(PipelineAdapter):
    auto_dtype = torch.float32  # tiny models: float32 on every device, as they were trained and measured

    def __init__(self, info, options, device):
        import diffusers

        from engine.models.prompt_encoder import PromptEncoder

        super().__init__(info, options, device)
        index = json.loads((self.path / "model_index.json").read_text())
        self.kind = info.class_name
        folder = info.family.denoiser
        class_name = index[folder][1]
        load = {"low_cpu_mem_usage": False, "dtype": self.dtype}
        denoiser = getattr(diffusers, class_name).from_pretrained(self.path / folder, **load)
        text_encoder = PromptEncoder.from_pretrained(self.path / "text_encoder", **load)
        self.scheduler_config = json.loads((self.path / "scheduler" / "scheduler_config.json").read_text())
        self.denoiser = denoiser.to(self.device).eval()
        self.text_encoder = text_encoder.to(self.device).eval()
        self.tokenizer_name = index.get("tokenizer", ["open_clip", "ViT-B-32"])[1]
        self.max_length = text_encoder.config.max_length

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        import open_clip

        return open_clip.get_tokenizer(self.tokenizer_name)(list(prompts), context_length=self.max_length)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        states, pooled = self.text_encoder(self.tokenize(prompts).to(self.device))
        return Conditioning(states, pooled)

    def scheduler(self, default: str):
        """The experiment's scheduler class, or `default`, from the model's scheduler config."""
        import diffusers

        from engine.models.loader import ModelLoadError

        name = self.options.scheduler or default
        cls = getattr(diffusers, name, None)
        if cls is None or not hasattr(cls, "from_config"):
            raise ModelLoadError(f"{self.path}: no diffusers scheduler {name!r}")
        return cls.from_config(self.scheduler_config)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1).float().cpu()

    @property
    def cache_modules(self):
        return (self.denoiser, self.text_encoder)

    def eval_prompts(self, n, prompts):
        from engine.data.digits import eval_labels, prompt_for

        labels = eval_labels(n)
        return [prompt_for(label) for label in labels], labels

    def calibration_prompts(self, n, gen, prompts):
        from engine.data.digits import TEMPLATES, prompt_for

        digits = torch.randint(0, 10, (n,), generator=gen).tolist()
        templates = torch.randint(0, len(TEMPLATES), (n,), generator=gen).tolist()
        return [prompt_for(d, TEMPLATES[t]) for d, t in zip(digits, templates)]

    def calibration_split(self, n, m, gen, prompts):
        """Split by wording, not by class (there are 10 digits, and the model must be calibrated
        on every one it is evaluated on): calibration prompts use the training wordings other
        than the evaluation's, held-out prompts the evaluation's; every digit equally often."""
        from engine.data.digits import EVAL_TEMPLATE, TEMPLATES, prompt_for

        calibration_templates = [t for t in TEMPLATES if t != EVAL_TEMPLATE]
        digits = [(torch.arange(k) % 10)[torch.randperm(k, generator=gen)].tolist() for k in (n, m)]
        templates = torch.randint(0, len(calibration_templates), (n,), generator=gen).tolist()
        calibration = [prompt_for(d, calibration_templates[t]) for d, t in zip(digits[0], templates)]
        return calibration, [prompt_for(d, EVAL_TEMPLATE) for d in digits[1]]

    def calibration_source(self, samples, seed, prompts, **generation):
        return digits_training_data()  # nothing is generated: `generation` does not apply

    def calibration_key(self, calibration, prompts, **generation):
        return calibration  # the digits data are fixed


def digits_training_data() -> tuple[torch.Tensor, list[list[str]]]:
    """The digits images and, for each, its prompt under every training template."""
    from engine.data.digits import TEMPLATES, load_digits_16, prompt_for

    images, labels = load_digits_16()
    return images, [[prompt_for(int(label), t) for t in TEMPLATES] for label in labels]
