"""What a quantization method is to the rest of qtui.

Each method is one module of this package that defines `SPEC`, a `MethodSpec`:
- `validate(keys) -> params`: the variant's keys from experiments.toml, normalized (the form
  stored in a run's config and hashed), or `BadKey`. Torch-free, so `engine list` and the TUI
  check a catalogue without importing the numerical code.
- `describe(params) -> str`: a short label such as "conv W4, attention W8" for tables.
- `check_model(params, tensors)`: checks that need the model's layer names and shapes, read
  torch-free from its safetensors header (`tensors()` may return None: the worker then checks).
- `quantize(ctx) -> QuantResult`: quantize `ctx.model.denoiser` in place (simulated weights)
  and return what to store. The module imports torch inside this function only.
- `prepare_load(denoiser, params, state)` (optional): add to a full-precision denoiser the
  modules and buffers the method's checkpoint holds besides weights, so that it loads with
  strict=True (activation quantizers).

The run pipeline calls `engine.methods.quantize_model(ctx)`, whatever the method: adding a
method adds a module, not a branch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

Progress = Callable[..., None]


class BadKey(Exception):
    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key, self.message = key, message


@dataclass
class QuantContext:
    """Everything a method may use while quantizing one run's denoiser."""

    model: Any  # the loaded text-to-image model (engine.models.loader.TextToImageModel)
    run: Any  # engine.run_config.RunConfig
    folder: Path  # the run's folder
    cache_dir: Path  # statistics shared between runs (runs/cache)
    fp32_bytes: int  # the denoiser's FP32 checkpoint size
    progress: Progress

    @property
    def params(self) -> dict:
        return self.run.params


@dataclass
class QuantResult:
    """A quantized denoiser, as the method leaves it in memory, and what to store.

    `packed` maps layer names to their integer codes (`QuantizedTensor`), `half` names layers
    stored as float16; `packed = None` means nothing was quantized (full precision). After
    storing, the pipeline loads the checkpoint back and checks it equals the simulated weights.
    """

    layers: list[dict]
    packed: dict | None = None
    half: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)  # kind -> file in the run folder
    max_bytes: int | None = None  # a size limit the stored checkpoint must meet
    # A method whose quantized model is not the packed format (PTQ's int8 graph) stores its own
    # checkpoint (already written and checked against the model) and hands over the executable
    # model: `runtime.executable(execution) -> (module, metrics)` (engine.execution).
    checkpoint: Path | None = None
    runtime: Any = None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    validate: Callable[[dict], dict]
    describe: Callable[[dict], str]
    quantize: Callable[[QuantContext], QuantResult]
    check_model: Callable[[dict, Callable[[], object]], None] | None = None
    # Give a freshly loaded full-precision denoiser what the method adds besides weights
    # (activation quantizers and their buffers), so that the run's packed checkpoint `state`
    # loads into it with strict=True (`engine verify`): (denoiser, params, state) -> None.
    prepare_load: Callable[[Any, dict, dict], None] | None = None
    # Make the path keys of the normalized params absolute (relative to the catalogue's folder,
    # `base`) and check what they name, torch-free: (params, base) -> params, or BadKey.
    resolve_paths: Callable[[dict, Path], dict] | None = None
