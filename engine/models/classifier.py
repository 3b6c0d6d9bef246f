"""The digits classifier: prompt accuracy from its predictions, FID features from its
penultimate layer (the embedded default's stand-in for Inception)."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class DigitClassifier(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, channels: tuple[int, int] = (32, 64), feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        c1, c2 = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16 -> 8
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8 -> 4
            nn.Flatten(),
            nn.Linear(c2 * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        self.dropout = nn.Dropout(0.2)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [-1, 1], shape [N, 1, 16, 16]."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images)))
