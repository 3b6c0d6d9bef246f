"""`engine train digits-unet`: the embedded text-to-image model, trained on the digits.

DDPM noise prediction (epsilon, cosine schedule, 1000 steps) with a small conditional
UNet2DConditionModel and its PromptEncoder, AdamW, EMA weights, 10% prompt dropout so that
classifier-free guidance works. A fixed seed makes it reproducible on one machine.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.data.digits import load_digits_16
from engine.models.loader import DIGITS_PIPELINE
from engine.train.common import PromptBatches, cosine_lr, ema_update, optimizer_step, save_pipeline


@dataclass
class UNetTrainConfig:
    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 100
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1
    seed: int = 0
    block_out_channels: tuple = (32, 64, 64)
    text_dim: int = 32
    max_length: int = 8


def build_models(cfg: UNetTrainConfig, vocab_ids: list[int]):
    from diffusers import UNet2DConditionModel

    from engine.models.prompt_encoder import PromptEncoder

    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=cfg.text_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    encoder = PromptEncoder(vocab_ids=vocab_ids, max_length=cfg.max_length, dim=cfg.text_dim)
    return unet, encoder


def scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")


def train_digits_unet(out: Path, cfg: UNetTrainConfig, log=print) -> dict:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    prompts = PromptBatches(cfg.max_length)
    vocab_ids = prompts.vocab_ids
    images, labels = load_digits_16()

    unet, encoder = build_models(cfg, vocab_ids)
    ema_unet, ema_encoder = copy.deepcopy(unet).eval(), copy.deepcopy(encoder).eval()
    sched = scheduler()
    alphas = sched.alphas_cumprod
    params = list(unet.parameters()) + list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    n_params = sum(p.numel() for p in unet.parameters())
    log(f"digits-unet: {n_params:,} UNet parameters, {cfg.steps} steps of batch {cfg.batch_size}")
    start, losses = time.time(), []
    for step in range(cfg.steps):
        x0, ids = prompts.sample(images, labels, cfg.batch_size, cfg.prompt_dropout, gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        states, _ = encoder(ids)
        loss = F.mse_loss(unet(xt, t, states).sample, noise)
        optimizer_step(opt, params, loss, cosine_lr(cfg.lr, step, cfg.steps, cfg.warmup))
        ema_update([(ema_unet, unet), (ema_encoder, encoder)], cfg.ema_decay)
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
            log(f"step {step + 1}/{cfg.steps} loss {sum(losses[-100:]) / len(losses[-100:]):.4f} "
                f"({time.time() - start:.0f} s)")
    out = Path(out)
    save_pipeline(out, DIGITS_PIPELINE, "unet", ema_unet, ema_encoder, sched)
    summary = {"train_config": asdict(cfg), "final_loss": sum(losses[-100:]) / len(losses[-100:]),
               "seconds": round(time.time() - start, 1), "unet_params": n_params}
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
