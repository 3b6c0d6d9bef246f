"""`engine train digits-clip`: the embedded CLIP for CLIP scores, an open_clip `CLIP` with a
small custom config trained contrastively on the digits and their prompts.

Both towers are tiny (ViT on 16x16 images with 4x4 patches, a text transformer over open_clip's
own BPE tokens), both width 64 with 2 layers. Each training image gets a random prompt naming its
class (the templates the digits models are trained with). Since a batch holds several images of
each class, the contrastive targets are soft: every prompt of the image's class is a positive,
weighted equally (the symmetric CLIP loss otherwise). Images are shifted by up to one pixel.

Saved in open_clip's local-dir layout (`open_clip_config.json` + `open_clip_model.safetensors`,
fp16): `open_clip.create_model("local-dir:models/digits-clip")` loads it. Rows of the token
embedding for tokens that never occur in the digits prompts are never trained; they are zeroed
before saving so the committed file compresses to a few hundred KB. `training.json` records the
zero-shot accuracy on the held-out 20% of the digits (measured on the saved file) and, when the
shipped digits-unet is present, the mean CLIP score of its full-precision samples against their
own prompt and against a wrong one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.data.digits import EVAL_TEMPLATE, load_digits_16, prompt_for, split_indices
from engine.metrics.clip_score import CONFIG_FILE, LOCAL_DIR, WEIGHTS_FILE, ClipScorer, _open_clip
from engine.train.common import PromptBatches, cosine_lr, optimizer_step
from engine.train.digits_classifier import shift


@dataclass
class ClipTrainConfig:
    steps: int = 400
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 100
    seed: int = 0
    embed_dim: int = 64
    width: int = 64
    layers: int = 2
    heads: int = 4
    patch_size: int = 4
    context_length: int = 8
    check_samples: int = 200  # digits-unet samples scored at the end (0: skip)


def model_config(cfg: ClipTrainConfig) -> dict:
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {"image_size": 16, "layers": cfg.layers, "width": cfg.width,
                       "head_width": cfg.width // cfg.heads, "patch_size": cfg.patch_size},
        "text_cfg": {"context_length": cfg.context_length, "vocab_size": 49408, "width": cfg.width,
                     "heads": cfg.heads, "layers": cfg.layers},
    }


# [-1, 1] grey digits become RGB with mean 0.5 and std 0.5: the network sees [-1, 1] again.
PREPROCESS = {"size": 16, "mode": "RGB", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
              "interpolation": "bicubic", "resize_mode": "shortest"}


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss where every pair of the same class is a positive (soft targets)."""
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@torch.no_grad()
def zero_shot_accuracy(scorer: ClipScorer, images: torch.Tensor, labels: torch.Tensor) -> float:
    classes = scorer.text_embeddings([prompt_for(d, EVAL_TEMPLATE) for d in range(10)])
    pred = (scorer.image_embeddings(images) @ classes.T).argmax(1)
    return (pred == labels).float().mean().item()


def save_local_dir(out: Path, model: torch.nn.Module, cfg: ClipTrainConfig, used_ids: list[int],
                   model_cfg: dict | None = None, preprocess: dict | None = None) -> None:
    """Save in open_clip's local-dir layout (fp16 weights, unused token rows zeroed)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous().clone() for k, v in model.state_dict().items()}
    unused = torch.ones(state["token_embedding.weight"].shape[0], dtype=torch.bool)
    unused[used_ids] = False
    state["token_embedding.weight"][unused] = 0
    save_file(state, str(out / WEIGHTS_FILE))
    config = {"model_cfg": model_cfg or model_config(cfg), "preprocess_cfg": {**PREPROCESS, **(preprocess or {})}}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def unet_prompt_check(scorer: ClipScorer, n: int, log) -> dict:
    """Mean CLIP score of the shipped FP digits-unet's samples (the ablation's protocol: 20 DDIM
    steps, guidance 1, seed 0) with their own prompt and with the next class's prompt."""
    from engine.data.digits import eval_labels
    from engine.models.loader import load_text_to_image
    from engine.models.registry import SHIPPED_DIR
    from engine.sampling import initial_noise, sample_images

    path = SHIPPED_DIR / "digits-unet"
    if not path.is_dir():
        return {}
    model = load_text_to_image(path, torch.device("cpu"))
    labels = eval_labels(n)
    own = [prompt_for(d) for d in labels]
    wrong = [prompt_for((d + 1) % 10) for d in labels]
    images = sample_images(model, own, initial_noise(n, model.sample_shape, 0), 20, 1.0, 100)
    result = {"samples": n, "own_prompt": float(scorer.scores(images, own).mean()),
              "wrong_prompt": float(scorer.scores(images, wrong).mean())}
    log(f"digits-unet samples: CLIP score {result['own_prompt']:.2f} with their prompt, "
        f"{result['wrong_prompt']:.2f} with a wrong one")
    return result


def train_digits_clip(out: Path, cfg: ClipTrainConfig, log=print) -> dict:
    open_clip = _open_clip()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    images, labels = load_digits_16()
    train_idx, test_idx = split_indices(len(images), held_out=0.2, seed=0)  # the classifier's split
    xtr, ytr = images[train_idx], labels[train_idx]
    prompts = PromptBatches(cfg.context_length)
    model = open_clip.model.CLIP(**model_config(cfg))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    start = time.time()
    model.train()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(xtr), (cfg.batch_size,), generator=gen)
        x, y = shift(xtr[idx], gen).expand(-1, 3, -1, -1), ytr[idx]
        ids = prompts.table[y, torch.randint(0, prompts.table.shape[1], (cfg.batch_size,), generator=gen)]
        loss = contrastive_loss(model.encode_image(x), model.encode_text(ids), y, model.logit_scale.exp())
        optimizer_step(opt, params, loss, cosine_lr(cfg.lr, step, cfg.steps, cfg.warmup))
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # at most 100, as open_clip training does
        if (step + 1) % 250 == 0:
            log(f"step {step + 1}/{cfg.steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    model.eval()
    out = Path(out)
    save_local_dir(out, model, cfg, prompts.vocab_ids)
    scorer = ClipScorer.load(LOCAL_DIR + str(out))
    accuracy = zero_shot_accuracy(scorer, images[test_idx], labels[test_idx])
    log(f"held-out zero-shot accuracy {accuracy:.4f}")
    summary = {"train_config": asdict(cfg), "held_out_zero_shot_accuracy": accuracy,
               "train_size": len(train_idx), "held_out_size": len(test_idx),
               "seconds": round(time.time() - start, 1)}
    if cfg.check_samples:
        summary["digits_unet_clip_score"] = unet_prompt_check(scorer, cfg.check_samples, log)
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
