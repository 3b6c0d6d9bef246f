"""What the embedded models' training loops share: the prompt batches, the learning-rate
schedule, the optimizer step with gradient clipping, and the EMA update."""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.data.digits import TEMPLATES, all_prompt_words, prompt_for

TOKENIZER = "ViT-B-32"


class PromptBatches:
    """Token ids of every (class, template) prompt and of the empty prompt (for guidance)."""

    def __init__(self, max_length: int):
        import open_clip

        tokenizer = open_clip.get_tokenizer(TOKENIZER)
        self.vocab_ids = sorted(set(tokenizer(all_prompt_words() + [""], context_length=max_length).flatten().tolist()))
        self.table = torch.stack(
            [tokenizer([prompt_for(d, t) for t in TEMPLATES], context_length=max_length) for d in range(10)]
        )  # [10, templates, max_length]
        self.empty = tokenizer([""], context_length=max_length)[0]

    def sample(self, images, labels, batch_size: int, dropout: float, gen: torch.Generator):
        """A random batch of images and the token ids of a random prompt naming each one's
        class, replaced by the empty prompt with probability `dropout`."""
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x0, y = images[idx], labels[idx]
        ids = self.table[y, torch.randint(0, len(TEMPLATES), (batch_size,), generator=gen)]
        ids[torch.rand(batch_size, generator=gen) < dropout] = self.empty
        return x0, ids


def cosine_lr(base: float, step: int, steps: int, warmup: int) -> float:
    # float32 cosine, as the shipped models were trained with
    return base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(step / steps * math.pi)).item())


def optimizer_step(opt: torch.optim.Optimizer, params: list, loss: torch.Tensor, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


@torch.no_grad()
def ema_update(pairs: list[tuple[nn.Module, nn.Module]], decay: float) -> None:
    for ema, model in pairs:
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)


def save_pipeline(out, kind: str, folder: str, denoiser: nn.Module, encoder: nn.Module, sched) -> None:
    """Save a digits pipeline directory: denoiser, prompt encoder, scheduler, model_index.json."""
    from pathlib import Path

    from engine.models.loader import write_index

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    denoiser.save_pretrained(out / folder)
    encoder.save_pretrained(out / "text_encoder")
    sched.save_pretrained(out / "scheduler")
    write_index(out, kind, {
        folder: ["diffusers", type(denoiser).__name__],
        "text_encoder": ["engine", "PromptEncoder"],
        "scheduler": ["diffusers", type(sched).__name__],
        "tokenizer": ["open_clip", TOKENIZER],
    })
