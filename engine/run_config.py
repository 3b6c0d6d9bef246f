"""A run's resolved configuration as dataclasses: what `Experiment.run_config` builds, what is
stored (as JSON) and hashed with each run, and what the worker executes.

`RunConfig.from_dict` reads configs stored by earlier versions too: keys added later take their
defaults, so an old run's config still loads and means what it meant. Keys added later (marked
`LATER`) appear in `to_dict` only when they differ from their default, so the configs and
hashes of runs that do not use them stay what they were.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any

LATER = {"later": True}  # field metadata: added after the first stored configs


def later(default):
    return field(default=default, metadata=LATER)


@dataclass(frozen=True)
class ModelRef:
    id: str
    path: str


@dataclass(frozen=True)
class ModelOptions:
    """How the model is loaded and what size it generates (engine.models.adapters)."""

    dtype: str = later("auto")  # float32 | float16 | bfloat16 | auto (float16 on CUDA, else float32)
    drop_t5: bool = later(False)  # SD 3.x without text_encoder_3 / tokenizer_3
    scheduler: str | None = later(None)  # a diffusers scheduler class; None: the pipeline's own
    height: int | None = later(None)  # None: the model's default size
    width: int | None = later(None)


@dataclass(frozen=True)
class SamplingConfig:
    samples: int
    steps: int
    guidance: float
    seed: int
    batch_size: int
    negative_prompt: str = later("")
    prompts: tuple[str, ...] | None = later(None)  # an inline list (None: the model's or the file's)
    prompts_file: str | None = later(None)  # one prompt a line; its content hash is checked at run time
    prompts_sha256: str | None = later(None)


@dataclass(frozen=True)
class EvalConfig:
    bootstrap: int = 200


@dataclass(frozen=True)
class RunConfig:
    experiment: str
    variant: str
    model: ModelRef
    feature_model: ModelRef
    method: str
    params: dict[str, Any]
    sampling: SamplingConfig
    eval: EvalConfig = field(default_factory=EvalConfig)
    description: str = ""
    model_options: ModelOptions = field(default_factory=ModelOptions, metadata=LATER)
    reference: str | None = later(None)  # FID reference statistics (.npz or image folder); None: the digits
    clip: dict | None = later(None)  # {"model": "local-dir:<folder>" or an open_clip name, "weights": file}
    reference_variant: str = later("fp")  # the variant paired differences compare with (not the protocol)
    execution: str = later("simulated")  # or "real": quantized layers keep their codes (engine.execution)
    autocast: str | None = later(None)  # "bf16" / "fp16": sample under torch.autocast

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        nested = {"model": ModelRef, "feature_model": ModelRef, "sampling": SamplingConfig, "eval": EvalConfig,
                  "model_options": ModelOptions}
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in d.items():
            if key not in known:
                continue  # a key of a newer version: ignored by this one
            sub = nested.get(key)
            values[key] = _build(sub, value) if sub else value
        return cls(**values)

    def to_dict(self) -> dict:
        return _compact(self)


def _compact(obj) -> dict:
    """asdict without the fields added later that hold their default (recursively)."""
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("later"):
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if value == default:
                continue
        if is_dataclass(value):
            value = _compact(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _build(cls, value: dict):
    names = {f.name for f in fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items() if k in names}
    return cls(**values)
