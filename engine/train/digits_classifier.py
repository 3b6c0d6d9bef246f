"""`engine train digits-classifier`: the embedded feature model for FID and prompt accuracy.

Trained on a fixed 80% split of the digits with small random shifts; accuracy is measured
on the held-out 20% and saved beside the weights.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.data.digits import load_digits_16, split_indices
from engine.models.loader import DIGITS_CLASSIFIER, write_index


@dataclass
class ClassifierTrainConfig:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0


def shift(images: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translation by up to max_shift pixels, padding with the background value -1."""
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=gen).tolist()
    return padded[:, :, dy : dy + images.shape[2], dx : dx + images.shape[3]]


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return (model(images).argmax(1) == labels).float().mean().item()


def train_digits_classifier(out: Path, cfg: ClassifierTrainConfig, log=print) -> dict:
    from engine.models.classifier import DigitClassifier

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    images, labels = load_digits_16()
    train_idx, test_idx = split_indices(len(images), held_out=0.2, seed=cfg.seed)
    xtr, ytr = images[train_idx], labels[train_idx]
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    start = time.time()
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(order), cfg.batch_size):
            b = order[i : i + cfg.batch_size]
            loss = F.cross_entropy(model(shift(xtr[b], gen)), ytr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if (epoch + 1) % 10 == 0:
            log(f"epoch {epoch + 1}/{cfg.epochs} held-out accuracy "
                f"{accuracy(model, images[test_idx], labels[test_idx]):.4f}")
    held_out = accuracy(model, images[test_idx], labels[test_idx])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    write_index(out, DIGITS_CLASSIFIER, {"classifier": ["engine", "DigitClassifier"]})
    summary = {"train_config": asdict(cfg), "held_out_accuracy": held_out,
               "train_size": len(train_idx), "held_out_size": len(test_idx),
               "seconds": round(time.time() - start, 1)}
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"held-out accuracy {held_out:.4f}")
    return summary
