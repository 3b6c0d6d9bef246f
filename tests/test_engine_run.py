"""`engine run` end to end on the tiny configuration, plus crashes and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from engine.store import Store
from tests.conftest import engine

METRICS = {"fid", "fid_ci_low", "fid_ci_high", "prompt_acc", "size_bytes", "size_ratio",
           "latency_ms", "peak_mem_mb", "fid_floor", "mean_bits", "kid", "kid_ci_low", "kid_ci_high",
           "d_fid", "d_fid_ci_low", "d_fid_ci_high", "d_prompt_acc", "d_clip_score", "clip_score",
           "clip_score_ci_low", "clip_score_ci_high", "run_peak_mem_mb", "dtype_bits", "quantize_s"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_models):
    """One real `engine run tiny` of all four variants, shared by the assertions below."""
    from tests.conftest import TINY_TOML

    root = tmp_path_factory.mktemp("e2e")
    toml = root / "experiments.toml"
    toml.write_text(TINY_TOML.format(model=tiny_models["model"], classifier=tiny_models["classifier"]))
    result = engine("run", "tiny", "--samples", "20", "--experiments", str(toml), "--runs-dir", str(root / "runs"))
    return result, Store.open(root / "runs"), toml, tiny_models


def test_all_variants_done_with_metrics(finished):
    result, store, _, _ = finished
    assert result.returncode == 0, result.stdout + result.stderr
    runs = store.runs(experiment="tiny")
    assert [r["variant"] for r in runs] == ["fp", "A", "B", "C"]
    assert all(r["status"] == "done" for r in runs)
    for run in runs:
        metrics = store.metrics(run["id"])
        assert METRICS <= set(metrics), run["variant"]
        assert metrics["fid_ci_low"] <= metrics["fid"] <= metrics["fid_ci_high"]
        assert 0 <= metrics["prompt_acc"] <= 1
        assert metrics["run_peak_mem_mb"] >= metrics["peak_mem_mb"] > 0  # the whole run's peak holds sampling's
        assert metrics["dtype_bits"] == 32 and metrics["quantize_s"] >= metrics.get("checkpoint_s", 0)
        assert 0 <= metrics["clip_score_ci_low"] <= metrics["clip_score"] <= metrics["clip_score_ci_high"] <= 100
        assert any(a["kind"] == "eval" and a["path"].endswith("eval.npz") for a in store.artifacts(run["id"]))
        config = json.loads(run["config"])
        assert config["sampling"]["samples"] == 20 and run["config_hash"] and run["versions"]
    # the results table is printed
    assert "prompt acc" in result.stdout and "FID floor" in result.stdout and "CLIP" in result.stdout


def test_paired_differences_kid_and_floor_of_a_real_run(finished):
    """Every run keeps its per-sample data; d_* against fp equal `engine compare`'s numbers."""
    result, store, _, _ = finished
    from engine.metrics.fid import feature_stats, frechet_distance
    from engine.paired_runs import load_eval_data

    runs = {r["variant"]: r for r in store.runs(experiment="tiny")}
    fp = store.metrics(runs["fp"]["id"])
    assert fp["d_fid"] == fp["d_fid_ci_low"] == fp["d_fid_ci_high"] == 0.0
    assert len({r["protocol"] for r in runs.values()}) == 1
    for variant in ("A", "B", "C"):
        m = store.metrics(runs[variant]["id"])
        # the eigenvalue core against sqrtm (inexact here: 20 samples, singular covariances)
        assert m["d_fid"] == pytest.approx(m["fid"] - fp["fid"], abs=1e-6 * fp["fid"])
        assert m["d_fid_ci_low"] <= m["d_fid"] <= m["d_fid_ci_high"]
        assert m["kid_ci_low"] < m["kid"] < m["kid_ci_high"]
        data = load_eval_data(store.runs_dir / runs[variant]["folder"])
        assert data.features.shape[0] == 20
        assert frechet_distance(feature_stats(data.features), data.ref) == pytest.approx(m["fid"], rel=1e-9)
        assert m["fid_floor"] > 0
    out = engine("compare", str(runs["B"]["id"]), str(runs["fp"]["id"]), "--runs-dir", str(store.runs_dir))
    assert out.returncode == 0 and f"{store.metrics(runs['B']['id'])['d_fid']:+10.4f}" in out.stdout
    assert "dFID to ref" in result.stdout


def test_layer_roles_and_bits_follow_each_variant(finished):
    _, store, _, _ = finished
    expected = {
        "fp": {"conv": None, "attention": None, "linear": None},
        "A": {"conv": 4, "attention": 4, "linear": 4},
        "B": {"conv": 4, "attention": 8, "linear": 4},
        "C": {"conv": 8, "attention": 4, "linear": None},
    }
    for run in store.runs(experiment="tiny"):
        layers = store.layers(run["id"])
        assert {layer["role"] for layer in layers} == {"conv", "attention", "linear"}
        for layer in layers:
            assert layer["bits"] == expected[run["variant"]][layer["role"]], (run["variant"], layer["name"])
            if layer["bits"] is None:
                assert layer["weight_err"] is None
            else:
                assert 0 < layer["weight_err"] < (0.3 if layer["bits"] == 4 else 0.02)
        attention = [l["name"] for l in layers if l["role"] == "attention"]
        assert attention and all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for n in attention)


def test_sizes_are_real_bytes_on_disk(finished):
    _, store, _, _ = finished
    by_variant = {r["variant"]: r for r in store.runs(experiment="tiny")}
    fp = store.metrics(by_variant["fp"]["id"])
    a = store.metrics(by_variant["A"]["id"])
    checkpoint = [x for x in store.artifacts(by_variant["A"]["id"]) if x["kind"] == "checkpoint"][0]
    assert os.path.getsize(checkpoint["path"]) == a["size_bytes"]
    assert a["size_ratio"] == pytest.approx(a["size_bytes"] / fp["size_bytes"])
    assert fp["size_ratio"] == 1.0 and a["size_ratio"] < 0.2
    assert a["mean_bits"] == 4.0 and fp["mean_bits"] == 32.0
    # Real stored bits of the quantized layers: 4-bit codes plus their float16 scales.
    from engine.quant import bits_per_weight

    assert a["bits_per_weight"] == pytest.approx(bits_per_weight(checkpoint["path"]))
    assert 4.0 < a["bits_per_weight"] < 5.0 and fp["bits_per_weight"] is None


def test_images_come_from_the_stored_quantized_weights(finished):
    """Regenerate the first samples from the packed checkpoint and compare with what was stored;
    the full-precision weights give visibly different images."""
    import torch

    from engine.data.digits import eval_labels, prompt_for
    from engine.grids import load_samples, to_uint8
    from engine.models.loader import load_text_to_image
    from engine.quant import load_packed
    from engine.sampling import initial_noise, sample_images

    _, store, _, models = finished
    run = [r for r in store.runs(experiment="tiny") if r["variant"] == "A"][0]
    config = json.loads(run["config"])
    folder = store.runs_dir / run["folder"]
    stored, labels = load_samples(folder / "samples.safetensors")
    assert labels.tolist() == eval_labels(20)

    model = load_text_to_image(models["model"], torch.device("cpu"))
    n = 10
    prompts = [prompt_for(l) for l in eval_labels(n)]
    noise = initial_noise(20, model.sample_shape, config["sampling"]["seed"])[:n]
    args = (prompts, noise, config["sampling"]["steps"], config["sampling"]["guidance"], 10)
    full_precision = to_uint8(sample_images(model, *args)).astype(int)
    model.denoiser.load_state_dict(load_packed(folder / "weights.safetensors"))
    quantized = to_uint8(sample_images(model, *args)).astype(int)
    assert np.abs(quantized - stored[:n].astype(int)).max() <= 1
    assert np.abs(full_precision - stored[:n].astype(int)).max() > 1


def test_artifacts_and_exports(finished, tmp_path):
    _, store, toml, _ = finished
    for run in store.runs(experiment="tiny"):
        kinds = {a["kind"]: a["path"] for a in store.artifacts(run["id"])}
        assert {"grid", "samples"} <= set(kinds)
        assert open(kinds["grid"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    last = store.runs(experiment="tiny")[-1]
    comparisons = [a for a in store.artifacts(last["id"]) if a["kind"] == "comparison"]
    ids = sorted(r["id"] for r in store.runs(experiment="tiny"))
    assert comparisons[0]["stored"] == f"comparisons/tiny-runs-{'-'.join(map(str, ids))}.png"  # relative
    with Image.open(comparisons[0]["path"]) as image:  # four columns of 16-pixel samples, scaled x2
        assert image.width == 2 * (4 * 17 + 1) and image.height > 2 * (10 * 17 + 1)  # and the labels
    runs_dir = str(store.runs_dir)
    csv_out = engine("export", "--format", "csv", "--runs-dir", runs_dir).stdout.splitlines()
    assert csv_out[0].startswith("id,experiment,variant,status,bits,fid") and len(csv_out) == 5
    md = engine("export", "--format", "md", "--runs-dir", runs_dir).stdout
    assert "| fp |" in md and "| W4 |" in md
    latex = tmp_path / "t.tex"
    assert engine("export", "--format", "latex", "--out", str(latex), "--runs-dir", runs_dir).returncode == 0
    assert latex.read_text().startswith(r"\begin{tabular}")
    data = json.loads(engine("export", "--format", "json", "--runs-dir", runs_dir).stdout)
    assert len(data) == 4 and data[1]["layers"] and data[1]["config"]["params"]["bits"]["conv"] == 4
    shown = engine("show", "tiny", "--experiments", str(toml), "--runs-dir", runs_dir)
    assert shown.returncode == 0 and "FID floor" in shown.stdout


def wait_for(predicate, timeout=300.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out")


def running_run(runs_dir):
    if not (runs_dir / "qtui.db").exists():
        return None
    runs = [r for r in Store.open(runs_dir).runs() if r["status"] == "running"]
    return runs[0] if runs else None


def start_engine(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_a_crashing_variant_is_failed_and_the_others_go_on(tiny_experiments, tmp_path):
    runs_dir = tmp_path / "runs"
    proc = start_engine("run", "tiny", "--variant", "A", "--variant", "fp", "--samples", "10",
                        "--experiments", str(tiny_experiments), "--runs-dir", str(runs_dir))
    victim = wait_for(lambda: running_run(runs_dir))
    os.kill(victim["pid"], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    runs = {r["variant"]: r for r in Store.open(runs_dir).runs()}
    assert runs["A"]["status"] == "failed" and runs["A"]["error"].startswith("killed by SIGKILL (out of memory?)")
    assert runs["fp"]["status"] == "done"


def test_an_exception_in_a_run_is_recorded_as_failed(tmp_path, tiny_experiments):
    from engine.config import load_catalogue
    from engine.worker import main as worker_main

    store = Store.open(tmp_path / "runs")
    config = load_catalogue(tiny_experiments).get("tiny").run_config("fp")
    config["model"]["path"] = str(tmp_path / "vanished")
    run_id = store.create_run("tiny", "fp", config, "h")
    assert worker_main(["--runs-dir", str(tmp_path / "runs"), "--run-id", str(run_id)]) == 1
    run = store.get_run(run_id)
    assert run["status"] == "failed" and "vanished" in run["error"] and "ModelLoadError" in run["error"]


def test_ctrl_c_cancels_the_children(tiny_experiments, tmp_path):
    runs_dir = tmp_path / "runs"
    proc = start_engine("run", "tiny", "--variant", "fp", "--variant", "A", "--samples", "200",
                        "--experiments", str(tiny_experiments), "--runs-dir", str(runs_dir))
    child = wait_for(lambda: running_run(runs_dir))
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    runs = Store.open(runs_dir).runs()
    assert [r["status"] for r in runs] == ["cancelled", "cancelled"]
    from engine.executor import pid_alive

    wait_for(lambda: not pid_alive(child["pid"]), timeout=10)
