"""Seeded, paired sampling through the model's adapter (engine.models.adapters).

Initial latents of sample i depend only on (seed, i): each sample has its own CPU generator,
seeded from the pair, so every variant of an experiment sees the same noise whatever the batch
size or device, and a subset of samples is a prefix of the full set. Latents are drawn batch by
batch (`InitialLatents`), so 5000 SD 3 samples never sit in memory at once.

Each batch: the adapter denoises its initial latents (`sample_batch`, with the family's
scheduler and classifier-free guidance) and decodes them (`decode`: the VAE, or identity for the
digits models) to images in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import numpy as np
import torch

Progress = Callable[[int, int], None]


EVALUATION, CALIBRATION, GENERATED = 0, 1, 2  # streams: noise that must never coincide


def sample_seed(seed: int, index: int, stream: int = EVALUATION) -> int:
    """The generator seed of sample `index` of `stream` seeded `seed` (63 bits). Streams keep the
    calibration noise apart from the evaluation's even when their seeds are equal."""
    entropy = [seed, index] if stream == EVALUATION else [seed, index, stream]
    state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
    return int(state) >> 1


class InitialLatents:
    """The initial latents of samples 0..n-1, drawn on demand: `latents[a:b]` is [b - a, *shape],
    `latents[i]` one sample's."""

    def __init__(self, n: int, shape: Sequence[int], seed: int, stream: int = EVALUATION):
        self.n, self.shape, self.seed, self.stream = n, tuple(shape), seed, stream

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, part: slice | int) -> torch.Tensor:
        if isinstance(part, int):
            return self[part : part + 1 if part != -1 else None][0]
        indices = range(self.n)[part]
        out = torch.empty((len(indices), *self.shape), dtype=torch.float32)
        for row, i in enumerate(indices):
            generator = torch.Generator(device="cpu").manual_seed(sample_seed(self.seed, i, self.stream))
            out[row] = torch.randn(self.shape, generator=generator, dtype=torch.float32)
        return out


def initial_noise(n: int, shape: Sequence[int], seed: int, stream: int = EVALUATION) -> torch.Tensor:
    """All n initial latents at once (small models, calibration sets)."""
    return InitialLatents(n, shape, seed, stream)[:]


@torch.no_grad()
def sample_images(
    model,
    prompts: list[str],
    noise: torch.Tensor | InitialLatents,
    steps: int,
    guidance: float,
    batch_size: int,
    on_progress: Progress | None = None,
    negative_prompt: str = "",
) -> torch.Tensor:
    """Images in [-1, 1], shape [N, C, H, W], on the CPU, from `model` (a PipelineAdapter).
    Progress counts denoising steps over all images: (images done x steps + steps of the
    current batch, N x steps)."""
    total = len(prompts) * steps
    out = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = prompts[start : start + batch_size]
        b = len(batch_prompts)
        report = (lambda i: on_progress(start * steps + b * i, total)) if on_progress else None
        latents = model.sample_batch(batch_prompts, noise[start : start + b], steps, guidance,
                                     negative_prompt=negative_prompt, on_step=report)
        out.append(model.decode(latents))
    return torch.cat(out)
