"""Peak memory of method `fisher`'s statistics on a UNet of Stable Diffusion 1.5's published
configuration (random weights, built offline), against the size of its weights.

Builds `UNet2DConditionModel` with SD 1.5's widths (320, 640, 1280, 1280), cross-attention
width 768 and `--layers-per-block` layers per block (2 is the published model: 860M
parameters; 1 gives 579M), a calibration set of `--samples` random latents at `--latent`
(32 = 256x256 images) with 77 random text states each, and runs what the method runs
(`engine.quant.fisher_method._fisher_stats`: the per-sample Fisher, the Fisher-weighted errors,
the calibration loss). Prints the process's peak RSS (ru_maxrss) after building the model and
at the end, and their ratio to the weights' bytes. Run it in a fresh process, once per
implementation (PYTHONPATH chooses the engine):

    PYTHONPATH=. .venv/bin/python bench/bench_fisher_memory.py [--layers-per-block 1] [--samples 4]
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings

import numpy as np
import torch

GIB = 1 << 30


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def sd15_unet(layers_per_block: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers-per-block", type=int, default=1)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--skip-errors", action="store_true",
                        help="leave out the Fisher-weighted errors (14 RTN quantizations of every weight: "
                             "minutes at this size), for a quicker measurement of the gradient stage")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import engine
    from engine.calibration import CalibrationSet
    from engine.quant import fisher
    from engine.quant.fisher_method import _fisher_stats

    if args.skip_errors:  # the same in the implementation before and after: the module's global
        fisher.fisher_weighted_errors = lambda weights, _: {k: np.zeros(len(weights)) for k in fisher.ERROR_KEYS}

    torch.manual_seed(0)
    unet = sd15_unet(args.layers_per_block)
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    n, g = args.samples, torch.Generator().manual_seed(1)
    shape = (n, 4, args.latent, args.latent)
    calib = CalibrationSet(noisy=torch.randn(shape, generator=g), timesteps=torch.randint(0, 1000, (n,), generator=g),
                           states=torch.randn((n, 77, 768), generator=g), pooled=torch.zeros((n, 0)),
                           target=torch.randn(shape, generator=g), flow=False, prompts=[""] * n,
                           indices=torch.arange(n))
    loaded = peak_rss()
    start = time.perf_counter()
    stats = _fisher_stats(unet, calib, lambda stage, done, total, message="": print(
        f"{time.perf_counter() - start:6.0f} s  {stage} {done}/{total}  peak RSS {peak_rss() / GIB:.2f} GiB",
        flush=True))
    seconds = time.perf_counter() - start
    peak = peak_rss()
    print(f"engine {engine.__file__}")
    print(f"UNet layers_per_block={args.layers_per_block}: {weights / 4 / 1e6:.1f}M parameters, "
          f"{weights / GIB:.2f} GiB; {len(stats.names)} quantizable layers; {n} samples at {args.latent}x{args.latent}")
    print(f"peak RSS after building: {loaded / GIB:.2f} GiB; after the Fisher statistics: {peak / GIB:.2f} GiB "
          f"({peak / weights:.2f}x the weights; {(peak - loaded) / GIB:.2f} GiB above the model) in {seconds:.0f} s")


if __name__ == "__main__":
    main()
