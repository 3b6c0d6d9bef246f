"""What one run does, top to bottom: load, quantize, store the packed weights, load them
back, sample, evaluate, save artifacts.

The images are always sampled from the weights loaded back from the run's checkpoint, so
every number describes the stored quantized model, never the unquantized one.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from engine.data.digits import eval_labels, prompt_for
from engine.evaluate import EVAL_FILE, Evaluator
from engine.grids import SAMPLES_FILE, comparison_grid, run_grid, save_samples, to_uint8
from engine.models.loader import load_text_to_image
from engine.quant import RTNConfig, load_packed, quantizable_layers, quantize_, save_packed
from engine.quant.calibration_hessians import CALIBRATION_FILE
from engine.quant.gptq_method import needs_calibration
from engine.sampling import initial_noise, sample_images
from engine.store import Store

CHECKPOINT_FILE = "weights.safetensors"


def dense_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the model's safetensors checkpoint in dtype (what save_pretrained writes)."""
    from safetensors.torch import save

    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    return len(save(state))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def quantize_and_reload(denoiser: torch.nn.Module, method: str, params: dict, folder: Path,
                        config: RTNConfig | None = None):
    """Quantize in place, write the packed checkpoint, load it back into the model and check
    that the loaded weights are exactly the simulated ones. Returns (layers, size_bytes).
    `config` (for methods that plan per-layer precisions) replaces the one built from params."""
    if method == "none":
        layers = [
            {"name": name, "role": role, "params": module.weight.numel(), "bits": None, "weight_err": None}
            for name, module, role in quantizable_layers(denoiser)
        ]
        return layers, dense_bytes(denoiser, torch.float32)
    if config is None:
        if method != "rtn":
            raise ValueError(f"unknown method {method!r}")
        config = RTNConfig.from_dict(params)
    report = quantize_(denoiser, config)
    path = folder / CHECKPOINT_FILE
    size = save_packed(path, denoiser, report.packed, report.half)
    simulated = {k: v.detach().cpu().clone() for k, v in denoiser.state_dict().items()}
    loaded = load_packed(path)
    for key, value in simulated.items():
        if not torch.equal(loaded[key].to(value.dtype), value):
            raise RuntimeError(f"{path}: {key} differs from the simulated quantized weight")
    denoiser.load_state_dict(loaded, strict=True)
    return report.layers, size


def calibrated_and_reload(model, config: dict, folder: Path, reporter) -> tuple[list[dict], int, dict]:
    """GPTQ, or RTN with activation quantization: calibrate with the full-precision model,
    quantize, then store and reload exactly as `quantize_and_reload` does (the activation
    scales are buffers of the quantized layers, so they travel in the same checkpoint).
    Returns (layers, size_bytes, timings)."""
    from engine.quant.gptq_method import quantize_calibrated

    result = quantize_calibrated(model, config["method"], config["params"], config["sampling"], folder,
                                 reporter.progress)
    path = folder / CHECKPOINT_FILE
    size = save_packed(path, model.denoiser, result.packed)
    simulated = {k: v.detach().cpu().clone() for k, v in model.denoiser.state_dict().items()}
    loaded = load_packed(path)
    for key, value in simulated.items():
        if not torch.equal(loaded[key].to(value.dtype), value):
            raise RuntimeError(f"{path}: {key} differs from the simulated quantized weight")
    model.denoiser.load_state_dict(loaded, strict=True)
    return result.layers, size, result.metrics


def fisher_and_reload(model, config: dict, folder: Path, cache_dir: Path, fp32_bytes: int,
                      reporter) -> tuple[list[dict], int, dict]:
    """Method `fisher`: plan per-layer precisions from Fisher information (statistics cached in
    `cache_dir`), then quantize, store and reload as `quantize_and_reload` does.
    Returns (layers with their Fisher statistics, size_bytes, metrics)."""
    from engine.quant.fisher_method import plan_fisher

    plan = plan_fisher(model, config["params"], fp32_bytes, cache_dir, reporter.progress)
    layers, size = quantize_and_reload(model.denoiser, "fisher", config["params"], folder, plan.config)
    if plan.max_bytes is not None and size > plan.max_bytes:
        raise RuntimeError(f"{folder / CHECKPOINT_FILE}: {size} bytes exceed the budget of {plan.max_bytes}")
    return plan.annotate(layers), size, plan.metrics


def mean_bits(layers: list[dict]) -> float:
    total = sum(layer["params"] for layer in layers)
    return sum(layer["params"] * (layer["bits"] or 32) for layer in layers) / max(total, 1)


def execute(store: Store, run_id: int, config: dict, reporter) -> None:
    folder = store.run_folder(run_id)
    folder.mkdir(parents=True, exist_ok=True)
    sampling = config["sampling"]
    torch.manual_seed(sampling["seed"])

    reporter.progress("load", 0, 2, "loading models")
    model = load_text_to_image(config["model"]["path"])
    reporter.progress("load", 1, 2, "feature model, reference statistics, CLIP")
    evaluator = Evaluator.from_config(config, model.device, store.runs_dir / "cache")
    reporter.progress("load", 2, 2)
    fp32_bytes = dense_bytes(model.denoiser, torch.float32)
    fp16_bytes = dense_bytes(model.denoiser, torch.float16)

    reporter.progress("quantize", 0, 1, f"method {config['method']}")
    start = time.time()
    timings = {}
    if needs_calibration(config["method"], config["params"]):
        layers, size, timings = calibrated_and_reload(model, config, folder, reporter)
        store.add_artifact(run_id, "calibration", folder / CALIBRATION_FILE)
    elif config["method"] == "fisher":
        layers, size, timings = fisher_and_reload(model, config, folder, store.runs_dir / "cache", fp32_bytes,
                                                  reporter)
    else:
        layers, size = quantize_and_reload(model.denoiser, config["method"], config["params"], folder)
    quantize_seconds = time.time() - start
    store.put_layers(run_id, layers)
    if config["method"] != "none":
        store.add_artifact(run_id, "checkpoint", folder / CHECKPOINT_FILE)
    reporter.progress("quantize", 1, 1)

    n = sampling["samples"]
    labels = eval_labels(n)
    prompts = [prompt_for(label) for label in labels]
    noise = initial_noise(n, model.sample_shape, sampling["seed"])
    start = time.time()
    images = sample_images(
        model, prompts, noise, sampling["steps"], sampling["guidance"], sampling["batch_size"],
        on_progress=lambda done, total: reporter.progress("sampling", done, total),
    )
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    latency_ms = (time.time() - start) * 1000 / n

    reporter.progress("metrics", 0, 1, "FID, prompt accuracy, CLIP score")
    metrics = evaluator.evaluate(images, prompts, labels, folder, config["eval"]["bootstrap"], sampling["seed"])
    store.add_artifact(run_id, "eval", folder / EVAL_FILE)
    metrics.update(
        size_bytes=size,
        size_ratio=size / fp32_bytes,
        size_fp32_bytes=fp32_bytes,
        size_fp16_bytes=fp16_bytes,
        latency_ms=latency_ms,
        peak_mem_mb=peak_memory_mb(model.device),
        mean_bits=mean_bits(layers),
        quantize_s=quantize_seconds,
    )
    metrics.update(timings)  # calibration_s, and quantize_s without the calibration
    reporter.progress("metrics", 1, 1)

    reporter.progress("save", 0, 1, "grids")
    images_u8 = to_uint8(images)
    save_samples(folder / SAMPLES_FILE, images_u8, labels)
    store.add_artifact(run_id, "samples", folder / SAMPLES_FILE)
    store.add_artifact(run_id, "grid", run_grid(images_u8, folder / "grid.png"))
    store.put_metrics(run_id, metrics)
    update_comparison(store, config["experiment"], run_id)
    reporter.progress("save", 1, 1)


def update_comparison(store: Store, experiment: str, run_id: int) -> None:
    """Rebuild the experiment's side-by-side grid from the latest finished run of each
    variant (including this one, about to be marked done) that shares this run's sampling."""
    this = store.get_run(run_id)
    sampling = json.loads(this["config"])["sampling"]
    latest: dict[str, dict] = {}
    for run in store.runs(experiment=experiment):
        if run["id"] != run_id and run["status"] != "done":
            continue
        if json.loads(run["config"])["sampling"]["seed"] != sampling["seed"]:
            continue
        latest[run["variant"]] = run
    columns = []
    for variant, run in sorted(latest.items(), key=lambda kv: (kv[0] != "fp", kv[0])):
        path = store.runs_dir / run["folder"] / SAMPLES_FILE
        if path.exists():
            columns.append((variant, path))
    if columns:
        out = store.runs_dir / f"{experiment}-comparison.png"
        comparison_grid(columns, out)
        store.add_artifact(run_id, "comparison", out)
