"""CLIP score of images against their prompts with an open_clip model, never downloaded.

Score per sample = 100 * max(cos(image embedding, prompt embedding), 0), the torchmetrics
convention. Models come from:
- `local-dir:<folder>`: open_clip's own layout, `open_clip_config.json` (`model_cfg`,
  `preprocess_cfg`) beside `open_clip_model.safetensors` (the shipped `models/digits-clip`);
- an open_clip architecture name (`ViT-B-32`) with a weights file (`clip_weights`).

Images arrive as float tensors in [-1, 1], [N, C, H, W] (C = 1 or 3). They are quantized to
8-bit levels as a saved PNG would be, grey images repeated to RGB, resized (shortest side,
bicubic, antialiased) and centre-cropped to the model's size, then normalised with the model's
mean and std: open_clip's own preprocessing, applied to tensors instead of PIL images.
HF_HUB_OFFLINE is set before open_clip is imported, so nothing can reach the network.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LOCAL_DIR = "local-dir:"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


class ClipLoadError(Exception):
    pass


def _open_clip():
    os.environ["HF_HUB_OFFLINE"] = "1"
    import open_clip

    return open_clip


def file_digest(path: Path, length: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


@dataclass
class ClipScorer:
    model: object  # open_clip's CLIP (a torch module)
    tokenizer: object
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    model_id: str
    device: object
    batch_size: int = 250

    @classmethod
    def load(cls, model: str, weights: str | Path | None = None, device=None) -> "ClipScorer":
        """`model` is `local-dir:<folder>` or an open_clip architecture name (then `weights` is
        the checkpoint file). Errors name the folder or file."""
        import torch

        open_clip = _open_clip()
        device = device or torch.device("cpu")
        if model.startswith(LOCAL_DIR):
            folder = Path(model[len(LOCAL_DIR):])
            config = folder / CONFIG_FILE
            if not config.is_file():
                raise ClipLoadError(f"{folder}: no {CONFIG_FILE} (an open_clip local-dir needs it and its weights)")
            if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")) and not any(folder.glob("*.pth")):
                raise ClipLoadError(f"{folder}: no weights file (expected {WEIGHTS_FILE})")
            try:
                net = open_clip.create_model(model, device=device)
                tokenizer = open_clip.get_tokenizer(model)
            except Exception as exc:  # open_clip raises ValueError, RuntimeError, KeyError ...
                raise ClipLoadError(f"{folder}: cannot load the open_clip model ({exc})") from None
            weights_file = next(iter(sorted(folder.glob("*.safetensors"))), None) or next(iter(sorted(folder.iterdir())))
            model_id = f"{model}@{file_digest(weights_file)}"
        else:
            if model not in open_clip.list_models():
                raise ClipLoadError(f"clip_model {model!r} is neither 'local-dir:<folder>' nor an open_clip architecture")
            if weights is None or not Path(weights).is_file():
                raise ClipLoadError(f"clip_model {model!r} needs its weights file: clip_weights = {str(weights)!r} "
                                    "does not exist" if weights else f"clip_model {model!r} needs clip_weights = \"<file>\"")
            try:
                net = open_clip.create_model(model, pretrained=str(weights), device=device)
                tokenizer = open_clip.get_tokenizer(model)
            except Exception as exc:
                raise ClipLoadError(f"{weights}: cannot load as open_clip {model} weights ({exc})") from None
            model_id = f"{model}@{file_digest(Path(weights))}"
        cfg = dict(getattr(net.visual, "preprocess_cfg", None) or {})  # set by create_model: defaults + config
        cfg = {"mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711),
               "interpolation": "bicubic", **cfg}
        size = net.visual.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return cls(model=net.eval(), tokenizer=tokenizer, size=size, mean=tuple(cfg["mean"]),
                   std=tuple(cfg["std"]), interpolation=cfg["interpolation"], model_id=model_id, device=device)

    def preprocess(self, images):
        import torch
        import torchvision.transforms.v2.functional as TF

        x = torch.round((images.detach().cpu().float().clamp(-1, 1) + 1.0) * 127.5) / 255.0  # PNG levels
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != self.size:
            mode = TF.InterpolationMode.BICUBIC if self.interpolation == "bicubic" else TF.InterpolationMode.BILINEAR
            x = TF.resize(x, min(self.size), interpolation=mode, antialias=True)
            x = TF.center_crop(x, list(self.size))
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def image_embeddings(self, images):
        import torch

        with torch.no_grad():
            return self._image_embeddings(images)

    def _image_embeddings(self, images):
        import torch

        out = []
        for start in range(0, len(images), self.batch_size):
            x = self.preprocess(images[start : start + self.batch_size]).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1).cpu())
        return torch.cat(out)

    def text_embeddings(self, prompts: list[str]):
        import torch

        unique = sorted(set(prompts))
        ids = self.tokenizer(unique).to(self.device)
        with torch.no_grad():
            emb = torch.nn.functional.normalize(self.model.encode_text(ids).float(), dim=-1).cpu()
        index = {p: i for i, p in enumerate(unique)}
        return emb[[index[p] for p in prompts]]

    def scores(self, images, prompts: list[str]) -> np.ndarray:
        """Per-sample CLIP score [N] (float64): 100 * max(cos(image, prompt), 0)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        cos = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)
        return (100.0 * cos.clamp(min=0)).double().numpy()
