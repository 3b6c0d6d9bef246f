"""Quantized attention scores through diffusers' attention-processor interface.

`QuantSoftmaxAttnProcessor` computes attention as diffusers' `AttnProcessor` does (explicit
softmax probabilities, which the fused SDPA kernel never materializes) and quantizes the
probabilities before they multiply the values. Per module, set with `Attention.set_processor`,
so any diffusers model built from `Attention` blocks (the digits UNet, a Stable Diffusion UNet)
takes it unchanged; joint attention (MMDiT, `add_q_proj`) is refused.

What is quantized, with `SoftmaxSettings`:
- `minmax` (the baseline): uniform over the calibrated [min, max] of each module's
  probabilities, one grid per tensor, no other trick.
- DGQ: log2 (or, `log = False`, uniform over [0, delta]) with delta the calibrated one
  (chosen among high percentiles by least squared error) or, with `prompt_scaling`, the
  maximum probability of each prompt (batch element: the unconditional and conditional halves
  of a guidance pair are separate prompts) over its heads, queries and non-start keys.
  With `start_fp`, in cross-attention the column of the start token (key 0: every prompt
  starts with the tokenizer's start-of-text token) is kept in full precision and left out of
  delta. Self-attention has no start token; its delta per prompt is over all keys.

The calibrated delta (and min for the baseline) are buffers of the Attention module
(`softmax_delta`, `softmax_lo`), so they travel in the run's checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.quant.dgq.log_quant import fake_quant, uniform_fake_quant

BUFFERS = ("softmax_delta", "softmax_lo")
SAMPLES_PER_CALL = 4096
MAX_SAMPLES = 1_000_000


@dataclass(frozen=True)
class SoftmaxSettings:
    bits: int
    log: bool = True
    start_fp: bool = True
    prompt_scaling: bool = True
    minmax: bool = False  # the baseline: uniform over the calibrated min and max, nothing else

    def keeps_start(self, cross: bool) -> bool:
        return cross and self.start_fp and not self.minmax


def as_per_prompt(probs: torch.Tensor, heads: int) -> torch.Tensor:
    """[B * heads, Nq, Nk] (diffusers' head_to_batch_dim order) -> [B, heads, Nq, Nk]."""
    return probs.view(probs.shape[0] // heads, heads, *probs.shape[1:])


def prompt_deltas(p4: torch.Tensor, keep_start: bool) -> torch.Tensor:
    """Each prompt's maximum probability over heads, queries and (non-start) keys: [B, 1, 1, 1]."""
    body = p4[..., 1:] if keep_start else p4
    return body.amax(dim=(1, 2, 3), keepdim=True)


def quantize_probs(p4: torch.Tensor, settings: SoftmaxSettings, cross: bool, delta: torch.Tensor,
                   lo: torch.Tensor) -> torch.Tensor:
    """The quantized probabilities [B, heads, Nq, Nk]; `delta`/`lo` are the stored buffers."""
    if settings.minmax:
        return uniform_fake_quant(p4, lo, delta, settings.bits)
    keep = settings.keeps_start(cross)
    if settings.prompt_scaling:
        delta = prompt_deltas(p4, keep)
    # Quantizing the whole (contiguous) tensor and putting the start column back is faster
    # than quantizing a strided slice and concatenating; the column is the original, bit for bit.
    q = fake_quant(p4, delta, settings.bits, settings.log)
    if keep:
        q[..., 0] = p4[..., 0]
    return q


class SoftmaxRecorder:
    """Calibration statistics of one module's probabilities: min, max, a seeded sample of the
    values its quantizer will see, the start token's mean share (cross-attention) and the mean
    per-prompt delta."""

    def __init__(self, settings: SoftmaxSettings, seed: int):
        self.settings = settings
        self.generator = torch.Generator().manual_seed(seed)
        self.lo, self.hi = float("inf"), float("-inf")
        self.samples: list[torch.Tensor] = []
        self.kept = 0
        self.start_sum = self.start_n = 0.0
        self.delta_sum = self.prompts = 0.0
        self.cross = None

    def update(self, p4: torch.Tensor, cross: bool) -> None:
        p4 = p4.detach().float()
        self.cross = cross
        keep = self.settings.keeps_start(cross)
        body = p4[..., 1:] if keep else p4
        self.lo, self.hi = min(self.lo, body.min().item()), max(self.hi, body.max().item())
        if self.kept < MAX_SAMPLES:
            flat = body.reshape(-1)
            idx = torch.randint(0, flat.numel(), (min(SAMPLES_PER_CALL, flat.numel()),), generator=self.generator)
            self.samples.append(flat[idx.to(flat.device)].cpu())
            self.kept += idx.numel()
        if cross:
            self.start_sum += p4[..., 0].sum().item()
            self.start_n += p4[..., 0].numel()
        deltas = prompt_deltas(p4, keep)
        self.delta_sum += deltas.sum().item()
        self.prompts += deltas.numel()

    def values(self) -> torch.Tensor:
        return torch.cat(self.samples)

    @property
    def start_share(self) -> float | None:
        return self.start_sum / self.start_n if self.start_n else None

    @property
    def mean_prompt_delta(self) -> float | None:
        return self.delta_sum / self.prompts if self.prompts else None


class QuantSoftmaxAttnProcessor:
    """diffusers' attention computation with the softmax output recorded (calibration) and/or
    quantized (`active`) between the softmax and the product with the values."""

    def __init__(self, name: str, settings: SoftmaxSettings):
        self.name, self.settings = name, settings
        self.recorder: SoftmaxRecorder | None = None
        self.active = False

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        cross = encoder_hidden_states is not None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), key, attention_mask)
        probs = self.process(attn, probs, cross)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def process(self, attn: nn.Module, probs: torch.Tensor, cross: bool) -> torch.Tensor:
        p4 = as_per_prompt(probs, attn.heads)
        if self.recorder is not None:
            self.recorder.update(p4, cross)
        if not self.active:
            return probs
        out = quantize_probs(p4, self.settings, cross, attn.softmax_delta, attn.softmax_lo)
        return out.reshape(probs.shape).to(probs.dtype)


def attention_modules(denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
    """The diffusers `Attention` modules of a denoiser; ValueError for joint attention."""
    from diffusers.models.attention_processor import Attention

    out = []
    for name, module in denoiser.named_modules():
        if isinstance(module, Attention):
            if getattr(module, "add_q_proj", None) is not None or getattr(module, "added_kv_proj_dim", None):
                raise ValueError(f"{name}: joint attention (MMDiT) is not supported by dgq; it quantizes "
                                 "the self- and cross-attention of UNet-style denoisers")
            out.append((name, module))
    return out


def set_softmax_buffers(module: nn.Module, delta: float, lo: float) -> None:
    device = next(module.parameters()).device
    module.register_buffer("softmax_delta", torch.tensor(delta, dtype=torch.float32, device=device))
    module.register_buffer("softmax_lo", torch.tensor(lo, dtype=torch.float32, device=device))


def remove_softmax_buffers(module: nn.Module) -> None:
    for key in BUFFERS:
        module._buffers.pop(key, None)
