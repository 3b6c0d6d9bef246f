"""Test helpers for qtui: a catalogue with a stand-in model, and stores filled with fake runs.

`fill_demo(runs_dir)` writes a small deterministic database (fixed timestamps, no running
runs) that the Pilot and snapshot tests share. `add_run` writes one run with whatever the
test needs. Nothing here needs torch: the "model" is a directory with a model_index.json
and the component files the catalogue checks (empty weights).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from engine.store import Store

T0 = "2026-01-01T12:00:00.000+00:00"
T1 = "2026-01-01T12:03:20.000+00:00"

CATALOGUE = """
[experiments.digits-rtn]
description = "Round-to-nearest at several widths"
model = "tiny-model"
feature_model = "tiny-model"
samples = 64
steps = 5

[experiments.digits-rtn.variants.fp32]
method = "none"

[experiments.digits-rtn.variants.w8]
bits = 8

[experiments.digits-rtn.variants.w4]
bits = 4

[experiments.digits-rtn.variants.w2]
bits = 2

[experiments.digits-mixed]
model = "tiny-model"
feature_model = "tiny-model"
samples = 64
steps = 5

[experiments.digits-mixed.variants.attn8-conv4]
bits = { attention = 8, conv = 4, linear = 8 }

[experiments.digits-mixed.variants.conv8-attn4]
bits = { attention = 4, conv = 8, linear = 4 }
"""


def write_catalogue(directory: Path, text: str = CATALOGUE) -> Path:
    model = directory / "tiny-model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "model_index.json").write_text('{"_class_name": "QtuiDigitsPipeline"}')
    for component, config in (("unet", "config.json"), ("text_encoder", "config.json"),
                              ("scheduler", "scheduler_config.json")):  # the files the catalogue checks
        (model / component).mkdir(exist_ok=True)
        (model / component / config).write_text('{"sample_size": 16}')
        if component != "scheduler":
            (model / component / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    path = directory / "experiments.toml"
    path.write_text(text)
    return path


BLOCKS = [
    ("conv_in", ["conv_in"], "conv"),
    ("time_embedding", ["time_embedding.linear_1", "time_embedding.linear_2"], "linear"),
]
for _b in range(3):
    BLOCKS.append((f"down_blocks.{_b}", [
        f"down_blocks.{_b}.resnets.0.conv1", f"down_blocks.{_b}.resnets.0.conv2",
        f"down_blocks.{_b}.attentions.0.to_q", f"down_blocks.{_b}.attentions.0.to_k",
        f"down_blocks.{_b}.attentions.0.to_v", f"down_blocks.{_b}.attentions.0.to_out.0",
    ], None))
BLOCKS.append(("conv_out", ["conv_out"], "conv"))


def layer_names() -> list[tuple[str, str]]:
    out = []
    for _, names, role in BLOCKS:
        for name in names:
            r = role or ("attention" if ".attentions." in name else "conv")
            out.append((name, r))
    return out


def fake_layers(bits: dict[str, int] | None, seed: int = 0, count: int | None = None) -> list[dict]:
    """Layer rows like the worker's: bits per role (None = full precision)."""
    names = layer_names()
    if count is not None:  # a bigger model: repeat the pattern with more blocks
        names = [(f"blocks.{i // 8}.layer{i % 8}" + (".conv" if i % 3 else ".to_q"),
                  "conv" if i % 3 else "attention") for i in range(count)]
    rows = []
    for i, (name, role) in enumerate(names):
        b = None if bits is None else bits.get(role)
        err = 0.0 if b is None else 2.0 ** (-b) * (1 + ((i * 7 + seed) % 5) / 10)
        rows.append({
            "name": name, "role": role, "params": 1000 + 100 * i, "bits": b, "weight_err": err,
            "fisher": None, "sensitivity": (i % 4 + 1) * 0.01 if b is not None else None,
            "out_err": None, "extra": None,
        })
    return rows


def add_run(
    store: Store,
    experiment: str,
    variant: str,
    status: str = "done",
    metrics: dict | None = None,
    layers: list[dict] | None = None,
    events: list[tuple[str, int, int]] = (),
    artifacts: list[tuple[str, str]] = (),
    error: str | None = None,
    pid: int | None = None,
    log: str | None = None,
    times: tuple[str | None, str | None] = (T0, T1),
    config: dict | None = None,
) -> int:
    config = config or {"experiment": experiment, "variant": variant}
    run_id = store.create_run(experiment, variant, config, f"hash-{experiment}-{variant}")
    update = {"status": status, "created_at": T0, "error": error}
    if status in ("done", "failed", "cancelled"):
        update["host"] = "lab-01"  # the same on every machine (snapshots show it)
    if status != "queued":
        update["started_at"] = times[0]
        update["pid"] = pid
    if status in ("done", "failed", "cancelled"):
        update["finished_at"] = times[1]
    with store.db.conn:
        store.db["runs"].update(run_id, update)
    if metrics:
        store.put_metrics(run_id, metrics)
    if layers:
        store.put_layers(run_id, layers)
    for stage, done, total in events:
        store.add_event(run_id, stage, done, total)
    for kind, path in artifacts:
        store.add_artifact(run_id, kind, path)
    if log is not None:
        folder = store.run_folder(run_id)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "worker.log").write_text(log)
    return run_id


def config_for(experiment: str, variant: str, bits: dict | None, samples: int = 64, seed: int = 0,
               description: str = "") -> dict:
    """A run config shaped as `engine.config.Experiment.run_config` writes it."""
    return {
        "experiment": experiment, "variant": variant, "description": description,
        "model": {"id": "tiny-model", "path": "models/tiny-model"},
        "feature_model": {"id": "tiny-model", "path": "models/tiny-model"},
        "method": "none" if bits is None else "rtn",
        "params": {} if bits is None else {"bits": bits, "symmetric": True},
        "sampling": {"samples": samples, "steps": 5, "guidance": 1.0, "seed": seed, "batch_size": 250},
        "eval": {"bootstrap": 200},
    }


def metrics_for(fid: float, acc: float, bits: float, size: int, latency: float, clip: float | None = None) -> dict:
    out = {
        "fid": fid, "fid_ci_low": fid * 0.95, "fid_ci_high": fid * 1.05, "prompt_acc": acc,
        "size_bytes": size, "size_ratio": size / 4_640_000, "latency_ms": latency,
        "peak_mem_mb": 120.0, "mean_bits": bits, "fid_floor": 1.5,
    }
    if clip is not None:
        out["clip_score"] = clip
    return out


def write_png(path: Path, size: int = 32, seed: int = 0) -> Path:
    from PIL import Image

    image = Image.new("RGB", (size, size))
    for y in range(size):
        for x in range(size):
            image.putpixel((x, y), ((x * 8 + seed * 40) % 256, (y * 8) % 256, ((x + y) * 4) % 256))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


DEMO_LOG = "\n".join([
    json.dumps({"event": "log", "message": "loading model tiny-model"}),
    *[json.dumps({"event": "progress", "stage": "sampling", "done": d, "total": 64}) for d in range(0, 65, 8)],
    json.dumps({"event": "progress", "stage": "metrics", "done": 1, "total": 2}),
    json.dumps({"event": "log", "message": "fid 3.21 [3.05, 3.37]"}),
    json.dumps({"event": "done", "status": "done"}),
]) + "\n"


# How far each RTN variant's features sit from the full-precision ones (noise, shift) and how
# many of its 64 samples the classifier gets wrong: paired differences grow with fewer bits.
EVAL_DRIFT = {"fp32": (0.0, 0.0, 2), "w8": (0.02, 0.0, 2), "w4": (0.4, 0.5, 6), "w2": (1.5, 2.0, 40)}


def write_eval(runs_dir: Path, folder: Path, variant: str, n: int = 64, d: int = 6) -> Path:
    """A small synthetic eval.npz in engine/evaluate.py's format (same prompts, labels and base
    features for every variant: sample i had the same prompt and noise), plus the variant's
    samples.safetensors, and the shared reference statistics they are scored against."""
    import numpy as np

    from engine.grids import SAMPLES_FILE, save_samples
    from engine.metrics.fid import FeatureStats
    from engine.metrics.reference import save_stats

    ref_path = runs_dir / "demo-reference.npz"
    if not ref_path.exists():
        reference = np.random.default_rng(99).normal(size=(512, d))
        save_stats(ref_path, FeatureStats(mu=reference.mean(0), sigma=np.cov(reference, rowvar=False), n=512))
    base = np.random.default_rng(1).normal(size=(n, d))
    noise, shift, wrong = EVAL_DRIFT[variant]
    features = base + noise * np.random.default_rng(2).normal(size=(n, d)) + shift
    labels = np.arange(n, dtype=np.int64) % 10
    preds = labels.copy()
    preds[:wrong] = (preds[:wrong] + 1) % 10
    clip = 30.0 - 2.0 * shift + 0.5 * base[:, 0] + noise * np.random.default_rng(3).normal(size=n)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "eval.npz", features=features.astype(np.float32), labels=labels, preds=preds,
             clip=clip.astype(np.float32),
             prompts=np.array([f"a handwritten digit {k}" for k in labels]),
             feature_model=np.array("tiny-model@000000000000"), clip_model=np.array(""),
             reference=np.array("demo"), reference_stats=np.array("../demo-reference.npz"),
             seed=np.int64(0), version=np.int64(1))
    images = np.zeros((n, 8, 8), dtype=np.uint8)
    for i in range(n):
        images[i, (i % 8), :] = 255 - int(noise * 100)
        images[i, :, (labels[i] % 8)] = 128 + int(shift * 50)
    save_samples(folder / SAMPLES_FILE, images, labels.tolist())
    return folder / "eval.npz"


def fill_demo(runs_dir: Path, with_images: bool = True, with_eval: bool = True) -> dict[str, int]:
    """A small fixed database: four done RTN runs, a failed one, two mixed runs. With
    `with_eval`, the RTN runs have eval.npz and samples files (compare view, paired differences)."""
    store = Store.open(runs_dir)
    ids: dict[str, int] = {}
    rtn = [("fp32", None, 32.0, 3.21, 0.91, 4_640_000, 5.1),
           ("w8", 8, 8.0, 3.30, 0.90, 1_170_000, 4.9),
           ("w4", 4, 4.0, 4.85, 0.86, 600_000, 4.8),
           ("w2", 2, 2.0, 41.7, 0.34, 320_000, 4.7)]
    for variant, b, mean_bits, fid, acc, size, latency in rtn:
        bits = None if b is None else {"conv": b, "attention": b, "linear": b}
        artifacts = []
        if with_images:
            grid = write_png(runs_dir / f"grid-{variant}.png", seed=len(ids))
            artifacts.append(("grid", str(grid)))
        ids[variant] = add_run(
            store, "digits-rtn", variant, metrics=metrics_for(fid, acc, mean_bits, size, latency),
            layers=fake_layers(bits, seed=len(ids)), artifacts=artifacts,
            log=DEMO_LOG if variant == "fp32" else None,
            config=config_for("digits-rtn", variant, bits, description=f"every layer {variant}"),
        )
        if with_eval:
            write_eval(runs_dir, store.run_folder(ids[variant]), variant)
    if with_images:
        comparison = write_png(runs_dir / "comparison.png", size=48, seed=7)
        store.add_artifact(ids["w2"], "comparison", str(comparison))
    w2 = {"conv": 2, "attention": 2, "linear": 2}
    mixed_a, mixed_b = {"attention": 8, "conv": 4, "linear": 8}, {"attention": 4, "conv": 8, "linear": 4}
    ids["failed"] = add_run(store, "digits-rtn", "w2", status="failed",
                            error="worker exited with code 1: RuntimeError: out of memory",
                            log="Traceback (most recent call last):\nRuntimeError: out of memory\n",
                            config=config_for("digits-rtn", "w2", w2, description="every layer w2"))
    ids["mixed-a"] = add_run(store, "digits-mixed", "attn8-conv4",
                             metrics=metrics_for(4.10, 0.88, 5.2, 700_000, 4.9, clip=0.31),
                             layers=fake_layers(mixed_a), config=config_for("digits-mixed", "attn8-conv4", mixed_a))
    ids["mixed-b"] = add_run(store, "digits-mixed", "conv8-attn4", status="cancelled",
                             error="cancelled by the user", config=config_for("digits-mixed", "conv8-attn4", mixed_b))
    store.close()
    return ids


def fill_many(runs_dir: Path, runs: int, layers: int, experiments: int = 10, seed: int = 0) -> None:
    """A large database, written with plain executemany for speed (benchmark, scale tests)."""
    import random

    rng = random.Random(seed)
    Store.open(runs_dir).close()  # the engine's schema
    conn = sqlite3.connect(runs_dir / "qtui.db")
    statuses = ["done"] * 8 + ["failed", "cancelled"]
    run_rows, metric_rows, layer_rows = [], [], []
    for run_id in range(1, runs + 1):
        experiment = f"exp-{run_id % experiments:02d}"
        variant = f"w{2 + run_id % 7}"
        status = rng.choice(statuses)
        run_rows.append((run_id, experiment, variant, status, "{}", "h", T0, T0, T1, "host",
                         "local", f"run-{run_id:05d}"))
        if status == "done":
            fid = rng.uniform(2, 60)
            for name, value in (("fid", fid), ("fid_ci_low", fid * 0.95), ("fid_ci_high", fid * 1.05),
                                ("prompt_acc", rng.random()), ("size_bytes", rng.randint(2e5, 5e6)),
                                ("size_ratio", rng.random()), ("latency_ms", rng.uniform(3, 9)),
                                ("peak_mem_mb", rng.uniform(90, 300)), ("mean_bits", 2 + run_id % 7),
                                ("fid_floor", 1.5)):
                metric_rows.append((run_id, name, value))
            if rng.random() < 0.5:
                metric_rows.append((run_id, "clip_score", rng.random()))
        for idx in range(layers):
            b = 2 + run_id % 7
            layer_rows.append((run_id, idx, f"blocks.{idx // 8}.layer{idx % 8}", "conv", 1000, b,
                               2.0 ** -b, None, None, None, None))
    with conn:
        conn.executemany(
            "insert into runs (id, experiment, variant, status, config, config_hash, created_at, "
            "started_at, finished_at, host, executor, folder) values (?,?,?,?,?,?,?,?,?,?,?,?)",
            run_rows,
        )
        conn.executemany("insert into metrics values (?,?,?)", metric_rows)
        conn.executemany("insert into layers (run_id, idx, name, role, params, bits, weight_err, fisher, "
                         "sensitivity, out_err, extra) values (?,?,?,?,?,?,?,?,?,?,?)", layer_rows)
    conn.close()
