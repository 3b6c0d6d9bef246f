"""The execution stage: turn the stored quantized denoiser into what sampling runs, and measure
what it holds and how much memory sampling takes.

`prepare_execution` is one call after the checkpoint is stored and loaded back:
- a method that built its own executable model (`QuantResult.runtime`, e.g. PTQ's converted
  int8 graph) hands it over; with `execution = "real"` it is compiled (`compile_s`, the wall
  time of compiling and the first call, is reported apart from sampling);
- otherwise `execution = "real"` swaps the quantized layers for low-bit modules built from the
  packed checkpoint (engine.quant.lowbit); `simulated` keeps the dequantized FP32 weights.
`model_bytes` is the bytes of the denoiser's parameters and buffers as held while sampling.

Memory of the sampling phase (`Runtime.sampling()`):
- CUDA: `peak_mem_mb` is torch.cuda.max_memory_allocated during sampling (peak reset first).
- CPU: `peak_mem_mb` is the process's peak resident set size during sampling: the kernel's
  high-water mark VmHWM, reset just before sampling by writing 5 to /proc/self/clear_refs. It
  includes torch itself, every loaded model and the allocator's cached memory. tracemalloc does
  not see torch's allocations, so `sampling_mem_mb` is that peak minus the resident size just
  before sampling: the high-water mark of what sampling itself added (activations, the weight
  of the layer being dequantized); memory freed and reused by the allocator is not double
  counted. Where clear_refs cannot be written, `peak_mem_mb` falls back to the lifetime peak
  (getrusage) and `sampling_mem_mb` is not reported.
The run's own peak over every stage (`run_peak_mem_mb`) is `engine.run_memory`'s, which
remembers the peak reached before these resets.
"""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.quant.lowbit import model_bytes, to_lowbit
from engine.run_memory import reset_gpu_peak, reset_rss_peak, status_kib

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    autocast: str | None
    metrics: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def sampling(self):
        """Autocast (if any) and the memory measurement of the sampling phase; the yielded dict
        receives peak_mem_mb (and sampling_mem_mb on CPU) when the block ends."""
        out: dict[str, float] = {}
        cast = (torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.autocast])
                if self.autocast else contextlib.nullcontext())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            reset_gpu_peak(self.device)
            with cast:
                yield out
            torch.cuda.synchronize(self.device)
            out["peak_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        reset = reset_rss_peak()
        before = status_kib("VmRSS")
        with cast:
            yield out
        peak = status_kib("VmHWM") if reset else None
        if peak is not None and before is not None:
            out["peak_mem_mb"] = peak / 1024
            out["sampling_mem_mb"] = max(peak - before, 0) / 1024
        else:
            out["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare_execution(model, run, result, checkpoint: Path | None, progress) -> Runtime:
    """Make `model.denoiser` what the run samples with (see the module docstring)."""
    metrics: dict[str, float] = {}
    if getattr(result, "runtime", None) is not None:
        progress("execution", 0, 1, f"{run.execution} {run.method}")
        start = time.time()
        model.denoiser, extra = result.runtime.executable(run.execution)
        metrics.update(extra)
        metrics.setdefault("compile_s", time.time() - start)
    elif run.execution == "real":
        if checkpoint is None:
            raise ValueError("execution = 'real' needs a packed checkpoint; this run quantized nothing")
        progress("execution", 0, 1, "low-bit modules")
        to_lowbit(model.denoiser, checkpoint)
    metrics["model_bytes"] = model_bytes(model.denoiser)
    progress("execution", 1, 1)
    return Runtime(model.device, run.autocast, metrics)
