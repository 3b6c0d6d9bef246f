"""A run's resolved configuration as dataclasses: what `Experiment.run_config` builds, what is
stored (as JSON) and hashed with each run, and what the worker executes.

`RunConfig.from_dict` reads configs stored by earlier versions too: keys added later take their
defaults, so an old run's config still loads and means what it meant.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class ModelRef:
    id: str
    path: str


@dataclass(frozen=True)
class SamplingConfig:
    samples: int
    steps: int
    guidance: float
    seed: int
    batch_size: int


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
    execution: str = "simulated"  # or "real": quantized layers keep their codes (engine.execution)
    autocast: str | None = None  # "bf16" / "fp16": sample under torch.autocast

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        nested = {"model": ModelRef, "feature_model": ModelRef, "sampling": SamplingConfig, "eval": EvalConfig}
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in d.items():
            if key not in known:
                continue  # a key of a newer version: ignored by this one
            sub = nested.get(key)
            values[key] = _build(sub, value) if sub else value
        return cls(**values)

    def to_dict(self) -> dict:
        out = asdict(self)
        # execution keys appear only when set, so the configs (and hashes) of earlier runs stay
        for key, default in (("execution", "simulated"), ("autocast", None)):
            if out[key] == default:
                del out[key]
        return out


def _build(cls, value: dict):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in value.items() if k in names})
