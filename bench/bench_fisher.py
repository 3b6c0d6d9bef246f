"""Cost of the Fisher information of method `fisher` against one training epoch.

Fisher: the per-sample squared gradients of the training loss over the calibration set
(`engine.quant.fisher_sums.per_sample_fisher`, one sample per backward pass), which is what the
method computes on the trained weights. Epoch: forward, backward, gradient clipping and an AdamW
step over the same calibration samples in batches of `--chunk`, on a copy of the model, as
`engine train` does. Rounds alternate the two; the medians are compared. Target ratio <= 3.

Printed for information too: the Fisher-weighted errors at every precision (one quantization
per layer and precision) and the measured sensitivity (one calibration pass per layer).

    .venv/bin/python bench/bench_fisher.py [--model digits-unet] [--samples 64] [--chunk 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

from engine.calibration import calibration_for, training_loss
from engine.models.loader import load_text_to_image
from engine.models.registry import resolve_model
from engine.quant import quantizable_layers
from engine.quant.fisher import fisher_weighted_errors, measured_sensitivity
from engine.quant.fisher_sums import per_sample_fisher


def epoch(denoiser: torch.nn.Module, calib, batch_size: int) -> float:
    model = copy.deepcopy(denoiser).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    start = time.perf_counter()
    for batch in calib.batches(batch_size):
        loss = training_loss(model, calib.flow, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="digits-unet")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="There is a performance drop")
    model = load_text_to_image(resolve_model(args.model), torch.device("cpu"))
    calib = calibration_for(model, args.samples, seed=1)
    layers = quantizable_layers(model.denoiser)
    names = [name for name, _, _ in layers]
    per_sample_fisher(model.denoiser, calib, names[:1])  # warm-up
    epoch(model.denoiser, calib, args.chunk)
    fisher_times, epoch_times = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        fisher = per_sample_fisher(model.denoiser, calib, names)
        fisher_times.append(time.perf_counter() - start)
        epoch_times.append(epoch(model.denoiser, calib, args.chunk))
    start = time.perf_counter()
    fisher_weighted_errors({name: module.weight for name, module, _ in layers}, fisher)
    errors_s = time.perf_counter() - start
    start = time.perf_counter()
    measured_sensitivity(model.denoiser, calib, 4, True)
    sensitivity_s = time.perf_counter() - start
    f, e = statistics.median(fisher_times), statistics.median(epoch_times)
    params = sum(module.weight.numel() for _, module, _ in layers)
    print(f"{args.model}: {len(layers)} layers, {params:,} weights; {args.samples} calibration samples, "
          f"batches of {args.chunk}; {torch.get_num_threads()} threads, {args.rounds} alternating rounds")
    print(f"Fisher (per-sample gradients): median {f:.2f} s  {['%.2f' % t for t in fisher_times]}")
    print(f"one training epoch:            median {e:.2f} s  {['%.2f' % t for t in epoch_times]}")
    print(f"ratio Fisher / epoch: {f / e:.2f} (target <= 3): {'ok' if f / e <= 3 else 'OVER'}")
    print(f"for information: Fisher-weighted errors at 16 precisions {errors_s:.2f} s; "
          f"measured sensitivity at W4, both sides ({2 * len(layers)} calibration passes) {sensitivity_s:.2f} s")


if __name__ == "__main__":
    main()
