"""Per-element Fisher information of a denoiser's weights, with memory bounded by one layer's
gradient and one group of float32 sums.

The Fisher of weight element i is F_i = 1/N sum_n g_{n,i}^2, g_n the gradient of sample n's
own training loss. It is computed with plain autograd, one sample per backward pass: as soon
as autograd has accumulated a tracked weight's gradient, a post-accumulate-grad hook squares
it into that weight's running float32 sum and drops it. So at most one layer's gradient is
alive at a time (besides autograd's in-flight activation gradients), never one per weight, and
never one per sample of a chunk (what `torch.func.vmap(grad)` materialises).

The running sums are one float32 value per tracked weight element: what the per-layer
statistics need (1/2 sum_i F_i (w_i - q(w_i))^2 at each candidate precision, computed per layer
once its sums are complete, then dropped). When all of them do not fit the budget, the layers
are split into contiguous groups that each fit, and every group makes its own pass over the
calibration samples, only its weights requiring gradients (so backward stops at the group's
first layer): passes = groups x samples. The budget is half the denoiser's own size in its
dtype, or half the free memory (/proc/meminfo MemAvailable, or the CUDA allocator's free
memory) if that is less; groups are as many as the budget needs and balanced (each within the
budget plus one layer).

Arithmetic (sizes in GiB; "pipeline" is the denoiser plus the text encoders and the VAE, all
resident while the statistics are computed; the process itself, torch and diffusers, takes
about 0.8 more):
- SD 1.5 in float32: UNet 859.5M parameters (3.20), pipeline 1.07B (3.97); quantizable weights
  859.1M in 282 layers (float32 sums 3.20), largest 29.5M (0.11). Budget 1.60: two groups, two
  passes over the samples. Peak = pipeline 3.97 + process 0.8 + one group's sums 1.6 + one
  layer's gradient 0.11 + one sample's activations and their gradients (0.7 at 256x256) =
  about 7.2, within the goal 1.5 x 3.97 + 2 = 7.96. Measured (bench/bench_fisher_memory.py,
  the UNet alone at 256x256): 6.38 peak RSS, so about 7.15 with the text encoder and VAE; all
  sums at once (one pass) measured 8.00, 8.8 with them: over the goal. Before: vmap over a
  chunk of one sample made a full gradient copy beside the sums and grew with every sample
  (15.8 and rising when it was killed; 9.66 after two samples on the 579M-parameter UNet with
  one layer per block, against 5.52 with all sums at once).
- SD 3.5 Medium in bfloat16 without T5: transformer 2.24B parameters (4.18), pipeline with
  CLIP-L, CLIP-G and the VAE about 3.15B (5.87); quantizable weights 2.24B in 393 layers
  (float32 sums 8.35), largest 21.2M. Budget 2.09: four groups, four passes. Peak = 5.87 + 0.8 +
  2.1 + one layer (0.04 in bfloat16, 0.08 as float32 while squared) + activations = about
  8.9 + activations, within the goal 1.5 x 5.87 + 2 = 10.8. A bfloat16 accumulator (8
  significant bits summed over N samples) was rejected for its precision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from engine.calibration import CalibrationSet, training_loss

Progress = Callable[[int, int, str], None]  # (done, total, message)
SUM_BYTES = 4  # float32 running sums


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device` (None when unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def sums_budget(denoiser: nn.Module) -> int:
    """Bytes the running Fisher sums of one group should take: half the denoiser's own size in
    its dtype, or half the free memory if that is less."""
    own = sum(p.numel() * p.element_size() for p in denoiser.parameters())
    device = next(denoiser.parameters()).device
    free = available_memory(device)
    return own // 2 if free is None else min(own // 2, free // 2)


def _greedy(nbytes: list[int], capacity: int) -> list[list[int]]:
    groups: list[list[int]] = []
    used = 0
    for i, size in enumerate(nbytes):
        if not groups or used + size > capacity:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += size
    return groups


def layer_groups(sizes: list[int], budget: int) -> list[list[int]]:
    """Contiguous groups of layer indices (`sizes` in elements, float32 sums): as many groups as
    the budget needs, ceil(total bytes / budget), balanced so that the largest is as small as
    it can be; it exceeds the budget by less than one layer (a layer larger than the budget is a
    group of its own)."""
    nbytes = [size * SUM_BYTES for size in sizes]
    count = max(1, -(-sum(nbytes) // max(1, budget)))
    low, high = max(nbytes), max(max(nbytes), sum(nbytes))
    while low < high:  # the least capacity that needs no more than `count` groups
        middle = (low + high) // 2
        if len(_greedy(nbytes, middle)) <= count:
            high = middle
        else:
            low = middle + 1
    return _greedy(nbytes, low)


def _accumulate(total: torch.Tensor, param: torch.Tensor) -> None:
    """Add the square of `param`'s gradient to `total` and drop the gradient."""
    grad = param.grad.detach()
    if grad.dtype != total.dtype:
        grad = grad.to(total.dtype)
    total.addcmul_(grad, grad)
    param.grad = None


@contextmanager
def _tracking(denoiser: nn.Module, weights: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]):
    """Only `weights` require gradients, and each one's gradient is squared into its sum and
    dropped as soon as autograd has accumulated it. Flags and gradients are restored after."""
    params = list(denoiser.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    handles = []
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for name, weight in weights.items():
            weight.requires_grad_(True)
            total = sums[name]
            handles.append(weight.register_post_accumulate_grad_hook(
                lambda param, total=total: _accumulate(total, param)))
        with torch.enable_grad():
            yield
    finally:
        for handle in handles:
            handle.remove()
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad


def fisher_by_group(
    denoiser: nn.Module, calib: CalibrationSet, names: list[str], budget: int | None = None,
    on_progress: Progress | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """The per-element Fisher (float32, shaped like each weight) of the named modules' weights,
    one group of layers at a time (see the module docstring): each dict is complete when
    yielded, and nothing of it is kept by this generator afterwards."""
    if len(calib) == 0:
        raise ValueError("the calibration set is empty")
    modules = dict(denoiser.named_modules())
    weights = {name: modules[name].weight for name in names}
    budget = sums_budget(denoiser) if budget is None else budget
    groups = [[names[i] for i in group] for group in layer_groups([w.numel() for w in weights.values()], budget)]
    n = len(calib)
    for g, group in enumerate(groups):
        sums = {name: torch.zeros(weights[name].shape, dtype=torch.float32, device=weights[name].device)
                for name in group}
        message = "Fisher information" + (f", layer group {g + 1}/{len(groups)}" if len(groups) > 1 else "")
        with _tracking(denoiser, {name: weights[name] for name in group}, sums):
            for i, sample in enumerate(calib.batches(1)):
                training_loss(denoiser, calib.flow, sample).backward()
                if on_progress:
                    on_progress(g * n + i + 1, len(groups) * n, message)
        for total in sums.values():
            total.div_(n)
        yield sums
        del sums


def per_sample_fisher(
    denoiser: nn.Module, calib: CalibrationSet, names: list[str], budget: int | None = None,
    on_progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """The per-element Fisher of every named module's weight at once (small models, tests)."""
    out: dict[str, torch.Tensor] = {}
    for part in fisher_by_group(denoiser, calib, names, budget, on_progress):
        out.update(part)
    return out
