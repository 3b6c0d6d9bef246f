"""Stable Diffusion 1.5 and 3.5 Medium folders in their published configurations, with random
weights, built offline: what `bench/bench_scale.py` runs the engine on.

The configurations are the published ones (the model cards' `config.json` files, as facts):
- SD 1.5: `UNet2DConditionModel` (block_out_channels 320/640/1280/1280, 2 layers per block,
  cross-attention width 768, 8 heads; 860M parameters), CLIP ViT-L/14's text tower (12 layers,
  width 768, quick-GELU; 123M), the SD VAE (4 latent channels, scaling 0.18215; 84M), and the
  pipeline's PNDM scheduler (scaled-linear betas 0.00085-0.012, PRK steps skipped).
- SD 3.5 Medium: `SD3Transformer2DModel` MMDiT-X (24 blocks of width 1536, 24 heads of 64,
  dual attention in blocks 0-12, RMS qk-norm, patch 2, joint_attention_dim 4096,
  pooled_projection_dim 2048; 2.24B parameters), CLIP-L and CLIP-G (32 layers, width 1280;
  695M) with projections, the SD 3 VAE (16 latent channels, scaling 1.5305, shift 0.0609), the
  flow-matching Euler scheduler (shift 3.0), and no T5 (`text_encoder_3`), as many users run it.
Weights are random (normal, the modules' own initialisation) and saved as `*.fp16.safetensors`
(the fp16 variant, as the hub ships them). The tokenizers are BPE vocabularies trained here on a
few prompts (ids below 200 of CLIP's 49408): token statistics differ from CLIP's, shapes do not.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

PROMPTS = ["a photo of a cat sitting on a windowsill", "a red car parked on a city street at night",
           "two dogs playing in the snow", "a bowl of fruit on a wooden table", "a man riding a horse on a beach",
           "a lighthouse on a cliff at sunset", "a plate of pasta with tomato sauce", "an astronaut in a desert"]
SD3_MEDIUM_DUAL_LAYERS = tuple(range(13))


def tokenizer(max_length: int = 77):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = {"bos": "<|startoftext|>", "eos": "<|endoftext|>"}
    tok = Tokenizer(models.BPE(unk_token=special["eos"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(PROMPTS * 4, trainers.BpeTrainer(vocab_size=200, special_tokens=list(special.values())))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special["bos"], eos_token=special["eos"],
                                   pad_token=special["eos"], unk_token=special["eos"], model_max_length=max_length)


def clip_text(hidden: int, layers: int, heads: int, intermediate: int, act: str, projection: int | None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=intermediate,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            hidden_act=act, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                            **({"projection_dim": projection} if projection else {}))
    return (CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)).eval()


def vae(latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         **extra)


def sd15_pipeline():
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    return StableDiffusionPipeline(
        vae=vae(4, sample_size=512, scaling_factor=0.18215), unet=unet, scheduler=scheduler, tokenizer=tokenizer(),
        text_encoder=clip_text(768, 12, 12, 3072, "quick_gelu", None),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sd35_medium_pipeline(blocks: int = 24):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=blocks, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, qk_norm="rms_norm",
        dual_attention_layers=tuple(i for i in SD3_MEDIUM_DUAL_LAYERS if i < blocks))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae(16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False),
        text_encoder=clip_text(768, 12, 12, 3072, "quick_gelu", 768), tokenizer=tokenizer(),
        text_encoder_2=clip_text(1280, 32, 20, 5120, "gelu", 1280), tokenizer_2=tokenizer(),
        text_encoder_3=None, tokenizer_3=None)


BUILDERS = {"sd15": sd15_pipeline, "sd35m": sd35_medium_pipeline}


def build(kind: str, path: Path, blocks: int | None = None, seed: int = 0, log=print) -> Path:
    """Build (once: an existing folder with its marker is reused) and save a pipeline folder."""
    import torch

    path = Path(path)
    marker = path / "qtui_bench.json"
    if marker.exists():
        return path
    start = time.time()
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16 if kind == "sd35m" else torch.float32)  # halves SD 3.5's build memory
    try:
        pipe = BUILDERS[kind](blocks) if blocks else BUILDERS[kind]()
    finally:
        torch.set_default_dtype(previous)
    pipe.to(torch.float16)
    pipe.save_pretrained(path, safe_serialization=True, variant="fp16")
    counts = {name: sum(p.numel() for p in module.parameters())
              for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    marker.write_text(json.dumps({"kind": kind, "blocks": blocks, "seed": seed, "parameters": counts}, indent=1))
    log(f"built {kind}{f' ({blocks} blocks)' if blocks else ''} in {time.time() - start:.0f} s: "
        + ", ".join(f"{k} {v / 1e6:.0f}M" for k, v in counts.items()))
    return path


def parameters(path: Path) -> dict[str, int]:
    return json.loads((Path(path) / "qtui_bench.json").read_text())["parameters"]


if __name__ == "__main__":
    import sys

    import torch

    with torch.device("meta"):
        for kind in ("sd15", "sd35m"):
            pipe = BUILDERS[kind]()
            print(kind, {n: round(sum(p.numel() for p in m.parameters()) / 1e6, 1)
                         for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)})
    sys.exit(0)
