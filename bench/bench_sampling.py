"""Sampling time of a weight-quantized variant over full precision, measured side by side.

Weights are quantized once before sampling (simulated in fp32), so a W4 or W8 variant should
sample at full-precision cost: target ratio at most 1.05. Rounds alternate FP and quantized
on the same prompts and noise; the median of each is compared.

    .venv/bin/python bench/bench_sampling.py [--model models/digits-unet] [--images 250] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.data.digits import eval_labels, prompt_for
from engine.models.loader import load_text_to_image
from engine.models.registry import resolve_model
from engine.quant import RTNConfig, quantize_
from engine.sampling import initial_noise, sample_images


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="digits-unet")
    parser.add_argument("--images", type=int, default=250)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    fp = load_text_to_image(path)
    models = {"FP32": fp}
    for bits in (4, 8):
        q = load_text_to_image(path)
        quantize_(q.denoiser, RTNConfig(bits={"conv": bits, "attention": bits, "linear": bits}))
        models[f"W{bits}"] = q
    prompts = [prompt_for(l) for l in eval_labels(args.images)]
    noise = initial_noise(args.images, fp.sample_shape, 0)
    times: dict[str, list[float]] = {name: [] for name in models}
    sample_images(fp, prompts[:10], noise[:10], 2, 2.0, 10)  # warm-up
    for _ in range(args.rounds):
        for name, model in models.items():
            start = time.perf_counter()
            sample_images(model, prompts, noise, args.steps, 1.0, 250)
            times[name].append(time.perf_counter() - start)
    base, base_median = min(times["FP32"]), statistics.median(times["FP32"])
    print(f"{args.images} images, {args.steps} DDIM steps, no guidance, {args.rounds} alternating rounds, "
          f"{torch.get_num_threads()} threads")
    print(f"{'variant':<8} {'median s':>9} {'ratio':>7} {'best s':>8} {'ratio':>7}  target (medians)")
    for name, values in times.items():
        median = statistics.median(values)
        ratio = median / base_median
        target = "" if name == "FP32" else ("<= 1.05 " + ("PASS" if ratio <= 1.05 else "FAIL"))
        print(f"{name:<8} {median:>9.2f} {ratio:>7.3f} {min(values):>8.2f} {min(values) / base:>7.3f}  {target}")


if __name__ == "__main__":
    main()
