"""Method `qat`: quantization-aware training. LSQ fake quantizers (weights W4 or W8 per output
channel, optionally int8 static inputs of every Linear) are inserted into the denoiser, which is
fine-tuned with its own training loss for `steps` seeded steps, then converted to packed codes
and evaluated like every other variant (engine.quant.qat).

Training data: the digits models train on the digits images. A diffusers pipeline trains on
`train_images = "<folder>"` (images with captions, engine.image_captions; relative to the
catalogue) or, without it, data-free: `train_samples` (default 64) latents that the
full-precision model samples from the experiment's prompts with the experiment's sampler,
generated before quantizing (engine.quant.qat.data)."""

from __future__ import annotations

from engine.methods.base import BadKey, MethodSpec, QuantContext, QuantResult
from engine.methods.keys import number, positive_int, role_bits
from engine.methods.rtn import describe_role_bits

KEYS = {"bits", "act_bits", "steps", "lr", "batch_size", "seed", "train_images", "train_samples"}
QAT_BITS = (4, 8)


def validate(keys: dict) -> dict:
    for key in keys:
        if key not in KEYS:
            raise BadKey(key, f"unknown key for method 'qat'; keys are {', '.join(sorted(KEYS))}")
    for key in ("bits", "steps"):
        if key not in keys:
            raise BadKey(key, f"method 'qat' needs {key}")
    bits = role_bits(keys["bits"])
    for role, b in bits.items():
        if b not in QAT_BITS:
            raise BadKey("bits" if isinstance(keys["bits"], int) else f"bits.{role}",
                         f"QAT quantizes weights to 4 or 8 bits, got {b}")
    act_bits = keys.get("act_bits", 16)
    if isinstance(act_bits, bool) or act_bits not in (8, 16):
        raise BadKey("act_bits", f"must be 8 (int8 inputs of each Linear) or 16 (not quantized), got {act_bits!r}")
    steps = keys["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise BadKey("steps", f"fine-tuning steps must be an integer > 0, got {steps!r}")
    out = {
        "bits": bits,
        "act_bits": act_bits,
        "steps": steps,
        "lr": number(keys.get("lr"), "lr", 1e-4),
        "batch_size": positive_int(keys.get("batch_size", 64), "batch_size"),
        "seed": positive_int(keys.get("seed", 0), "seed", minimum=0),
    }
    # The training data of a diffusers pipeline: in the normalized form only when given, so that
    # the configs (and hashes) of the digits runs stay what they were.
    if "train_images" in keys:
        if "train_samples" in keys:
            raise BadKey("train_samples", "applies without train_images (data-free: the full-precision "
                                          "model's own samples); leave one of them out")
        if not isinstance(keys["train_images"], str) or not keys["train_images"].strip():
            raise BadKey("train_images", f"must be a folder of images with captions, got {keys['train_images']!r}")
        out["train_images"] = keys["train_images"]
    if "train_samples" in keys:
        out["train_samples"] = positive_int(keys["train_samples"], "train_samples")
    return out


def resolve_paths(params: dict, base) -> dict:
    """`train_images` relative to the catalogue's folder, checked for images with captions."""
    from pathlib import Path

    from engine.image_captions import ImageFolderError, image_caption_pairs

    if "train_images" not in params:
        return params
    folder = Path(params["train_images"]).expanduser()
    folder = (folder if folder.is_absolute() else Path(base) / folder).resolve()
    try:
        image_caption_pairs(folder)
    except ImageFolderError as exc:
        raise BadKey("train_images", str(exc)) from None
    return {**params, "train_images": str(folder)}


def describe(params: dict) -> str:
    weights = describe_role_bits(params["bits"])
    acts = f"A{params['act_bits']}" if params["act_bits"] == 8 else ""
    return f"QAT {weights}{acts}, {params['steps']} steps"


def quantize(ctx: QuantContext) -> QuantResult:
    from dataclasses import asdict

    from engine.prompts import sampling_prompts
    from engine.quant.qat.data import TrainingData
    from engine.quant.qat.finetune import QATConfig, quantize_qat

    p = ctx.params
    cfg = QATConfig(bits=p["bits"], steps=p["steps"], act_bits=p["act_bits"], lr=p["lr"],
                    batch_size=p["batch_size"], seed=p["seed"])
    sampling = {**asdict(ctx.run.sampling), "prompts": sampling_prompts(ctx.run.sampling)}
    data = TrainingData(images=p.get("train_images"), samples=p.get("train_samples"),
                        sampling=sampling, folder=ctx.folder)
    result = quantize_qat(ctx.model, cfg, ctx.progress, data)
    artifacts = {} if result.pool is None else {"training_data": result.pool.path}
    return QuantResult(layers=result.layers, packed=result.packed, metrics=result.metrics, artifacts=artifacts)


def prepare_load(denoiser, params: dict, state: dict) -> None:
    """The static int8 input quantizers of the Linear layers whose scale the checkpoint holds."""
    from torch import nn

    from engine.quant.act_quant import SCALE_BUFFER, add_act_quant

    if params["act_bits"] != 8:
        return
    for name, module in denoiser.named_modules():
        if isinstance(module, nn.Linear) and f"{name}.{SCALE_BUFFER}" in state:
            add_act_quant(module, 8, "static", absmax=1.0)  # the scale is the checkpoint's


SPEC = MethodSpec(name="qat", validate=validate, describe=describe, quantize=quantize, prepare_load=prepare_load,
                  resolve_paths=resolve_paths)
