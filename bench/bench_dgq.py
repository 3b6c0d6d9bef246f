"""Sampling time of DGQ over FP32 and over the min-max baseline at the same bits, side by side.

DGQ's activation groups and attention quantizers are simulated in fp32 (hooks on every
quantized layer's input, an attention processor with explicit softmax probabilities), without
unfolding any convolution. Target: DGQ at most 1.5x FP32. Rounds alternate FP32, baseline and
DGQ on the same prompts and noise (guidance 2.0, as the `dgq` experiment); medians are compared.

    .venv/bin/python bench/bench_dgq.py [--model digits-unet] [--images 250] [--rounds 3] [--bits 8 --act-bits 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.data.digits import eval_labels, prompt_for
from engine.methods import validate_method
from engine.models.loader import load_text_to_image
from engine.models.registry import resolve_model
from engine.quant.dgq.calibration import DGQSettings, quantize_dgq
from engine.sampling import initial_noise, sample_images

GUIDANCE = 2.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="digits-unet")
    parser.add_argument("--images", type=int, default=250)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--act-bits", type=int, default=6)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    keys = {"bits": args.bits, "act_bits": args.act_bits, "calibration": {"samples": 8, "steps": 10}}
    sampling = {"guidance": GUIDANCE, "batch_size": 8}
    models = {"FP32": load_text_to_image(path)}
    for name, method, extra in (("min-max", "minmax", {}), ("DGQ", "dgq", {"groups": args.groups})):
        model = load_text_to_image(path)
        params = validate_method(method, {**keys, **extra})
        quantize_dgq(model, DGQSettings.from_params(params, minmax=method == "minmax"), sampling)
        models[name] = model
    prompts = [prompt_for(label) for label in eval_labels(args.images)]
    noise = initial_noise(args.images, models["FP32"].sample_shape, 0)
    for model in models.values():  # warm-up
        sample_images(model, prompts[:10], noise[:10], 2, GUIDANCE, 10)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            start = time.perf_counter()
            sample_images(model, prompts, noise, args.steps, GUIDANCE, args.images)
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.images} images, {args.steps} DDIM steps, guidance {GUIDANCE}, W{args.bits}A{args.act_bits}, "
          f"DGQ g{args.groups}, {args.rounds} alternating rounds, {torch.get_num_threads()} threads")
    print(f"{'variant':<8} {'median s':>9} {'/ FP32':>7} {'/ min-max':>10}  target")
    for name, value in med.items():
        target = "<= 1.5x FP32 " + ("PASS" if value / med["FP32"] <= 1.5 else "FAIL") if name == "DGQ" else ""
        print(f"{name:<8} {value:>9.2f} {value / med['FP32']:>7.3f} {value / med['min-max']:>10.3f}  {target}")


if __name__ == "__main__":
    main()
