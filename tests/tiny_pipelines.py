"""Tiny random diffusers pipelines in the real formats, built offline in about a second.

- `build_sd(path)`: a `StableDiffusionPipeline` (SD 1.x layout): transformers `CLIPTextModel`, a
  BPE tokenizer trained here with `tokenizers` (wrapped in `PreTrainedTokenizerFast`), a
  cross-attention `UNet2DConditionModel`, an `AutoencoderKL` (scale factor 2) and `DDIMScheduler`.
- `build_sd3(path, t5=True)`: a `StableDiffusion3Pipeline`: two `CLIPTextModelWithProjection`, a
  `T5EncoderModel` (left out with `t5=False`, as SD 3.x users drop it), an `SD3Transformer2DModel`
  (patch 2), an SD 3-style VAE (16 latent channels, shift factor) and the flow-matching scheduler.

Both generate 16x16 RGB images by default (latents 8x8) and are saved with `save_pretrained`,
so they load exactly as a downloaded model folder does.
"""

from __future__ import annotations

from pathlib import Path

PROMPTS = ["a photo of a cat", "a red car on a street", "two dogs playing in the snow",
           "a bowl of fruit on a wooden table", "a man riding a horse", "a city at night"]
SPECIAL = {"bos": "<|startoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>", "unk": "<|endoftext|>"}


def tokenizer(max_length: int = 16):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=[SPECIAL["bos"], SPECIAL["eos"]])
    tok.train_from_iterator(PROMPTS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"],
                                   pad_token=SPECIAL["pad"], unk_token=SPECIAL["unk"], model_max_length=max_length)


def clip_config(projection_dim: int | None = None, vocab_size: int = 200):
    from transformers import CLIPTextConfig

    extra = {"projection_dim": projection_dim} if projection_dim else {}
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, **extra)


def build_sd(path: Path, seed: int = 0) -> Path:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel(clip_config()).eval(), tokenizer=tokenizer(), unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def build_sd3(path: Path, t5: bool = True, seed: int = 0) -> Path:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16, shift_factor=0.0609, scaling_factor=1.5035,
                        use_quant_conv=False, use_post_quant_conv=False)
    text_encoder_3 = tokenizer_3 = None
    if t5:
        text_encoder_3 = T5EncoderModel(T5Config(vocab_size=200, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                 num_heads=4, decoder_start_token_id=0, pad_token_id=1,
                                                 eos_token_id=1)).eval()
        tokenizer_3 = tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=CLIPTextModelWithProjection(clip_config(projection_dim=32)).eval(), tokenizer=tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(clip_config(projection_dim=32)).eval(), tokenizer_2=tokenizer(),
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)
