"""Feature models for FID behind one interface: `extract(images) -> (features, predictions)`.

- `ClassifierFeatures`: the embedded digits classifier. Features are its penultimate layer
  (128-d) on the images as sampled (float, [-1, 1], 1x16x16); its predicted classes give
  prompt accuracy.
- `InceptionFeatures`: pytorch-fid's InceptionV3 pool3 (2048-d). Images are first quantized to
  8-bit levels and scaled to [0, 1], exactly what pytorch-fid gets from a saved PNG
  (`ToTensor`), grey repeated to RGB as PIL's `convert("RGB")` does; the network then resizes
  to 299x299 and maps to [-1, 1] itself. No predictions.

`extract_uint8` takes images as stored in image files (uint8, [N, C, H, W]) for reference
folders. `id` names the model and its weights (a content digest), so cached reference
statistics are never reused with another feature model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.metrics.clip_score import file_digest

INCEPTION = "inception"


class FeatureModelError(Exception):
    pass


class ClassifierFeatures:
    def __init__(self, classifier: torch.nn.Module, model_id: str, batch_size: int = 500):
        self.classifier, self.id, self.batch_size = classifier, model_id, batch_size
        self.dim = int(classifier.config.feature_dim)
        self.device = next(classifier.parameters()).device

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Features [N, d] (float64) and predicted classes [N] of images in [-1, 1]."""
        feats, preds = [], []
        for start in range(0, len(images), self.batch_size):
            f = self.classifier.features(images[start : start + self.batch_size].to(self.device))
            feats.append(f.double().cpu())
            preds.append(self.classifier.head(f).argmax(1).cpu())
        return torch.cat(feats).numpy(), torch.cat(preds).numpy()

    def extract_uint8(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.asarray(images)).float() / 127.5 - 1.0
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        if tuple(x.shape[1:]) != (1, 16, 16):
            raise FeatureModelError(f"the digits classifier takes 16x16 grey images, got {tuple(x.shape[1:])}")
        return self.extract(x)[0]


class InceptionFeatures:
    dim = 2048

    def __init__(self, network: torch.nn.Module, model_id: str, batch_size: int = 50):
        self.network, self.id, self.batch_size = network, model_id, batch_size
        self.device = next(network.parameters()).device

    @torch.no_grad()
    def features01(self, images: torch.Tensor) -> np.ndarray:
        """pool3 features [N, 2048] (float64) of RGB images in [0, 1], as pytorch-fid computes them."""
        out = []
        for start in range(0, len(images), self.batch_size):
            pred = self.network(images[start : start + self.batch_size].to(self.device))[0]
            out.append(pred.squeeze(3).squeeze(2).double().cpu())
        return torch.cat(out).numpy()

    def extract_uint8(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images))
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.features01(x.float().div(255))

    def extract(self, images: torch.Tensor) -> tuple[np.ndarray, None]:
        u8 = torch.round((images.detach().cpu().float().clamp(-1, 1) + 1.0) * 127.5).to(torch.uint8)
        return self.extract_uint8(u8.numpy()), None


def load_feature_model(spec: dict, device: torch.device):
    """The feature model of a run config's `feature_model` entry: {"id": "inception", "path":
    weights file} or {"id": name, "path": classifier directory}."""
    if spec["id"] == INCEPTION:
        from engine.models.inception import load_fid_inception

        path = Path(spec["path"])
        network = load_fid_inception(path, device)
        return InceptionFeatures(network, f"inception@{file_digest(path)}")
    from engine.models.loader import load_feature_model as load_classifier

    path = Path(spec["path"])
    weights = path / "diffusion_pytorch_model.safetensors"
    digest = file_digest(weights) if weights.is_file() else "unknown"
    return ClassifierFeatures(load_classifier(path, device), f"{spec['id']}@{digest}")
