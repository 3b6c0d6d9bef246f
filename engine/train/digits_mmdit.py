"""`engine train digits-mmdit`: the embedded MMDiT, a small SD 3-style text-to-image model.

A diffusers `SD3Transformer2DModel` (joint attention over image patches and prompt tokens,
adaLN modulation from the timestep and a pooled prompt vector) with the digits PromptEncoder,
trained the way SD 3 is trained: rectified flow, x_t = (1 - sigma) x0 + sigma noise, the model
predicts the velocity noise - x0; sigma is drawn logit-normal (`compute_density_for_timestep_sampling`)
and mapped to the timesteps and sigmas of diffusers' `FlowMatchEulerDiscreteScheduler`, as in
diffusers' SD 3 training script. AdamW with warm-up and cosine decay, EMA weights, 10% prompt
dropout for classifier-free guidance. A fixed seed makes it reproducible on one machine.
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
from engine.models.loader import DIGITS_MMDIT_PIPELINE
from engine.train.common import PromptBatches, cosine_lr, ema_update, optimizer_step, save_pipeline


@dataclass
class MMDiTTrainConfig:
    steps: int = 3600
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1
    logit_mean: float = 0.0
    logit_std: float = 1.0
    seed: int = 0
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 16
    text_dim: int = 32
    max_length: int = 8
    save_every: int = 0  # also save the EMA model every N steps (0: only at the end)


def build_models(cfg: MMDiTTrainConfig, vocab_ids: list[int]):
    from diffusers import SD3Transformer2DModel

    from engine.models.prompt_encoder import PromptEncoder

    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=1,
        out_channels=1,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.text_dim,
        caption_projection_dim=cfg.num_heads * cfg.head_dim,
        pooled_projection_dim=cfg.text_dim,
        pos_embed_max_size=8,  # 16 / patch 2 = an 8 x 8 grid of patches
    )
    encoder = PromptEncoder(vocab_ids=vocab_ids, max_length=cfg.max_length, dim=cfg.text_dim)
    return transformer, encoder


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def save_model(out: Path, transformer, encoder, sched) -> None:
    save_pipeline(out, DIGITS_MMDIT_PIPELINE, "transformer", transformer, encoder, sched)


def train_digits_mmdit(out: Path, cfg: MMDiTTrainConfig, log=print) -> dict:
    from diffusers.training_utils import compute_density_for_timestep_sampling

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    prompts = PromptBatches(cfg.max_length)
    vocab_ids = prompts.vocab_ids
    images, labels = load_digits_16()

    transformer, encoder = build_models(cfg, vocab_ids)
    ema_transformer, ema_encoder = copy.deepcopy(transformer).eval(), copy.deepcopy(encoder).eval()
    sched = scheduler()
    n_train = sched.config.num_train_timesteps
    params = list(transformer.parameters()) + list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    n_params = sum(p.numel() for p in transformer.parameters())
    log(f"digits-mmdit: {n_params:,} transformer parameters, {cfg.steps} steps of batch {cfg.batch_size}")
    out = Path(out)
    start, losses = time.time(), []
    for step in range(cfg.steps):
        x0, ids = prompts.sample(images, labels, cfg.batch_size, cfg.prompt_dropout, gen)
        noise = torch.randn(x0.shape, generator=gen)
        u = compute_density_for_timestep_sampling(
            "logit_normal", cfg.batch_size, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std, generator=gen
        )
        indices = (u * n_train).long().clamp(max=n_train - 1)
        timesteps = sched.timesteps[indices]
        sigma = sched.sigmas[indices].view(-1, 1, 1, 1)
        xt = (1 - sigma) * x0 + sigma * noise
        states, pooled = encoder(ids)
        pred = transformer(xt, states, pooled, timesteps).sample
        loss = F.mse_loss(pred, noise - x0)
        optimizer_step(opt, params, loss, cosine_lr(cfg.lr, step, cfg.steps, cfg.warmup))
        ema_update([(ema_transformer, transformer), (ema_encoder, encoder)], cfg.ema_decay)
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
            log(f"step {step + 1}/{cfg.steps} loss {sum(losses[-100:]) / len(losses[-100:]):.4f} "
                f"({time.time() - start:.0f} s)")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_model(out, ema_transformer, ema_encoder, sched)
    save_model(out, ema_transformer, ema_encoder, sched)
    summary = {"train_config": asdict(cfg), "final_loss": sum(losses[-100:]) / len(losses[-100:]),
               "seconds": round(time.time() - start, 1), "transformer_params": n_params}
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
