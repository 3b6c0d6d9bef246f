"""Real low-bit execution against FP32, measured side by side in one run, on the shipped
digits-unet and digits-mmdit:

- model_bytes (the denoiser's parameters and buffers as held in memory) of real W4 and W8
  (engine.quant.lowbit: codes + fp16 scales, dequantized one layer at a time in forward) over
  FP32; targets W4 <= 0.30, W8 <= 0.55;
- sampling time (DDIM / flow Euler with guidance, the same prompts and noise) of real W4 and W8
  over FP32; target <= 1.3; and beside them bf16 autocast and the best real integer path here:
  torchao PT2E static W8A8 (X86InductorQuantizer) compiled by Inductor into int8 kernels, next to
  torch.compile of FP32 (compile times printed apart). PT2E runs on the UNet; `--pt2e-mmdit`
  adds the MMDiT. `--no-compile` skips both compiled paths.
Rounds alternate the variants; medians are compared. The numbers are what this machine gives.

    .venv/bin/python bench/bench_lowbit.py [--images 125] [--steps 10] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from engine.data.digits import eval_labels, prompt_for
from engine.models.loader import load_text_to_image
from engine.models.registry import resolve_model
from engine.quant import RTNConfig, quantize_
from engine.quant.checkpoint import store_and_reload
from engine.quant.lowbit import model_bytes, to_lowbit
from engine.sampling import initial_noise, sample_images

GUIDANCE = 2.0


class Variant:
    def __init__(self, name, model, autocast=None, nbytes=None, note=""):
        self.name, self.model, self.autocast, self.note = name, model, autocast, note
        self.nbytes = model_bytes(model.denoiser) if nbytes is None else nbytes
        self.times: list[float] = []

    def sample(self, prompts, noise, steps, batch):
        cast = torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else torch.autocast("cpu", enabled=False)
        with cast:
            return sample_images(self.model, prompts, noise, steps, GUIDANCE, batch)


def real_variant(path: Path, bits: int, tmp: Path) -> Variant:
    model = load_text_to_image(path)
    report = quantize_(model.denoiser, RTNConfig(bits={"conv": bits, "attention": bits, "linear": bits}))
    ckpt = tmp / f"w{bits}.safetensors"
    store_and_reload(model.denoiser, report.packed, report.half, ckpt)
    to_lowbit(model.denoiser, ckpt)
    return Variant(f"real W{bits}", model)


def compiled_fp32(path: Path, example_batch: int, prompts, noise, steps) -> tuple[Variant, float]:
    model = load_text_to_image(path)
    model.denoiser = CompiledDenoiser(model.denoiser)
    start = time.perf_counter()
    sample_images(model, prompts[:example_batch], noise[:example_batch], 1, GUIDANCE, example_batch)
    return Variant("FP32 compiled", model, nbytes=model_bytes(model.denoiser.inner)), time.perf_counter() - start


class CompiledDenoiser(torch.nn.Module):
    def __init__(self, denoiser):
        super().__init__()
        self.inner, self.config = denoiser, denoiser.config
        self.compiled = torch.compile(denoiser)

    def forward(self, *args):
        return self.compiled(*args)


def pt2e_variant(path: Path, images: int, tmp: Path) -> tuple[Variant, float, float]:
    from engine.quant.ptq.pt2e import graph_bytes, quantize_pt2e

    model = load_text_to_image(path)
    sampling = {"batch_size": images, "guidance": GUIDANCE}
    # A speed benchmark: a small calibration set (the experiment's is 32 prompts x 20 steps).
    runtime, metrics, _ = quantize_pt2e(model, {"samples": 8, "held_out": 1, "seed": 1, "steps": 10}, sampling, tmp)
    model.denoiser, extra = runtime.executable("real")
    prep = metrics["export_s"] + metrics["calibration_s"] + metrics["quantize_s"]
    return Variant("PT2E W8A8 int8 compiled", model, nbytes=graph_bytes(runtime.converted)), prep, extra["compile_s"]


def bench_model(name: str, args, tmp: Path) -> None:
    path = resolve_model(name)
    prompts = [prompt_for(l) for l in eval_labels(args.images)]
    fp = load_text_to_image(path)
    noise = initial_noise(args.images, fp.sample_shape, 0)
    variants = [Variant("FP32", fp), Variant("bf16 autocast", load_text_to_image(path), autocast="bf16"),
                real_variant(path, 4, tmp), real_variant(path, 8, tmp)]
    notes = []
    if not args.no_compile:
        variant, compile_s = compiled_fp32(path, args.images, prompts, noise, args.steps)
        variants.append(variant)
        notes.append(f"FP32 torch.compile: {compile_s:.0f} s to compile")
        if name == "digits-unet" or args.pt2e_mmdit:
            variant, prep_s, compile_s = pt2e_variant(path, args.images, tmp)
            variants.append(variant)
            notes.append(f"PT2E: export + calibration + convert {prep_s:.0f} s, compile {compile_s:.0f} s")
    reference = None
    with torch.no_grad():
        variants[0].sample(prompts[:4], noise[:4], 2, 4)  # warm-up
        for _ in range(args.rounds):
            for v in variants:
                start = time.perf_counter()
                images = v.sample(prompts, noise, args.steps, args.images)
                v.times.append(time.perf_counter() - start)
                if v.name == "FP32":
                    reference = images
                elif v.name.startswith("real") and not hasattr(v, "diff"):
                    v.diff = (images - reference).abs().max().item()
    fp_bytes, fp_time = variants[0].nbytes, statistics.median(variants[0].times)
    print(f"\n{name}: {args.images} images, {args.steps} steps, guidance {GUIDANCE} (batch {2 * args.images}), "
          f"{args.rounds} alternating rounds, {torch.get_num_threads()} threads")
    print(f"{'variant':<24} {'model MB':>9} {'bytes/FP32':>10} {'median s':>9} {'time/FP32':>9}  targets")
    targets = {"real W4": 0.30, "real W8": 0.55}
    for v in variants:
        ratio_b, ratio_t = v.nbytes / fp_bytes, statistics.median(v.times) / fp_time
        mark = ""
        if v.name in targets:
            mark = (f"bytes <= {targets[v.name]:.2f} {'PASS' if ratio_b <= targets[v.name] else 'FAIL'}, "
                    f"time <= 1.30 {'PASS' if ratio_t <= 1.3 else 'FAIL'}")
        print(f"{v.name:<24} {v.nbytes / 2**20:>9.2f} {ratio_b:>10.3f} {statistics.median(v.times):>9.2f} "
              f"{ratio_t:>9.3f}  {mark}")
    for note in notes:
        print("  " + note)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=125)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    parser.add_argument("--models", nargs="+", default=["digits-unet", "digits-mmdit"])
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile FP32 and PT2E int8")
    parser.add_argument("--pt2e-mmdit", action="store_true", help="also run PT2E int8 on the MMDiT")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            bench_model(name, args, Path(tmp))


if __name__ == "__main__":
    main()
