"""What one run does, top to bottom: load, quantize, store the packed weights, load them
back, sample, evaluate, save artifacts.

The images are always sampled from the weights loaded back from the run's checkpoint, so
every number describes the stored quantized model, never the unquantized one.
"""

from __future__ import annotations

import json
import time

import torch

from engine.evaluate import EVAL_FILE, Evaluator
from engine.grids import SAMPLES_FILE, comparison_grid, comparison_path, run_grid, save_samples, to_uint8
from engine.paired_runs import update_paired
from engine.models.loader import load_text_to_image
from engine.execution import prepare_execution
from engine.methods import QuantContext, QuantResult, quantize_model
from engine.quant.checkpoint import dense_bytes, store_and_reload
from engine.quant.packing import bits_per_weight
from engine.run_config import RunConfig
from engine.run_memory import run_peak
from engine.prompts import sampling_prompts
from engine.sampling import InitialLatents, sample_images
from engine.store import Store

CHECKPOINT_FILE = "weights.safetensors"


def mean_bits(layers: list[dict]) -> float:
    total = sum(layer["params"] for layer in layers)
    return sum(layer["params"] * (layer["bits"] or 32) for layer in layers) / max(total, 1)


def quantize_stage(store: Store, run_id: int, run: RunConfig, model, reporter) -> tuple[QuantResult, dict]:
    """Quantize with the run's method, store the packed checkpoint and load it back (so every
    later number comes from the stored file). Returns (the method's result, metrics)."""
    folder = store.run_folder(run_id)
    fp32_bytes = dense_bytes(model.denoiser, torch.float32)
    metrics = {"size_fp32_bytes": fp32_bytes, "size_fp16_bytes": dense_bytes(model.denoiser, torch.float16)}
    reporter.progress("quantize", 0, 1, f"method {run.method}")
    start = time.time()
    ctx = QuantContext(model=model, run=run, folder=folder, cache_dir=store.runs_dir / "cache",
                       fp32_bytes=fp32_bytes, progress=reporter.progress)
    result = quantize_model(ctx)
    stored = time.time()
    if result.checkpoint is not None:  # a method's own format (PTQ's int8 graph tensors)
        size = result.checkpoint.stat().st_size
        store.add_artifact(run_id, "checkpoint", result.checkpoint)
    elif result.packed is None:
        size, metrics["bits_per_weight"] = fp32_bytes, None  # nothing is packed
    else:
        path = folder / CHECKPOINT_FILE
        size = store_and_reload(model.denoiser, result.packed, result.half, path)
        metrics["bits_per_weight"] = bits_per_weight(path)
        if result.max_bytes is not None and size > result.max_bytes:
            raise RuntimeError(f"{path}: {size} bytes exceed the budget of {result.max_bytes}")
        store.add_artifact(run_id, "checkpoint", path)
    for kind, path in result.artifacts.items():
        store.add_artifact(run_id, kind, path)
    checkpoint_s = time.time() - stored
    metrics.update(size_bytes=size, size_ratio=size / fp32_bytes, mean_bits=mean_bits(result.layers),
                   quantize_s=time.time() - start, checkpoint_s=checkpoint_s)
    metrics.update(result.metrics)  # e.g. calibration_s, and quantize_s without the calibration
    if "quantize_s" in result.metrics:  # the method's own quantize_s, plus storing and reloading
        metrics["quantize_s"] = result.metrics["quantize_s"] + checkpoint_s
    store.put_layers(run_id, result.layers)
    reporter.progress("quantize", 1, 1)
    return result, metrics


def execute(store: Store, run_id: int, config: dict, reporter) -> None:
    run = RunConfig.from_dict(config)
    folder = store.run_folder(run_id)
    folder.mkdir(parents=True, exist_ok=True)
    sampling = run.sampling
    torch.manual_seed(sampling.seed)

    reporter.progress("load", 0, 2, "loading models")
    model = load_text_to_image(run.model.path, options=run.model_options)
    n = sampling.samples
    prompts, labels = model.eval_prompts(n, sampling_prompts(sampling))
    reporter.progress("load", 1, 2, "feature model, reference statistics, CLIP")
    evaluator = Evaluator.from_config(config, model.device, store.runs_dir / "cache")
    reporter.progress("load", 2, 2)

    result, metrics = quantize_stage(store, run_id, run, model, reporter)
    checkpoint = folder / CHECKPOINT_FILE if result.packed is not None else None
    result.packed = None  # the codes are in the checkpoint now: sampling must not hold them (1 byte a weight)
    runtime = prepare_execution(model, run, result, checkpoint, reporter.progress)
    metrics.update(runtime.metrics)  # model_bytes, compile_s

    noise = InitialLatents(n, model.sample_shape, sampling.seed)
    start = time.time()
    with runtime.sampling() as memory:
        images = sample_images(
            model, prompts, noise, sampling.steps, sampling.guidance, sampling.batch_size,
            on_progress=lambda done, total: reporter.progress("sampling", done, total),
            negative_prompt=sampling.negative_prompt,
        )
    latency_ms = (time.time() - start) * 1000 / n

    reporter.progress("metrics", 0, 1, "FID, prompt accuracy, CLIP score")
    metrics.update(evaluator.evaluate(images, prompts, labels, folder, run.eval.bootstrap, sampling.seed))
    store.add_artifact(run_id, "eval", folder / EVAL_FILE)
    metrics.update(latency_ms=latency_ms, **memory)  # peak_mem_mb: engine.execution
    reporter.progress("metrics", 1, 1)

    reporter.progress("save", 0, 1, "grids")
    images_u8 = to_uint8(images)
    save_samples(folder / SAMPLES_FILE, images_u8, labels)
    store.add_artifact(run_id, "samples", folder / SAMPLES_FILE)
    store.add_artifact(run_id, "grid", run_grid(images_u8, folder / "grid.png"))
    metrics["dtype_bits"] = torch.finfo(model.dtype).bits  # the dtype it sampled in (labels "FP32"/"BF16")
    store.put_metrics(run_id, metrics)
    update_comparison(store, run.experiment, run_id)
    update_paired(store, run_id)
    store.put_metrics(run_id, run_peak(model.device))  # run_peak_mem_mb: every stage, the last included
    reporter.progress("save", 1, 1)


def update_comparison(store: Store, experiment: str, run_id: int) -> None:
    """The side-by-side grid of this run with the latest finished run of each other variant
    that shares its sampling (samples, steps, guidance, seed), one labelled column per run.
    Its file is named by the set of runs (`grids.comparison_path`): no other set overwrites it."""
    this = store.get_run(run_id)
    keys = ("samples", "steps", "guidance", "seed")
    sampling = {k: json.loads(this["config"])["sampling"].get(k) for k in keys}
    latest: dict[str, dict] = {}
    for run in store.runs(experiment=experiment):
        if run["id"] != run_id and run["status"] != "done":
            continue
        if {k: json.loads(run["config"])["sampling"].get(k) for k in keys} != sampling:
            continue
        latest[run["variant"]] = run
    latest[this["variant"]] = this
    columns, ids = [], []
    for variant, run in sorted(latest.items(), key=lambda kv: (kv[0] != "fp", kv[0])):
        path = store.runs_dir / run["folder"] / SAMPLES_FILE
        if path.exists():
            columns.append((f"{variant} #{run['id']}", path))
            ids.append(run["id"])
    if columns:
        out = comparison_grid(columns, comparison_path(store.runs_dir, experiment, ids))
        store.add_artifact(run_id, "comparison", out)
