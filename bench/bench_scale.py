"""Every method at full model size: SD 1.5 and SD 3.5 Medium (published configs, random weights).

    python bench/bench_scale.py [--models sd15,sd35m] [--only sd35m:gptq-w4a8,...] [--dir runs/bench-scale]

Builds the two pipelines once (bench/scale_models.py; about 2 + 6.3 GB of fp16 safetensors under
`--dir`/models), a random-weights Inception file and reference statistics (FID machinery, not
numbers), writes an experiments.toml and runs every method that applies to each model through
`engine run`, one variant at a time (so each run's memory is its own): 256x256, 4 samples, 2 steps,
tiny calibration sets. While a run goes, its worker's resident size is polled (every 0.2 s) and
kept per stage; the worker's own high-water mark is `run_peak_mem_mb`.

Printed: one row per run (status, the run's peak RSS, the bound, the seconds and sampled peak
of each stage), then a last line `scale: ...` with the goals of issue 18:
- every applicable method finishes on both models;
- each run's peak RSS <= 1.5 x the pipeline's weights in the run's dtype + 2 GiB
  (SD 1.5 in float32: 7.96 GiB; SD 3.5 Medium in bfloat16 without T5: 10.79 GiB);
- GPTQ's peak grows with one block, not the depth: SD 3.5 Medium cut to 12 blocks and the full
  24, peak ratio <= 1.15;
- the calibration file of the SD 3.5 Medium GPTQ run < 2 GB.
Results stay in `--dir`/runs (an existing done run of the same variant is reused with --reuse).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_models import PROMPTS, build, parameters  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
CAL = "calibration = { samples = 2, held_out = 2, seed = 1, steps = 2 }"
SHARED = {  # every method that applies to each family, with tiny calibration / training sets
    "fp": 'method = "none"',
    "rtn-w4": 'method = "rtn"\nbits = 4',
    "rtn-w8": 'method = "rtn"\nbits = 8',
    "fisher": 'method = "fisher"\nstrategy = "ratio"\nratio = 0.25\ncalibration = { samples = 2, seed = 1 }',
    "qat-w4": 'method = "qat"\nbits = 4\nsteps = 2\nbatch_size = 1\nlr = 1e-5\nseed = 0\ntrain_samples = 2',
    "ptq-w8a8": f'method = "ptq"\n{CAL}',
}
UNET_ONLY = {
    "rtn-w8a8": f'method = "rtn"\nbits = 8\nact_bits = 8\n{CAL}',
    "dgq-w8a8": 'method = "dgq"\nbits = 8\nact_bits = 8\ngroups = 16\ncalibration = { samples = 2, seed = 1, steps = 2 }',
    "minmax-w8a8": 'method = "minmax"\nbits = 8\nact_bits = 8\ncalibration = { samples = 2, seed = 1, steps = 2 }',
}
MMDIT_ONLY = {
    "rtn-w4a8": f'method = "rtn"\nbits = 4\nscope = "blocks"\nact_bits = 8\n{CAL}',
    "gptq-w4a8": f'method = "gptq"\nbits = 4\nact_bits = 8\n{CAL}',
}
MODELS = {  # experiment name -> (model folder name, builder kind, blocks, dtype, variants)
    "sd15": ("sd15", "sd15", None, "float32", {**SHARED, **UNET_ONLY}),
    "sd35m": ("sd35m", "sd35m", None, "bfloat16", {**SHARED, **MMDIT_ONLY}),
    "sd35m-12": ("sd35m-12", "sd35m", 12, "bfloat16", {"gptq-w4a8": MMDIT_ONLY["gptq-w4a8"]}),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def catalogue(root: Path, models: Path) -> Path:
    """experiments.toml for the chosen models, with the FID machinery it needs."""
    import numpy as np

    from engine.models.inception import FEATURE_DIM

    stats = root / "reference.npz"
    if not stats.exists():
        rng = np.random.default_rng(0)
        np.savez(stats, mu=rng.normal(size=FEATURE_DIM) * 0.1, sigma=np.eye(FEATURE_DIM) * 0.01)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    text = []
    for name, (folder, _, _, dtype, variants) in MODELS.items():
        text.append(f"""[experiments.{name}]
model = "{models / folder}"
prompts = "prompts.txt"
samples = 4
steps = 2
guidance = 4.0
batch_size = 2
bootstrap = 0
height = 256
width = 256
dtype = "{dtype}"
{'drop_t5 = true' if name.startswith('sd35m') else ''}
feature_model = "inception"
reference = "{stats}"
""")
        for variant, keys in variants.items():
            text.append(f"[experiments.{name}.variants.{variant}]\n{keys}\n")
    path = root / "experiments.toml"
    path.write_text("\n".join(text))
    return path


class Monitor(threading.Thread):
    """Polls the newest run's worker: its resident size (VmRSS) per stage, from the database's
    pid and last progress event."""

    def __init__(self, db: Path, after_id: int):
        super().__init__(daemon=True)
        self.db, self.after_id, self.stop = db, after_id, threading.Event()
        self.peaks: dict[str, float] = {}

    def run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=1)
                row = con.execute("select id, pid from runs where id > ? order by id desc limit 1",
                                  (self.after_id,)).fetchone()
                stage = None
                if row:
                    event = con.execute("select stage from events where run_id = ? order by id desc limit 1",
                                        (row[0],)).fetchone()
                    stage = event[0] if event else "start"
                con.close()
            except sqlite3.Error:
                continue
            if not row or not row[1]:
                continue
            rss = _rss_gib(row[1])
            if rss is not None:
                self.peaks[stage] = max(self.peaks.get(stage, 0.0), rss)


def _rss_gib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def stage_seconds(db: Path, run_id: int) -> dict[str, float]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    events = con.execute("select stage, time from events where run_id = ? order by id", (run_id,)).fetchall()
    con.close()
    out, order = {}, []
    for stage, t in events:
        if stage not in out:
            order.append(stage)
            out[stage] = [t, t]
        out[stage][1] = t
    # a stage lasts from its first event to the next stage's first event
    return {s: (out[order[i + 1]][0] if i + 1 < len(order) else out[s][1]) - out[s][0] for i, s in enumerate(order)}


def run_variant(root: Path, toml: Path, experiment: str, variant: str, reuse: bool, timeout: int) -> dict:
    from engine.store import Store

    runs = root / "runs"
    db = runs / "qtui.db"
    if reuse and db.exists():
        store = Store.open(runs)
        done = [r for r in store.runs(experiment=experiment) if r["variant"] == variant and r["status"] == "done"]
        if done:
            return _row(store, db, done[-1], {}, 0.0)
    last = 0
    if db.exists():
        con = sqlite3.connect(db)
        last = con.execute("select coalesce(max(id), 0) from runs").fetchone()[0]
        con.close()
    monitor = Monitor(db, last)
    monitor.start()
    start = time.time()
    cmd = [sys.executable, "-m", "engine.cli", "run", experiment, "--variant", variant, "--experiments", str(toml),
           "--runs-dir", str(runs)]
    env = {**os.environ, "TORCH_HOME": str(root / "torch_home"), "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        tail = (proc.stdout + proc.stderr)[-400:]
    except subprocess.TimeoutExpired:  # engine run was killed; its run goes on under the scheduler: cancel it
        con = sqlite3.connect(db)
        late = [str(i) for (i,) in con.execute("select id from runs where id > ? and status in ('queued', 'running')",
                                                (last,))]
        con.close()
        if late:
            subprocess.run([sys.executable, "-m", "engine.cli", "queue", "cancel", *late, "--runs-dir", str(runs)],
                           cwd=root, env=env, capture_output=True)
        tail = f"timed out after {timeout} s"
    monitor.stop.set()
    monitor.join()
    store = Store.open(runs)
    mine = [r for r in store.runs(experiment=experiment) if r["variant"] == variant and r["id"] > last]
    if not mine:
        return {"experiment": experiment, "variant": variant, "status": "not started", "error": tail}
    return _row(store, db, mine[-1], monitor.peaks, time.time() - start)


def _row(store, db: Path, run: dict, stage_peaks: dict, wall: float) -> dict:
    metrics = store.metrics(run["id"])
    calibration = [a for a in store.artifacts(run["id"]) if a["kind"] == "calibration"]
    cal_bytes = None
    if calibration:
        path = store.resolve(calibration[0]["path"])
        cal_bytes = path.stat().st_size if path.exists() else None
    return {"experiment": run["experiment"], "variant": run["variant"], "id": run["id"], "status": run["status"],
            "error": (run["error"] or "")[:200], "run_peak_gib": (metrics.get("run_peak_mem_mb") or 0) / 1024 or None,
            "sampled_peak_gib": max(stage_peaks.values(), default=None), "stage_peaks": stage_peaks,
            "stages": stage_seconds(db, run["id"]), "wall_s": wall, "calibration_bytes": cal_bytes}


def bound_gib(models: Path, experiment: str) -> float:
    folder, _, _, dtype, _ = MODELS[experiment]
    weights = sum(parameters(models / folder).values()) * DTYPE_BYTES[dtype]
    return 1.5 * weights / GIB + 2


def show(row: dict, bound: float) -> str:
    peak = row.get("run_peak_gib") or row.get("sampled_peak_gib")
    stages = " ".join(f"{s} {t:.0f}s/{row['stage_peaks'].get(s, 0):.1f}G" if row.get("stage_peaks")
                      else f"{s} {t:.0f}s" for s, t in row.get("stages", {}).items())
    peak_text = f"{peak:5.2f}" if peak else "    -"
    error = f"  [{row['error']}]" if row.get("status") != "done" and row.get("error") else ""
    return (f"{row['experiment']:9} {row['variant']:12} {row['status']:9} {peak_text} / {bound:5.2f} GiB  "
            f"{stages}{error}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=str(REPO / "runs" / "bench-scale"))
    parser.add_argument("--models", default="sd15,sd35m,sd35m-12", help="experiments to run (comma-separated)")
    parser.add_argument("--only", default="", help="experiment:variant,... (default: every variant)")
    parser.add_argument("--reuse", action="store_true", help="report an existing done run instead of running it")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    args = parser.parse_args()
    root = Path(args.dir).resolve()
    models = root / "models"
    root.mkdir(parents=True, exist_ok=True)
    chosen = [m for m in args.models.split(",") if m]
    for name in chosen:
        folder, kind, blocks, _, _ = MODELS[name]
        build(kind, models / folder, blocks)
    from engine.models.inception import WEIGHTS_NAME, write_random_weights

    weights = root / "torch_home" / "hub" / "checkpoints" / WEIGHTS_NAME
    if not weights.exists():
        write_random_weights(weights)
    toml = catalogue(root, models)
    only = [tuple(item.split(":", 1)) for item in args.only.split(",") if item]  # in the order given
    plan = only or [(name, variant) for name in chosen for variant in MODELS[name][4]]
    rows = []
    print(f"{'model':9} {'variant':12} {'status':9} peak / bound       seconds/sampled peak RSS per stage", flush=True)
    for name, variant in plan:
        bound = bound_gib(models, name)
        row = run_variant(root, toml, name, variant, args.reuse, args.timeout)
        row["bound"] = bound
        rows.append(row)
        print(show(row, bound), flush=True)
    (root / "results.json").write_text(json.dumps(rows, indent=1))
    print(summary(rows))
    return 0


def summary(rows: list[dict]) -> str:
    done = [r for r in rows if r["status"] == "done"]
    within = [r for r in done if (r.get("run_peak_gib") or 0) <= r["bound"]]
    worst: dict[str, tuple[float, float]] = {}
    for r in done:
        peak = max(worst.get(r["experiment"], (0.0, 0.0))[0], r.get("run_peak_gib") or 0)
        worst[r["experiment"]] = (peak, r["bound"])
    parts = [f"{len(done)}/{len(rows)} runs done", f"{len(within)}/{len(done)} within the memory bound"]
    parts += [f"{name} peak {peak:.2f} GiB (bound {bound:.2f})" for name, (peak, bound) in worst.items()]
    gptq = {r["experiment"]: r for r in done if r["variant"] == "gptq-w4a8"}
    if "sd35m" in gptq and "sd35m-12" in gptq:
        ratio = gptq["sd35m"]["run_peak_gib"] / gptq["sd35m-12"]["run_peak_gib"]
        parts.append(f"GPTQ peak 24/12 blocks {ratio:.2f} (goal <= 1.15)")
    if "sd35m" in gptq and gptq["sd35m"].get("calibration_bytes") is not None:
        parts.append(f"SD 3.5M GPTQ calibration file {gptq['sd35m']['calibration_bytes'] / 1e6:.0f} MB (goal < 2000)")
    return "scale: " + ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
