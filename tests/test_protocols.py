"""Protocols, paired differences in the store, tables, seeds, expectations, compare and report,
on a store filled with synthetic runs (per-sample data written as a run writes it; no torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.config import Experiment, Variant
from engine.export import export, result_rows, to_markdown
from engine.expectations import parse_expectation
from engine.grids import SAMPLES_FILE, save_samples
from engine.metrics.fid import feature_stats
from engine.paired_runs import compare_runs, expectation_outcomes, update_paired
from engine.protocol import differences, family_hash, protocol_hash, protocol_key
from engine.store import SCHEMA_VERSION, Store
from engine.table_groups import group_rows
from tests.conftest import engine

D = 6
REF = feature_stats(np.random.default_rng(100).standard_normal((600, D)))


def config(variant, samples=60, seed=0, **extra):
    return {"experiment": "e", "variant": variant, "description": f"variant {variant}",
            "model": {"id": "m", "path": "/somewhere/m"}, "feature_model": {"id": "f", "path": "/x/f"},
            "method": "none", "params": {}, "eval": {"bootstrap": 100}, "reference_variant": "fp",
            "sampling": {"samples": samples, "steps": 3, "guidance": 1.0, "seed": seed, "batch_size": 10}, **extra}


def write_eval(folder, feats, labels, preds):
    """eval.npz as engine/evaluate.py writes it, against the shared reference statistics."""
    from engine.evaluate import save_eval
    from engine.metrics.reference import save_stats

    ref_path = folder.parent / "reference.npz"
    if not ref_path.exists():
        save_stats(ref_path, REF)
    save_eval(folder, {"features": feats.astype(np.float32), "labels": labels.astype(np.int64),
                       "preds": preds.astype(np.int64), "clip": (20 + feats[:, 1]).astype(np.float32), "prompts": np.asarray([f"digit {l}" for l in labels]),
                       "feature_model": np.asarray("f"), "clip_model": np.asarray(""),
                       "reference": np.asarray("npz:test"), "reference_stats": np.asarray("../reference.npz"),
                       "seed": np.int64(0), "version": np.int64(1)})


def add_run(store, variant, shift=0.0, samples=60, seed=0, size=1000):
    """A finished run whose features are the shared base features (per seed) moved by `shift`."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((samples, D))
    feats = base + shift + 0.02 * np.random.default_rng(hash(variant) % 1000).standard_normal(base.shape)
    labels = np.arange(samples) % 10
    preds = np.where(rng.random(samples) < 0.8 - shift, labels, (labels + 1) % 10)
    rid = store.create_run("e", variant, config(variant, samples, seed), "h")
    folder = store.run_folder(rid)
    folder.mkdir(parents=True)
    write_eval(folder, feats, labels, preds)
    images = (np.clip(feats[:, :1, None] * 40 + 128, 0, 255) * np.ones((1, 4, 4))).astype(np.uint8)
    save_samples(folder / SAMPLES_FILE, images, labels.tolist())
    from engine.metrics.fid import frechet_distance

    store.put_metrics(rid, {"fid": frechet_distance(feature_stats(feats), REF), "size_bytes": size,
                            "size_ratio": size / 1000, "prompt_acc": float((preds == labels).mean())})
    store.mark_running(rid)
    update_paired(store, rid)  # as the pipeline does, before the worker marks the run done
    store.finish(rid, "done")
    return rid


@pytest.fixture
def store(tmp_path):
    return Store.open(tmp_path / "runs")


def test_protocol_hash_covers_what_makes_runs_comparable():
    base = protocol_hash(config("A"))
    assert protocol_key is protocol_hash and len(base) == 12
    # not part of the protocol: the variant, its method, description, batching, resamples, paths
    same = config("B", method="rtn", params={"bits": 4}, reference_variant="D")
    same["sampling"]["batch_size"], same["eval"]["bootstrap"] = 3, 7
    same["model"]["path"] = "/elsewhere/m"
    assert protocol_hash(same) == base
    for key, value in (("samples", 61), ("steps", 4), ("guidance", 2.0), ("seed", 1)):
        other = config("A")
        other["sampling"][key] = value
        assert protocol_hash(other) != base, key
    assert protocol_hash(config("A", model={"id": "m2", "path": "/m"})) != base
    # keys a config does not have yet count only when present
    assert protocol_hash(config("A", dtype=None)) == base != protocol_hash(config("A", dtype="float16"))
    assert protocol_hash(json.dumps(config("A"))) == base
    seeded = config("A", seed=3)
    seeded["sampling"]["seed"] = 3
    assert family_hash(seeded) == family_hash(config("A")) and protocol_hash(seeded) != base
    assert differences(config("A"), config("A", samples=30)) == {"samples": (60, 30)}


def test_protocol_module_imports_no_torch():
    code = "import sys, engine.protocol, engine.store, engine.export; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_protocol_column_migration_is_idempotent(tmp_path):
    store = Store.open(tmp_path)
    rid = store.create_run("e", "A", config("A"), "h")
    store.db.conn.execute("alter table runs drop column protocol")  # a database from before
    store.close()
    for _ in range(2):
        again = Store.open(tmp_path)
        assert again.get_run(rid)["protocol"] == protocol_hash(config("A"))
        assert again.schema_version() == SCHEMA_VERSION  # the column needs no version of its own
        again.close()


def test_paired_differences_are_stored_when_the_reference_finishes_later(store):
    a = add_run(store, "A", shift=0.4)
    assert "d_fid" not in store.metrics(a)  # waiting for fp
    fp = add_run(store, "fp")
    ref, got = store.metrics(fp), store.metrics(a)
    assert ref["d_fid"] == ref["d_fid_ci_low"] == ref["d_fid_ci_high"] == 0.0 and ref["d_prompt_acc"] == 0.0
    assert got["d_fid"] == pytest.approx(got["fid"] - ref["fid"], rel=1e-7)
    assert 0 < got["d_fid_ci_low"] < got["d_fid"] < got["d_fid_ci_high"]  # A is worse, significantly
    direct = compare_runs(store, a, fp)["fid"]
    assert (direct.low, direct.high) == (got["d_fid_ci_low"], got["d_fid_ci_high"])
    assert got["d_clip_score_ci_low"] < got["d_clip_score"] < got["d_clip_score_ci_high"]
    assert ref["d_clip_score"] == 0.0 and got["d_clip_score"] == pytest.approx(0.4, abs=0.05)
    b = add_run(store, "B", shift=0.4)  # finishes after the reference
    assert store.metrics(b)["d_fid"] > 0


def test_another_protocol_is_shown_marked_and_never_ranked_with_the_rest(store):
    add_run(store, "fp")
    add_run(store, "A", shift=0.3)
    b = add_run(store, "B", shift=0.1)
    small = add_run(store, "B", shift=0.0, samples=30, size=10)
    store.put_metrics(small, {"fid": 0.01})  # better than every P1 run, if it were ranked with them
    shown, notes = group_rows(result_rows(store))
    by_id = {str(r["id"]): r for r in shown}
    assert by_id[str(small)]["protocol"] == "P2" and by_id[str(b)]["protocol"] == "P1"
    assert "fid" not in by_id[str(small)].get("_best", ())  # alone in its group: no rank at all
    p1 = [r for r in shown if r["protocol"] == "P1"]
    best_fid = [r["fid"] for r in p1 if "fid" in r.get("_best", ())]
    assert best_fid == [min(r["fid"] for r in p1)] and "samples 60 -> 30" in notes[0]
    md = to_markdown(result_rows(store))
    assert "| P2 |" in md and "samples 60 -> 30" in md and "| n |" in md
    assert "**0.010**" not in md  # the small run's size is not marked best against P1
    with pytest.raises(Exception, match="different protocols .*samples: 60 vs 30"):
        compare_runs(store, b, small)


def test_seeds_give_mean_and_sd_and_paired_differences_per_seed(store):
    for seed in (0, 1, 2):
        add_run(store, "fp", seed=seed)
        add_run(store, "A", shift=0.8, seed=seed)
    shown, notes = group_rows(result_rows(store))
    assert [r["variant"] for r in shown] == ["fp", "A"] and not notes  # one family, two rows
    a = shown[1]
    assert a["seeds"] == "0,1,2" and a["fid_sd"] > 0 and a["verdict"] == "worse 3/3"
    assert a["d_fid_text"].count("*") == 3 and len(a["d_fid_text"].split(", ")) == 3
    fids = [store.metrics(r["id"])["fid"] for r in store.runs() if r["variant"] == "A"]
    assert a["fid"] == pytest.approx(np.mean(fids)) and a["fid_sd"] == pytest.approx(np.std(fids, ddof=1))
    assert " ± " in to_markdown(result_rows(store))
    assert len(export(store, "csv").splitlines()) == 7  # csv keeps one line per run


def experiment(expect, seeds=(0,)):
    variants = {v: Variant(v, "", "none", {}) for v in ("fp", "A", "B")}
    exp = Experiment("e", "synthetic", "m", Path("/somewhere/m"), "f", Path("/x/f"), 60, 3, 1.0, 0, 10, 100,
                     variants, seeds=tuple(seeds))
    return Experiment(**{**exp.__dict__, "expectations": tuple(parse_expectation(e, variants) for e in expect)})


def test_expectations_are_supported_contradicted_or_inconclusive(store):
    for seed in (0, 1):
        add_run(store, "fp", seed=seed)
        add_run(store, "A", shift=0.4, seed=seed)
        add_run(store, "B", shift=0.0, seed=seed)
    exp = experiment(["B < A on fid", "B > A on fid", "B < fp on fid", "fp > A on prompt_acc"], seeds=(0, 1))
    outcomes = {r.text: r for r in expectation_outcomes(store, exp)}
    assert outcomes["B < A on fid"].outcome == "supported"
    assert outcomes["B > A on fid"].outcome == "contradicted"
    assert outcomes["B < fp on fid"].outcome == "inconclusive"  # B is fp plus tiny noise
    assert [s for s, _, _ in outcomes["B < A on fid"].per_seed] == [0, 1]
    assert outcomes["fp > A on prompt_acc"].outcome in ("supported", "inconclusive")


def test_compare_cli_prints_differences_and_refuses_other_protocols(store):
    fp, a = add_run(store, "fp"), add_run(store, "A", shift=0.4)
    other = add_run(store, "A", samples=30)
    runs = str(store.runs_dir)
    out = engine("compare", str(a), str(fp), "--runs-dir", runs)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.strip().startswith("fid"))
    assert f"run {a} (A) worse" in line and "60 shared samples" in out.stdout
    refused = engine("compare", str(a), str(other), "--runs-dir", runs)
    assert refused.returncode == 2 and "different protocols (samples: 60 vs 30)" in refused.stderr
    assert engine("compare", str(a), "999", "--runs-dir", runs).returncode == 2


def test_report_writes_markdown_latex_and_pngs(store, tmp_path):
    from engine.report import write_report

    add_run(store, "fp")
    add_run(store, "A", shift=0.4, size=200)
    add_run(store, "B", shift=0.1, size=300)
    files = write_report(store, experiment(["B < A on fid"]), tmp_path / "report")
    names = sorted(p.name for p in files)
    assert names == ["pareto.png", "report.md", "samples.png", "table.tex"]
    for png in ("pareto.png", "samples.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report" / "report.md").read_text()
    assert "`B < A on fid`: **supported**" in md and "dFID to ref" in md and "![Samples](samples.png)" in md
    assert (tmp_path / "report" / "table.tex").read_text().startswith(r"\begin{tabular}")
