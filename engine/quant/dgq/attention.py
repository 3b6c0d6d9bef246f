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

Memory: the probabilities are computed, recorded, quantized and multiplied with the values in
row blocks of at most `chunk_elements` (`chunks.chunk_plan`), never as the whole [batch x heads,
queries, keys] matrix. With per-prompt deltas and more than one block, a first pass over the
blocks finds each prompt's maximum (scores and softmax only, no product with the values) and a
second quantizes with it: the softmax is computed twice, the matrix never held. Every row is its
own softmax, so the result is the unblocked computation's (bit for bit on the CPU, where the
products of a block of rows are those of the whole).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.quant.dgq import chunks
from engine.quant.dgq.chunks import Chunk, chunk_plan
from engine.quant.dgq.log_quant import fake_quant, uniform_fake_quant
from engine.quant.dgq.softmax_stats import SoftmaxRecorder, prompt_maxima, row_maxima

BUFFERS = ("softmax_delta", "softmax_lo")


@dataclass(frozen=True)
class SoftmaxSettings:
    bits: int
    log: bool = True
    start_fp: bool = True
    prompt_scaling: bool = True
    minmax: bool = False  # the baseline: uniform over the calibrated min and max, nothing else

    def keeps_start(self, cross: bool) -> bool:
        return cross and self.start_fp and not self.minmax

    @property
    def per_prompt(self) -> bool:
        return self.prompt_scaling and not self.minmax


def quantize_rows(probs: torch.Tensor, settings: SoftmaxSettings, cross: bool, delta: torch.Tensor,
                  lo: torch.Tensor) -> torch.Tensor:
    """Quantized probabilities of a block [bh, q, k]; `delta` broadcasts against it (the stored
    buffer, or each row's prompt delta [bh, 1, 1]), `lo` the stored buffer (min-max only)."""
    if settings.minmax:
        return uniform_fake_quant(probs, lo, delta, settings.bits)
    # Quantizing the whole (contiguous) block and putting the start column back is faster
    # than quantizing a strided slice and concatenating; the column is the original, bit for bit.
    q = fake_quant(probs, delta, settings.bits, settings.log)
    if settings.keeps_start(cross):
        q[..., 0] = probs[..., 0]
    return q


class QuantSoftmaxAttnProcessor:
    """diffusers' attention computation with the softmax output recorded (calibration) and/or
    quantized (`active`) between the softmax and the product with the values, in row blocks of
    at most `chunk_elements` probabilities (default `chunks.MAX_ELEMENTS`)."""

    def __init__(self, name: str, settings: SoftmaxSettings, chunk_elements: int | None = None):
        self.name, self.settings = name, settings
        self.chunk_elements = chunks.MAX_ELEMENTS if chunk_elements is None else chunk_elements
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
        hidden_states = self.attend(attn, attn.head_to_batch_dim(query), key, value, attention_mask, cross)
        hidden_states = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(hidden_states)))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def attend(self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None, cross: bool) -> torch.Tensor:
        """softmax(q k^T scale + mask), recorded and/or quantized, times v: [bh, q, d] per block
        (diffusers' `get_attention_scores` on each block, so upcasting and masks are its own)."""
        bh, queries, keys = query.shape[0], query.shape[1], key.shape[1]
        plan = chunk_plan(bh, queries, keys, self.chunk_elements)

        def probs_of(chunk: Chunk) -> torch.Tensor:
            rows = mask
            if mask is not None:
                rows = mask[chunk.heads] if mask.shape[1] == 1 else mask[chunk.heads, chunk.queries]
            return attn.get_attention_scores(query[chunk.heads, chunk.queries], key[chunk.heads], rows)

        prompt_delta = None  # each head-batch row's delta [bh, 1, 1] with per-prompt scaling
        if self.active and self.settings.per_prompt and len(plan) > 1:
            prompt_delta = self.prompt_deltas(attn, plan, probs_of, cross)
        if self.recorder is not None:
            self.recorder.begin(bh, queries, keys, attn.heads, cross)
        out = None
        for chunk in plan:
            probs = probs_of(chunk)
            if self.recorder is not None:
                self.recorder.update(probs, chunk)
            if self.active:
                if self.settings.per_prompt and prompt_delta is None:  # one block: the whole matrix
                    prompt_delta = self.row_deltas(row_maxima(probs, self.settings.keeps_start(cross)), attn.heads)
                delta = attn.softmax_delta if prompt_delta is None else prompt_delta[chunk.heads]
                probs = quantize_rows(probs, self.settings, cross, delta, attn.softmax_lo).to(probs.dtype)
            block = torch.bmm(probs, value[chunk.heads])
            if len(plan) == 1:
                out = block
            else:
                if out is None:
                    out = block.new_empty(bh, queries, block.shape[-1])
                out[chunk.heads, chunk.queries] = block
            del probs, block  # before the next block's scores: one block's probabilities alive, not two
        if self.recorder is not None:
            self.recorder.end(bh, queries)
        return out

    def prompt_deltas(self, attn: nn.Module, plan: list[Chunk], probs_of, cross: bool) -> torch.Tensor:
        """First pass: each head-batch row's prompt delta [bh, 1, 1], block by block."""
        keep = self.settings.keeps_start(cross)
        maxima = None
        for chunk in plan:
            block = row_maxima(probs_of(chunk), keep)
            if maxima is None:
                maxima = torch.full((plan[-1].bh1,), float("-inf"), dtype=block.dtype, device=block.device)
            rows = maxima[chunk.heads]
            torch.maximum(rows, block, out=rows)
        return self.row_deltas(maxima, attn.heads)

    @staticmethod
    def row_deltas(maxima: torch.Tensor, heads: int) -> torch.Tensor:
        """Per-row maxima [bh] -> each row's prompt delta (its prompt's maximum over heads) [bh, 1, 1]."""
        return prompt_maxima(maxima, heads).repeat_interleave(heads).view(-1, 1, 1)


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
