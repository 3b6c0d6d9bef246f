"""Calibration data for post-training quantization, collected with the full-precision model.

The calibration set is `samples` prompts (for the digits models every digit equally often, in
training wordings other than the evaluation's; for other models seeded draws from a part of the
experiment's prompts) sampled by the experiment's own sampler and guidance, over every step of a
`steps`-step schedule, so the statistics cover the whole noise range and both halves of
classifier-free guidance. A further `held_out` prompts
give the inputs on which each layer's output error is measured.

Held-out and calibration prompts are disjoint (the adapter's `calibration_split`). For a
model with the experiment's prompts, its distinct prompts are split in two seeded parts in
proportion to `samples` and `held_out`. The digits have 10 classes only, and the model
must be calibrated for every class it is evaluated on, so the split is by wording, not by
class: calibration prompts use the training templates other than the evaluation's
(`EVAL_TEMPLATE`, "a handwritten digit seven"), held-out prompts use the evaluation's. So no
held-out prompt (nor its encoded tokens and pooled vector) is in the calibration set, the
calibration never sees the evaluation's prompts, and `out_err` is measured on the prompts the
evaluation samples, with other noise. (Drawn from all templates alike, 11 of 16 held-out prompts
were calibration prompts, and 84% of the held-out input rows of the adaLN layers, which see
only the timestep and pooled prompt, repeated calibration rows exactly.) The unconditional half
of classifier-free guidance (the empty prompt) is the same in both sets, and in the
evaluation: its adaLN rows, a function of the step alone, are the ones the evaluation meets.
The noise of the two sets is disjoint too (samples `:samples` and `samples:` of one draw), and
is not the evaluation's: it comes from the calibration stream of per-sample generators
(`engine.sampling.CALIBRATION`), so the two differ even for equal seeds.

What is collected (hooks on the full-precision model, nothing per token kept for any layer):
- `absmax` (`AbsMax`): per quantized Linear, the largest |input| seen on the calibration
  prompts, for static activation scales;
- `BlockInputs` (GPTQ): the inputs of the FIRST transformer block, every call of the
  calibration pass. Block-by-block GPTQ (`engine.quant.gptq_blocks`) gets each later block's
  inputs by running the quantized blocks before it, and computes one block's Hessians at a time
  from them; the Hessians are never stored.
The per-layer output errors on the held-out prompts are computed directly during the held-out
pass (`engine.quant.held_out_error`), not from stored statistics.

Size of the block inputs: one float per token and width for every denoiser call, in the model's
dtype, with the calls = ceil(samples / batch_size) x steps, each of 2 x batch rows with
classifier-free guidance:
    bytes = samples x 2 x steps x (image tokens + text tokens) x width x dtype bytes
(plus the timestep embedding, one row of `width` per row). SD 3.5 Medium (width 1536, 333 text
tokens without T5: 77 CLIP + 256 zero T5 positions) in bfloat16: at 256x256 (256 image tokens)
4 samples x 2 steps cost 4 x 2 x 2 x 589 x 1536 x 2 = 29 MB; 32 samples x 20 steps 2.3 GB; at
1024x1024 (4096 image tokens) 32 x 20 steps 17.4 GB. They live on the denoiser's device and are
replaced call by call as GPTQ advances a block (one set at a time, never two). Choose `samples`
and `steps` of the calibration with this in mind.

The calibration file (`calibration.safetensors`, `save_calibration`) holds what re-running the
quantization needs (`engine.quant.gptq_method.requantize`): the config, the activations' absmax
and, for GPTQ, the first block's calibration inputs (so its size is that of the block inputs
above, not a function of the model's depth). `keep_calibration = false` skips it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from engine.atomic_files import atomic_path
from engine.models.loader import TextToImageModel
from engine.sampling import CALIBRATION, initial_noise, sample_images

CALIBRATION_FILE = "calibration.safetensors"
META_KEY = "qtui_calibration"


@dataclass
class CalibrationSet:
    prompts: list[str]
    noise: torch.Tensor
    held_out_prompts: list[str]
    held_out_noise: torch.Tensor


def calibration_set(model: TextToImageModel, cfg: dict, prompts: list[str] | None = None) -> CalibrationSet:
    """Seeded, disjoint calibration and held-out prompts (see the module docstring) and their
    initial noise."""
    n, m = cfg["samples"], cfg["held_out"]
    if n < 1 or m < 1:
        raise ValueError(f"empty calibration set: samples={n}, held_out={m} (need at least 1 each)")
    gen = torch.Generator().manual_seed(cfg["seed"])
    calibration, held_out = model.calibration_split(n, m, gen, prompts)
    noise = initial_noise(n + m, model.sample_shape, cfg["seed"], stream=CALIBRATION)
    return CalibrationSet(calibration, noise[:n], held_out, noise[n:])


def run_sampler(model: TextToImageModel, prompts: list[str], noise: torch.Tensor, cfg: dict,
                sampling: dict, on_progress: Callable[[int, int], None] | None = None) -> None:
    """Sample like the experiment does (its guidance, negative prompt and batch size), over
    `cfg['steps']` steps."""
    sample_images(model, prompts, noise, cfg["steps"], sampling["guidance"], sampling["batch_size"],
                  on_progress=on_progress, negative_prompt=sampling.get("negative_prompt", ""))


def _input_of(args: tuple) -> torch.Tensor:
    return args[0].detach()


class AbsMax:
    """Forward pre-hooks recording the largest |input| of each named layer."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.values = {name: 0.0 for name in layers}
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in layers.items()]

    def _hook(self, name: str):
        def hook(module, args):
            self.values[name] = max(self.values[name], _input_of(args).abs().max().item())
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


BLOCK_INPUT = "block_input"  # tensor name prefix in the calibration file


@dataclass
class BlockInputs:
    """The positional and keyword inputs of one module, for every call during calibration.

    In the calibration file the tensors are `block_input.{call}.{i}` (positional) and
    `block_input.{call}.{keyword}`; `layout()` describes every call (its tensors by name, its
    other values, such as `joint_attention_kwargs = None`, as JSON) for the file's metadata."""

    calls: list[tuple[tuple, dict]] = field(default_factory=list)

    @classmethod
    def record(cls, block: nn.Module) -> tuple["BlockInputs", object]:
        """Start recording `block`'s inputs; returns (recorder, hook handle to remove)."""
        rec = cls()

        def hook(module, args, kwargs):
            detach = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v
            rec.calls.append((tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()}))

        return rec, block.register_forward_pre_hook(hook, with_kwargs=True)

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for a, kw in self.calls for v in (*a, *kw.values())
                   if isinstance(v, torch.Tensor))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (args, kwargs) in enumerate(self.calls):
            for key, value in (*enumerate(args), *kwargs.items()):
                if isinstance(value, torch.Tensor):
                    out[f"{BLOCK_INPUT}.{i}.{key}"] = value
        return out

    def layout(self) -> list[dict]:
        """Per call: {"args": [...], "kwargs": {...}}, each value {"tensor": name} or {"value": v}."""
        def entry(i, key, value):
            if isinstance(value, torch.Tensor):
                return {"tensor": f"{BLOCK_INPUT}.{i}.{key}"}
            try:
                json.dumps(value)
            except TypeError:
                raise ValueError(f"block input {key!r} of type {type(value).__name__} cannot be saved "
                                 "in the calibration file; set keep_calibration = false") from None
            return {"value": value}

        return [{"args": [entry(i, j, a) for j, a in enumerate(args)],
                 "kwargs": {k: entry(i, k, v) for k, v in kwargs.items()}} for i, (args, kwargs) in enumerate(self.calls)]

    @classmethod
    def from_file(cls, layout: object, tensors: dict[str, torch.Tensor], path: Path,
                  device: torch.device) -> "BlockInputs":
        """The inputs saved by `layout()` and `tensors()`; DamagedFile if they do not match."""
        from engine.errors import DamagedFile

        def value(spec):
            if isinstance(spec, dict) and set(spec) == {"tensor"}:
                if spec["tensor"] not in tensors:
                    raise DamagedFile(path, f"missing tensor {spec['tensor']}")
                return tensors[spec["tensor"]].to(device)
            if isinstance(spec, dict) and set(spec) == {"value"}:
                return spec["value"]
            raise DamagedFile(path, f"bad block input entry {spec!r} in its metadata")

        if not isinstance(layout, list) or not layout:
            raise DamagedFile(path, "its metadata lists no block inputs")
        rec = cls()
        for call in layout:
            if not isinstance(call, dict) or not isinstance(call.get("args"), list) or not isinstance(call.get("kwargs"), dict):
                raise DamagedFile(path, f"bad block input call {call!r} in its metadata")
            rec.calls.append((tuple(value(a) for a in call["args"]), {k: value(v) for k, v in call["kwargs"].items()}))
        return rec


def write_calibration(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> int:
    """Write the calibration file at `path` (the caller makes it atomic); returns its size."""
    plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(plain, str(path), metadata={META_KEY: json.dumps(config, sort_keys=True)})
    return os.path.getsize(path)


def save_calibration(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> int:
    """Write the calibration file atomically (temporary file, then rename); returns its size."""
    path = Path(path)
    with atomic_path(path) as tmp:
        write_calibration(tmp, config, tensors)
    return os.path.getsize(path)


def load_calibration(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and tensors written by `save_calibration`; `engine.errors.DamagedFile` for a
    damaged file (its header is checked before safetensors reads it)."""
    from safetensors import SafetensorError

    from engine.errors import DamagedFile
    from engine.file_checks import check_safetensors

    check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if META_KEY not in meta:
                raise DamagedFile(path, f"not a qtui calibration file (no {META_KEY} metadata)")
            config = json.loads(meta[META_KEY])
            if not isinstance(config, dict):
                raise ValueError(f"{META_KEY} metadata is not a JSON object")
            return config, {k: f.get_tensor(k) for k in f.keys()}
    except (ValueError, SafetensorError) as exc:
        raise DamagedFile(path, f"not a valid calibration file: {exc}") from None
