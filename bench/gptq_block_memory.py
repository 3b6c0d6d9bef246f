"""Peak resident memory of calibrated quantization (gptq / calibrated rtn) against the depth of
an MMDiT of SD 3.5 Medium's block width, to show that it grows with one block, not the model.

    PYTHONPATH=. python bench/gptq_block_memory.py --depths 2 4 --bits 4 --act-bits 8

For each depth it builds (offline, random weights, in a temporary folder) a StableDiffusion3Pipeline
with tiny text encoders and VAE and an SD3Transformer2DModel of width 1536 (24 heads of 64, as
SD 3.5 Medium; latents 8x8, so 16 image tokens), then quantizes it in a fresh subprocess and
prints that process's RSS once the model is loaded (/proc/self/statm) and its peak RSS
(`resource.getrusage`, ru_maxrss, which may be loading's own peak): the difference bounds
what the quantization held above the loaded model. Memory only, no timing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, tempfile
from pathlib import Path
import torch
torch.set_num_threads(1)
from engine.methods import validate_method
from engine.models.loader import load_text_to_image
from engine.quant.gptq_method import quantize_calibrated
from tests.tiny_pipelines import PROMPTS

path, method, keys = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model = load_text_to_image(path, torch.device("cpu"))
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak, MiB (Linux: KiB)
import os
loaded = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20  # now
params = validate_method(method, keys)
sampling = {"guidance": 2.0, "batch_size": 2, "prompts": PROMPTS}
with tempfile.TemporaryDirectory() as folder:
    result = quantize_calibrated(model, method, params, sampling, Path(folder))
    calibration = result.calibration_path.stat().st_size if result.calibration_path else 0
print(json.dumps({"loaded_mib": loaded, "peak_mib": rss(), "calibration_bytes": calibration,
                  "layers": len(result.packed)}))
"""


def build(path: Path, depth: int) -> Path:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from tests.tiny_pipelines import clip_config, tokenizer

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=depth, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=64, caption_projection_dim=1536, pooled_projection_dim=64,
        pos_embed_max_size=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16, shift_factor=0.0609, scaling_factor=1.5035,
                        use_quant_conv=False, use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=CLIPTextModelWithProjection(clip_config(projection_dim=32)).eval(), tokenizer=tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(clip_config(projection_dim=32)).eval(), tokenizer_2=tokenizer(),
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--act-bits", type=int, default=8)
    parser.add_argument("--code", default=".", help="the checkout whose engine quantizes (PYTHONPATH of the child)")
    args = parser.parse_args()
    keys = {"bits": args.bits, "act_bits": args.act_bits, "calibration": {"samples": 2, "held_out": 2, "steps": 2}}
    if args.method == "rtn":
        keys["scope"] = "blocks"
    repo = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory() as tmp:
        for depth in args.depths:
            path = build(Path(tmp) / f"mmdit-{depth}", depth)
            env_path = f"{Path(args.code).resolve()}:{repo}"
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), args.method, json.dumps(keys)],
                                 capture_output=True, text=True, cwd=Path(args.code).resolve(),
                                 env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
            if out.returncode != 0:
                print(f"depth {depth}: failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"depth {depth}: {r['layers']} layers, RSS after loading {r['loaded_mib']:.0f} MiB, peak "
                  f"{r['peak_mib']:.0f} MiB (quantization +{r['peak_mib'] - r['loaded_mib']:.0f} MiB), "
                  f"calibration file {r['calibration_bytes'] / 2**20:.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
