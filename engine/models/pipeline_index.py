"""What a model folder holds, read torch-free from its `model_index.json` and component configs.

Used twice with the same checks: by the catalogue (so a bad folder is a ConfigError at load,
before anything runs) and by the loader (so a folder that changed since is a clear error too).
Supported pipeline classes and the components each one needs are listed in `FAMILIES`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.models.registry import INDEX_FILE


@dataclass(frozen=True)
class Family:
    adapter: str  # module in engine.models.adapters
    denoiser: str  # the component that gets quantized
    components: tuple[str, ...]  # what must be present
    t5: tuple[str, ...] = ()  # optional T5 components (SD 3.x)


FAMILIES = {
    "QtuiDigitsPipeline": Family("digits_unet", "unet", ("unet", "text_encoder", "scheduler")),
    "QtuiDigitsMMDiTPipeline": Family("digits_mmdit", "transformer", ("transformer", "text_encoder", "scheduler")),
    "StableDiffusionPipeline": Family("sd", "unet", ("unet", "vae", "text_encoder", "tokenizer", "scheduler")),
    "StableDiffusion3Pipeline": Family(
        "sd3", "transformer",
        ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
        t5=("text_encoder_3", "tokenizer_3")),
}
DIGITS_CLASSES = ("QtuiDigitsPipeline", "QtuiDigitsMMDiTPipeline")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")


class PipelineError(Exception):
    """A model folder that cannot be used: the message names the path and what is wrong."""


@dataclass(frozen=True)
class PipelineInfo:
    path: Path
    class_name: str
    family: Family
    components: tuple[str, ...]  # what will be loaded
    vae_scale: int  # pixels per latent (1 without a VAE)
    patch: int  # latents per token side (1 for a UNet)
    sample_size: int  # the denoiser's native latent size
    has_t5: bool
    variant: str | None = None  # "fp16" when some component ships only *.fp16.safetensors

    @property
    def multiple(self) -> int:
        """height and width must be multiples of this."""
        return self.vae_scale * self.patch

    @property
    def default_size(self) -> int:
        return self.sample_size * self.vae_scale

    @property
    def is_digits(self) -> bool:
        return self.class_name in DIGITS_CLASSES


def supported_classes() -> str:
    return ", ".join(FAMILIES)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such file") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{path}: cannot be read as JSON ({exc})") from None


def _listed(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


def _check_component(path: Path, name: str) -> str | None:
    """Checks one component folder; returns its weights variant ("fp16") when it has only that."""
    folder = path / name
    if not folder.is_dir():
        raise PipelineError(f"{path}: component {name}/ is missing (listed in {INDEX_FILE})")
    if name.startswith("tokenizer"):
        if not any((folder / f).is_file() for f in TOKENIZER_FILES):
            raise PipelineError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        return
    if name == "scheduler":
        if not (folder / "scheduler_config.json").is_file():
            raise PipelineError(f"{folder}: scheduler_config.json is missing")
        return
    if not (folder / "config.json").is_file():
        raise PipelineError(f"{folder}: config.json is missing")
    weights = [f.name for f in folder.glob("*.safetensors")]
    if not weights:
        other = " (only .bin weights: qtui loads safetensors only; convert them)" if any(folder.glob("*.bin")) else ""
        raise PipelineError(f"{folder}: no *.safetensors weights{other}")
    plain = [w for w in weights if len(w.split(".")) == 2 or ".safetensors.index" in w]
    if not plain and all(".fp16." in w for w in weights):
        return "fp16"  # only the fp16 variant, as Hugging Face repositories often ship
    return None


def inspect_pipeline(path: str | Path, drop_t5: bool = False) -> PipelineInfo:
    """The folder's pipeline class and geometry, after checking every needed component is there."""
    path = Path(path)
    if not path.is_dir():
        raise PipelineError(f"{path}: no such model folder")
    index = _json(path / INDEX_FILE)
    class_name = index.get("_class_name")
    if class_name not in FAMILIES:
        raise PipelineError(f"{path / INDEX_FILE}: pipeline class {class_name!r} is not supported; "
                            f"supported: {supported_classes()}")
    family = FAMILIES[class_name]
    if drop_t5 and not family.t5:
        raise PipelineError(f"{path}: drop_t5 applies to SD 3.x pipelines only, not {class_name}")
    has_t5 = bool(family.t5) and not drop_t5 and all(_listed(index, c) for c in family.t5)
    components = family.components + (family.t5 if has_t5 else ())
    variants = {_check_component(path, name) for name in components}
    variant = "fp16" if "fp16" in variants else None
    denoiser = _json(path / family.denoiser / "config.json")
    vae_scale = 1
    if "vae" in components:
        vae_scale = 2 ** (len(_json(path / "vae" / "config.json").get("block_out_channels", [0])) - 1)
    sample_size = denoiser.get("sample_size", 64)
    if isinstance(sample_size, list):
        sample_size = sample_size[0]
    return PipelineInfo(path=path, class_name=class_name, family=family, components=components, vae_scale=vae_scale,
                        patch=int(denoiser.get("patch_size") or 1), sample_size=int(sample_size), has_t5=has_t5,
                        variant=variant)


def check_side(info: PipelineInfo, key: str, value: int | None) -> int:
    """`height` or `width`: the model's default when None, else a positive multiple of what the
    model needs (VAE scale factor x patch size). Digits models have one size only."""
    if value is None:
        return info.default_size
    if info.is_digits and value != info.default_size:
        raise PipelineError(f"{key} = {value}: the digits models generate {info.default_size}x"
                            f"{info.default_size} images only")
    if value <= 0 or value % info.multiple:
        raise PipelineError(f"{key} = {value} is not a positive multiple of {info.multiple} (this model's "
                            f"VAE scale factor {info.vae_scale} x patch size {info.patch})")
    return value


def check_size(info: PipelineInfo, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width), checked as `check_side` does."""
    return check_side(info, "height", height), check_side(info, "width", width)
