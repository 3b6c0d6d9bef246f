"""scikit-learn's bundled digits as a 16x16 text-to-image data set (works offline).

Images are 8x8 with values 0..16; they are scaled to [-1, 1] and upsampled to 16x16
(bilinear). Each image gets a prompt naming its class, such as "a handwritten digit seven".
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten digit {word}", "the number {word}", "a handwritten {digit}")
EVAL_TEMPLATE = TEMPLATES[0]
IMAGE_SIZE = 16


def prompt_for(label: int, template: str = EVAL_TEMPLATE) -> str:
    return template.format(word=WORDS[label], digit=label)


def all_prompt_words() -> list[str]:
    """Every prompt the data set can produce (for building a prompt encoder's vocabulary)."""
    return [prompt_for(d, t) for d in range(10) for t in TEMPLATES]


def load_digits_16() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as float32 images [N, 1, 16, 16] in [-1, 1] and int64 labels [N]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return images.clamp(-1, 1), torch.tensor(data.target, dtype=torch.int64)


def split_indices(n: int, held_out: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed train / held-out split of n items."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * (1 - held_out)))
    return np.sort(order[:cut]), np.sort(order[cut:])


def eval_labels(n: int) -> list[int]:
    """The class asked for by sample i of an evaluation: balanced, 0..9 repeating."""
    return [i % 10 for i in range(n)]
