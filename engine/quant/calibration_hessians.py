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

What is collected, per quantized Linear (forward hooks, nothing but running sums is kept):
- `absmax`: the largest |input| seen, for static activation scales;
- the GPTQ Hessian 2/n sum x x^T (`GPTQ.add_batch`); for a transformer denoiser the inputs of
  the first block are cached instead (`BlockInputs`) so that each later block's Hessians come
  from the already-quantized blocks before it (see `engine.quant.gptq_method`);
- `held-out moments`: the float64 sum of z z^T over held-out tokens, z = [x, q(x) - x] with
  q the layer's activation quantizer (z = x without one). From it the relative output error
  of any quantized weight W_q is exact: ||q(X) W_q^T - X W^T||^2 = tr(M G M^T) with
  M = [W_q - W, W_q] (see `output_error`).

Everything the quantization needs is saved in one safetensors file under the run folder,
with the calibration and method config in its metadata (`save_calibration`), so GPTQ can be
re-run from it without sampling again (`engine.quant.gptq_method.requantize`).
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

Quantizer = Callable[[torch.Tensor], torch.Tensor]
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


@dataclass
class BlockInputs:
    """The positional and keyword inputs of one module, for every call during calibration."""

    calls: list[tuple[tuple, dict]] = field(default_factory=list)

    @classmethod
    def record(cls, block: nn.Module) -> tuple["BlockInputs", object]:
        """Start recording `block`'s inputs; returns (recorder, hook handle to remove)."""
        rec = cls()

        def hook(module, args, kwargs):
            detach = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v
            rec.calls.append((tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()}))

        return rec, block.register_forward_pre_hook(hook, with_kwargs=True)


class HeldOutMoments:
    """Forward pre-hooks summing z z^T (float64) with z = [x, q(x) - x] per named layer."""

    def __init__(self, layers: dict[str, nn.Module], quantizers: dict[str, Quantizer]):
        self.quantizers = quantizers
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = {name: 0 for name in layers}
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in layers.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = _input_of(args).float().reshape(-1, module.in_features)
            q = self.quantizers.get(name)
            z = torch.cat([x, q(x) - x], dim=1) if q is not None else x
            g = (z.T @ z).double()
            self.sums[name] = self.sums[name] + g if name in self.sums else g
            self.tokens[name] += x.shape[0]
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def output_error(moments: torch.Tensor, w: torch.Tensor, w_q: torch.Tensor) -> float:
    """Relative output error ||q(X) W_q^T - X W^T|| / ||X W^T|| from held-out moments (see the
    module docstring); the moments are [in, in] without activation quantization, else [2in, 2in]."""
    w, w_q = w.double(), w_q.double()
    cols = w.shape[1]
    m = torch.cat([w_q - w, w_q], dim=1) if moments.shape[0] == 2 * cols else w_q - w
    err = (m @ moments * m).sum().item()
    ref = (w @ moments[:cols, :cols] * w).sum().item()
    if ref <= 0:
        return 0.0
    return max(err, 0.0) ** 0.5 / ref**0.5


def save_calibration(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> int:
    """Write the calibration statistics atomically (temporary file, then rename)."""
    path = Path(path)
    plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(plain, str(tmp), metadata={META_KEY: json.dumps(config, sort_keys=True)})
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
