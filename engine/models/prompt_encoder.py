"""A small learned prompt encoder, the digits models' stand-in for CLIP's text tower.

Token ids come from open_clip's tokenizer (so every sequence starts with the start-of-text
token, as in Stable Diffusion). Only the ids of a known vocabulary get their own embedding;
anything else maps to one shared unknown embedding, which keeps the table tiny.
Returns per-token states (for cross-attention) and a pooled vector (for MMDiT-style models).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class PromptEncoder(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        vocab_ids: list[int] = (),
        max_length: int = 12,
        dim: int = 32,
        num_layers: int = 1,
        num_heads: int = 4,
        eot_token_id: int = 49407,
    ):
        super().__init__()
        self.register_buffer("vocab", torch.tensor(sorted(set(vocab_ids)), dtype=torch.int64), persistent=False)
        self.token_embedding = nn.Embedding(len(self.vocab) + 1, dim)  # last row: unknown
        self.position_embedding = nn.Parameter(torch.zeros(max_length, dim))
        layer = nn.TransformerEncoderLayer(dim, num_heads, dim * 2, dropout=0.0, batch_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(dim)

    def local_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.searchsorted(self.vocab, input_ids).clamp(max=len(self.vocab) - 1)
        known = self.vocab[pos] == input_ids
        return torch.where(known, pos, torch.full_like(pos, len(self.vocab)))

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = input_ids[:, : self.config.max_length]
        x = self.token_embedding(self.local_ids(input_ids)) + self.position_embedding[: input_ids.shape[1]]
        x = self.final_norm(self.layers(x))
        eot = (input_ids == self.config.eot_token_id).int().argmax(dim=1)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        return x, pooled
