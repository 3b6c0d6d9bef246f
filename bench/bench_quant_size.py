"""On-disk size of the digits UNet checkpoint: FP32, FP16 and packed RTN W2..W8 / W4+attn W8.

Loads `models/digits-unet/unet` when it exists (or the folder given with --model), otherwise
builds the shipped architecture with random weights (torch.manual_seed(0)); the sizes of the
packed format do not depend on the weight values. Prints bytes and the ratio to the FP32
checkpoint (both written with safetensors), the targets with PASS/FAIL, the stored bits per
quantized weight (codes, scales and zeros: `bits_per_weight`), whether the codes take exactly
ceil(n x bits / 8) bytes per layer (dense packing) and whether `load_packed` reproduces the
quantized model exactly, and the bytes of each file by part. Exits with status 1 if a target
is missed, the codes are not dense or a round trip is not exact.

    .venv/bin/python bench/bench_quant_size.py [--model PATH] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.quant import RTNConfig, bits_per_weight, load_packed, quantize_, save_dense, save_packed  # noqa: E402
from engine.quant.packing import packed_breakdown  # noqa: E402

DEFAULT_MODEL = REPO / "models" / "digits-unet" / "unet"
# bits / 32 of the FP32 size, plus about 1.1% that stays (scales, biases, norms, header)
TARGETS = {"W2": 0.075, "W3": 0.105, "W4": 0.14, "W5": 0.17, "W6": 0.20, "W7": 0.23, "W8": 0.26}
VARIANTS = {f"W{b}": {"conv": b, "attention": b, "linear": b} for b in range(8, 1, -1)}
VARIANTS["W4 attn W8"] = {"conv": 4, "attention": 8, "linear": 4}
PARTS = ("header", "codes", "scales", "zeros", "biases", "other")


def build_unet(model_dir: Path):
    from diffusers import UNet2DConditionModel

    if model_dir.is_dir():
        return UNet2DConditionModel.from_pretrained(model_dir), str(model_dir)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return unet, "shipped architecture, random init (seed 0)"


def round_trip_exact(path: Path, model: torch.nn.Module) -> bool:
    loaded = load_packed(path)
    expected = model.state_dict()
    return loaded.keys() == expected.keys() and all(
        torch.equal(loaded[k], v.to(loaded[k].dtype)) for k, v in expected.items()
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="diffusers UNet folder")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    start = time.time()
    unet, source = build_unet(args.model)
    unet.eval()
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    params = sum(p.numel() for p in unet.parameters())
    rows: list[tuple[str, int, dict[str, int], dict | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, dtype in (("FP32", torch.float32), ("FP16", torch.float16)):
            path = Path(tmp) / f"{name}.safetensors"
            rows.append((name, save_dense(path, unet, dtype), packed_breakdown(path), None))
        for name, bits in VARIANTS.items():
            unet.load_state_dict(state)
            report = quantize_(unet, RTNConfig(bits=dict(bits)))
            path = Path(tmp) / f"{name.replace(' ', '_')}.safetensors"
            size = save_packed(path, unet, report.packed)
            parts = packed_breakdown(path)
            dense = sum(-(-qt.codes.numel() * qt.bits // 8) for qt in report.packed.values())
            checks = {"exact": round_trip_exact(path, unet), "dense": parts["codes"] == dense,
                      "bpw": bits_per_weight(path)}
            rows.append((name, size, parts, checks))

    fp32 = rows[0][1]
    ok = True
    print(f"model: {source}, {params:,} parameters\n")
    print(f"{'variant':<11} {'bytes':>10} {'ratio':>7} {'target':>8} {'status':>6} {'bits/w':>7} "
          f"{'dense':>6} {'exact':>6}")
    for name, size, _, checks in rows:
        ratio = size / fp32
        target, status = "", ""
        if name in TARGETS:
            passed = ratio <= TARGETS[name]
            ok &= passed
            target, status = f"<= {TARGETS[name]:.3f}", "PASS" if passed else "FAIL"
        if checks is None:
            bpw = dense = exact = ""
        else:
            ok &= checks["exact"] and checks["dense"]
            bpw = f"{checks['bpw']:.3f}"
            dense, exact = ("yes" if checks[k] else "NO" for k in ("dense", "exact"))
        print(f"{name:<11} {size:>10,} {ratio:>7.4f} {target:>8} {status:>6} {bpw:>7} {dense:>6} {exact:>6}")

    print("\nbytes by part (other: tensors stored as-is: norms, embeddings, unquantized layers)")
    print(f"{'variant':<11} " + " ".join(f"{p:>9}" for p in PARTS) + f" {'total':>10}")
    for name, size, parts, _ in rows:
        assert sum(parts.values()) == size
        print(f"{name:<11} " + " ".join(f"{parts[p]:>9,}" for p in PARTS) + f" {size:>10,}")
    print(f"\n{'all targets met' if ok else 'TARGET MISSED'} ({time.time() - start:.1f}s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
