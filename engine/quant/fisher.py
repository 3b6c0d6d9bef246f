"""Fisher information of a trained denoiser's layers, what it predicts, and what is measured.

- Fisher per weight element: the mean over the calibration samples of the squared per-sample
  gradient of the training loss (the empirical Fisher), computed on the weights as loaded, with
  the loss against the true target (noise, or velocity for rectified flow) at timesteps across
  the whole schedule. Per-sample gradients come from plain autograd, one sample per backward,
  squared into float32 sums layer by layer as autograd produces them (engine.quant.fisher_sums:
  memory bounded by one layer's gradient and one group of sums; the arithmetic for SD 1.5 and
  SD 3.5 Medium is there).
- Per layer: its Fisher value (the mean of its elements' Fisher) and, for each precision, the
  Fisher-weighted quantization error 1/2 sum_i F_i (w_i - q(w_i))^2, which ranks what storing
  that layer at that precision costs. They are computed as soon as a group of layers has its
  per-element Fisher, which is then dropped.
- The Fisher-weighted error is a relative quantity, proportional to the loss increase it
  predicts, not that increase: the empirical Fisher of this loss is not its Hessian. The loss
  of a sample is l_n = 1/D ||f_n(w) - y_n||^2, the mean over its D output elements; with
  residual r_n = f_n - y_n and output Jacobian J_n, its gradient is g_n = 2/D J_n^T r_n and its
  (Gauss-Newton) Hessian 2/D J_n^T J_n. The Fisher here is 1/N sum_n g_n g_n^T (each sample's
  gradient of its own loss; the Hessian of the calibration loss, a mean over samples, is the
  mean of the samples' Hessians, so no batch-size factor enters). The per-element mean puts
  1/D into the Fisher squared but into the Hessian once, and the residual enters the Fisher
  only: if it were white noise of variance L per element (L the loss), F = (2 L / D) H. That
  factor D / (2 L) is not a usable correction either: the residuals of a denoiser are
  correlated across pixels, and on digits-unet (D = 256, L = 0.045, W4) the measured
  curvature is 117-587x (10th-90th percentile over layers, median 263x) the Fisher-weighted
  error, while D / (2 L) = 2870 overshoots it 11x. Stored and shown as relative quantities
  (`rel_est_sensitivity` per layer, `rel_est_loss_increase` per run): comparable between the
  layers, precisions and plans of one model and calibration set, and what the strategies
  rank; `fisher_spearman` checks their order against the measurement.
- Measured sensitivity: the increase of the calibration loss when one layer alone is quantized,
  and the same with its first-order term cancelled (see `measured_sensitivity`).
- Spearman rank correlation, to compare the estimate with the measurement.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from engine.calibration import CalibrationSet, training_loss
from engine.quant.fisher_sums import fisher_by_group
from engine.quant.roles import quantizable_layers
from engine.quant.rtn import fake_quantize

FP16, FP32 = 16, 32
INT_BITS = tuple(range(2, 9))
Progress = Callable[[int, int], None]
FisherProgress = Callable[[int, int, str], None]  # (done, total, message)
ERROR_CHUNK = 1 << 20  # weight elements per step of the Fisher-weighted errors


def error_key(bits: int, symmetric: bool) -> str:
    """The key of one precision in `FisherStats.errors`: 'w4s', 'w4a', 'fp16' or 'fp32'."""
    if bits == FP16:
        return "fp16"
    if bits == FP32:
        return "fp32"
    return f"w{bits}{'s' if symmetric else 'a'}"


ERROR_KEYS = [error_key(b, s) for s in (True, False) for b in INT_BITS] + ["fp16", "fp32"]


def stored_weight(weight: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """The weight as a layer stored at `bits` holds it (float32): RTN, float16, or unchanged."""
    w = weight.detach().float()
    if bits == FP32:
        return w
    if bits == FP16:
        return w.half().float()
    return fake_quantize(w, bits, symmetric)


@dataclass
class FisherStats:
    """Per-layer statistics of one model on one calibration set, in model order."""

    names: list[str]
    fisher: np.ndarray  # [L] mean per-element Fisher of each layer's weight
    errors: dict[str, np.ndarray]  # error_key -> [L] Fisher-weighted quantization error
    loss: float  # calibration loss of the unquantized model
    seconds: float  # time spent on the per-sample gradients

    def error(self, bits: int, symmetric: bool) -> np.ndarray:
        return self.errors[error_key(bits, symmetric)]


def fisher_weighted_errors(
    weights: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor]
) -> dict[str, np.ndarray]:
    """error_key -> [L]: 1/2 sum_i F_i (w_i - q(w_i))^2 of each layer (in the order of
    `weights`) at every precision: 2..8 bits symmetric and asymmetric, float16, float32.

    Computed in float64, `ERROR_CHUNK` elements of whole rows at a time: quantization is per
    output channel (row), so a block of rows quantizes as in the whole weight, and the float64
    copies take a few MB instead of several times the largest layer."""
    out = {key: np.zeros(len(weights)) for key in ERROR_KEYS}
    for i, (name, weight) in enumerate(weights.items()):
        weight = weight.detach()
        step = max(1, ERROR_CHUNK // max(1, weight[0].numel()))
        for start in range(0, weight.shape[0], step):
            part = weight[start : start + step]
            f, w = fisher[name][start : start + step].double(), part.double()
            for symmetric in (True, False):
                for bits in INT_BITS:
                    diff = stored_weight(part, bits, symmetric).double() - w
                    out[error_key(bits, symmetric)][i] += 0.5 * float((f * diff.pow(2)).sum())
            diff = stored_weight(part, FP16, True).double() - w
            out["fp16"][i] += 0.5 * float((f * diff.pow(2)).sum())
    return out


@torch.no_grad()
def calibration_loss(denoiser: nn.Module, calib: CalibrationSet, batch_size: int = 64) -> float:
    """The training loss over the whole calibration set (every sample weighs the same)."""
    total = 0.0
    for batch in calib.batches(batch_size):
        total += training_loss(denoiser, calib.flow, batch).item() * len(batch[0])
    return total / len(calib)


def compute_fisher_stats(
    denoiser: nn.Module, calib: CalibrationSet, budget: int | None = None,
    on_progress: FisherProgress | None = None,
) -> FisherStats:
    """Fisher values and Fisher-weighted errors of every quantizable layer of `denoiser`, one
    group of layers at a time (`budget`: bytes of float32 sums per group, see
    engine.quant.fisher_sums; None: chosen from the model's size and the free memory)."""
    if len(calib) == 0:
        raise ValueError("the calibration set is empty")
    layers = quantizable_layers(denoiser)
    names = [name for name, _, _ in layers]
    weights = {name: module.weight for name, module, _ in layers}
    index = {name: i for i, name in enumerate(names)}
    values = np.zeros(len(names))
    errors = {key: np.zeros(len(names)) for key in ERROR_KEYS}
    seconds, start = 0.0, time.perf_counter()
    for part in fisher_by_group(denoiser, calib, names, budget, on_progress):
        seconds += time.perf_counter() - start
        group_errors = fisher_weighted_errors({name: weights[name] for name in part}, part)
        for j, (name, fisher) in enumerate(part.items()):
            values[index[name]] = float(fisher.mean(dtype=torch.float64))
            for key in ERROR_KEYS:
                errors[key][index[name]] = group_errors[key][j]
        del part, fisher  # this group's per-element Fisher is no longer needed
        start = time.perf_counter()
    return FisherStats(names=names, fisher=values, errors=errors, loss=calibration_loss(denoiser, calib),
                       seconds=seconds)


@dataclass
class Sensitivity:
    """Calibration-loss changes when one layer alone is stored at a lower precision."""

    base: float  # loss of the unquantized model
    increase: np.ndarray  # [L] L(q(w)) - L(w): the measured sensitivity
    curvature: np.ndarray  # [L] (L(q(w)) + L(2w - q(w))) / 2 - L(w): the same, first-order term cancelled


@torch.no_grad()
def measured_sensitivity(
    denoiser: nn.Module, calib: CalibrationSet, bits: int, symmetric: bool, batch_size: int = 64,
    on_progress: Progress | None = None,
) -> Sensitivity:
    """Quantize each layer alone (weight at `bits`, bias rounded to float16 as `quantize_`
    does) and measure the calibration loss; the model is left as it was.

    The increase L(w + d) - L(w), with d the layer's quantization error, is g.d + d'Hd/2 + ...,
    where g is the loss gradient on the calibration set: zero in expectation at a trained
    minimum, but not on a finite set, where it can outweigh the curvature term that Fisher
    estimates. The layer is therefore also evaluated at the mirrored weight w - d, and
    (L(w + d) + L(w - d)) / 2 - L(w) = d'Hd/2 + ... cancels the first-order term exactly."""
    base = calibration_loss(denoiser, calib, batch_size)
    layers = quantizable_layers(denoiser)
    increase, curvature = np.zeros(len(layers)), np.zeros(len(layers))
    for i, (_, module, _) in enumerate(layers):
        weight = module.weight.detach().clone()
        bias = module.bias.detach().clone() if module.bias is not None else None
        stored_w = stored_weight(weight, bits, symmetric).to(weight.dtype)
        stored_b = bias.half().to(bias.dtype) if bias is not None and bits != FP32 else bias
        losses = []
        try:
            for sign in (1, -1):  # w + d, then w - d
                module.weight.copy_(weight + sign * (stored_w - weight))
                if bias is not None:
                    module.bias.copy_(bias + sign * (stored_b - bias))
                losses.append(calibration_loss(denoiser, calib, batch_size))
        finally:
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
        increase[i] = losses[0] - base
        curvature[i] = (losses[0] + losses[1]) / 2 - base
        if on_progress:
            on_progress(i + 1, len(layers))
    return Sensitivity(base=base, increase=increase, curvature=curvature)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def spearman(a, b) -> float:
    """Spearman rank correlation of two sequences (nan if either is constant or too short)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two 1-D sequences of one length, got {a.shape} and {b.shape}")
    if len(a) < 2:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / norm) if norm > 0 else float("nan")
