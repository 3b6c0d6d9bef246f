"""Paired differences between runs of one protocol, from the per-sample data in their folders.

- `update_paired(store, run_id)`: at the end of a run, store its differences to the reference
  variant of the same protocol (`d_fid`, `d_fid_ci_low`, `d_fid_ci_high`, and the same for
  `prompt_acc` and `clip_score` where both runs have them), the reference itself getting 0; when
  the finishing run is the reference, every run of its protocol that waited for it gets them.
- `compare_runs(store, a, b)`: the paired differences of any two runs of one protocol.
- `expectation_outcomes(store, experiment)`: each of an experiment's `expect` statements, per
  seed and combined.

The bootstrap indices are seeded with the protocol's sampling seed, so a comparison is
reproducible, and the same indices serve every metric of one comparison. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import UserError
from engine.metrics.fid import FeatureStats
from engine.metrics.paired import PairedDiff, bootstrap_resamples, paired_fid, paired_mean
from engine.protocol import differences, family_hash
from engine.store import Store

EVAL_FILE = "eval.npz"  # written by engine/evaluate.py (its docstring documents the arrays)
EVAL_ARRAYS = ("features", "prompts", "feature_model", "clip_model", "reference", "reference_stats", "seed")
DEFAULT_RESAMPLES = 200  # when a run's config asks for no bootstrap (bootstrap = 0)
PAIRED = ("fid", "prompt_acc", "clip_score")


@dataclass
class EvalData:
    """The per-sample data of one run that paired comparisons need (torch-free reader of
    engine/evaluate.py's `eval.npz`)."""

    features: np.ndarray  # [n, d]
    labels: np.ndarray | None  # [n] class asked for by each prompt
    preds: np.ndarray | None  # [n] class the feature model predicts
    clip: np.ndarray | None  # [n] CLIP score per sample
    prompts: list[str]
    ref: FeatureStats  # the reference statistics its FID was computed against
    reference: str  # their id

    def per_sample(self, metric: str) -> np.ndarray | None:
        if metric == "prompt_acc":
            if self.preds is None or self.labels is None:
                return None
            return (self.preds == self.labels).astype(np.float64)
        if metric == "clip_score":
            return None if self.clip is None else self.clip.astype(np.float64)
        raise KeyError(metric)


def load_eval_data(folder: Path) -> EvalData | None:
    """The run's per-sample data, or None when the run has none (older runs)."""
    from engine.metrics.reference import load_stats

    folder = Path(folder)
    path = folder / EVAL_FILE
    if not path.exists():
        return None
    from engine.file_checks import check_npz

    z = check_npz(path, EVAL_ARRAYS)  # DamagedFile for a truncated or altered file
    get = z.get
    stats_path = Path(str(z["reference_stats"]))
    return EvalData(
        features=z["features"].astype(np.float64), labels=get("labels"), preds=get("preds"),
        clip=get("clip"), prompts=[str(p) for p in z["prompts"]],
        ref=load_stats(stats_path if stats_path.is_absolute() else folder / stats_path)[0],
        reference=str(z["reference"]),
    )


def check_recorded_eval(store: Store, run_id: int, path: Path) -> None:
    """DamagedFile when the run's per-sample data is not the file the run wrote (its size and
    sha256 are recorded with the artifact): a changed byte the archive's own checks miss (its
    local headers, say) must not pass for the run's data either."""
    from engine.errors import DamagedFile
    from engine.verify import fingerprint_problem

    if not path.exists():
        return
    recorded = [a for a in store.artifacts(run_id) if a["kind"] == "eval"]
    if recorded:
        problem = fingerprint_problem(path, recorded[-1].get("size"), recorded[-1].get("sha256"))
        if problem:  # parsing is load_eval_data's
            raise DamagedFile(path, problem)


def paired_differences(a: EvalData, b: EvalData, n_boot: int, seed: int) -> dict[str, PairedDiff]:
    """metric(a) - metric(b) for each metric both runs have, on shared bootstrap indices."""
    if a.features.shape != b.features.shape or a.prompts != b.prompts:
        raise ValueError("the runs were not evaluated on the same prompts and sample count")
    if a.reference != b.reference or not np.allclose(a.ref.mu, b.ref.mu):
        raise ValueError("the runs were scored against different reference statistics")
    idx = bootstrap_resamples(a.features.shape[0], n_boot, seed)
    out = {"fid": paired_fid(a.features, b.features, a.ref, idx)}
    for metric in ("prompt_acc", "clip_score"):
        va, vb = a.per_sample(metric), b.per_sample(metric)
        if va is not None and vb is not None:
            out[metric] = paired_mean(metric, va, vb, idx)
    return out


def _resamples_and_seed(run: dict) -> tuple[int, int]:
    config = json.loads(run["config"] or "{}")
    n_boot = int((config.get("eval") or {}).get("bootstrap") or DEFAULT_RESAMPLES)
    return n_boot, int(config["sampling"]["seed"])


def diff_metrics(diffs: dict[str, PairedDiff]) -> dict[str, float]:
    out = {}
    for metric, d in diffs.items():
        out.update({f"d_{metric}": d.diff, f"d_{metric}_ci_low": d.low, f"d_{metric}_ci_high": d.high})
    return out


def compare_runs(store: Store, id_a: int, id_b: int) -> dict[str, PairedDiff]:
    """Paired differences run a - run b; UserError for runs that cannot be compared."""
    runs = {}
    for run_id in (id_a, id_b):
        try:
            runs[run_id] = store.get_run(run_id)
        except Exception:
            raise UserError(f"no run {run_id} in {store.runs_dir / 'qtui.db'}") from None
    a, b = runs[id_a], runs[id_b]
    if a["protocol"] != b["protocol"]:
        diff = differences(a["config"], b["config"])
        what = "; ".join(f"{k}: {va!r} vs {vb!r}" for k, (va, vb) in diff.items())
        raise UserError(f"runs {id_a} and {id_b} have different protocols ({what}): a paired comparison "
                        f"needs the same model, prompts, noise, sample count and reference")
    data = {}
    for run_id, run in runs.items():
        if run["status"] != "done":
            raise UserError(f"run {run_id} is {run['status']}, not done")
        check_recorded_eval(store, run_id, store.runs_dir / run["folder"] / EVAL_FILE)
        data[run_id] = load_eval_data(store.runs_dir / run["folder"])
        if data[run_id] is None:
            raise UserError(f"run {run_id} has no per-sample data ({EVAL_FILE}); re-run it to compare")
    n_boot, seed = _resamples_and_seed(a)
    try:
        return paired_differences(data[id_a], data[id_b], n_boot, seed)
    except ValueError as exc:
        raise UserError(f"runs {id_a} and {id_b}: {exc}") from None


def _reference_variant(run: dict) -> str:
    return json.loads(run["config"] or "{}").get("reference_variant", "fp")


def update_paired(store: Store, run_id: int) -> None:
    """Store this run's paired differences to its protocol's reference run (see the module
    docstring); runs without per-sample data are left alone."""
    run = store.get_run(run_id)
    reference_variant = _reference_variant(run)
    # a reference still "running" has its data saved already: with --jobs > 1 it may be finishing
    # at this moment, after its own update_paired looked for this run
    peers = [r for r in store.runs(experiment=run["experiment"])
             if r["protocol"] == run["protocol"] and r["status"] in ("done", "running")
             and _reference_variant(r) == reference_variant]
    if run["variant"] == reference_variant:
        reference = run
        targets = [r for r in peers if r["variant"] != reference_variant and r["status"] == "done"]
    else:
        refs = [r for r in peers if r["variant"] == reference_variant]
        if not refs:
            return  # computed when the reference finishes
        reference, targets = refs[-1], [run]
    ref_data = load_eval_data(store.runs_dir / reference["folder"])
    if ref_data is None:
        return
    n_boot, seed = _resamples_and_seed(reference)
    if reference["id"] == run_id:
        zero = {m: PairedDiff(m, 0.0, 0.0, 0.0, len(ref_data.features), 0) for m in PAIRED
                if m == "fid" or ref_data.per_sample(m) is not None}
        store.put_metrics(run_id, diff_metrics(zero))
    for target in targets:
        data = load_eval_data(store.runs_dir / target["folder"])
        if data is None:
            continue
        try:
            diffs = paired_differences(data, ref_data, n_boot, seed)
        except ValueError:
            continue  # not comparable after all (e.g. another reference file): no d_* rather than a failed run
        store.put_metrics(target["id"], diff_metrics(diffs))


@dataclass
class ExpectationResult:
    text: str
    outcome: str
    per_seed: list[tuple[int, PairedDiff | None, str]]  # (seed, difference left - right, outcome)


def latest_done(runs: list[dict]) -> dict[tuple[str, str], dict]:
    """{(protocol, variant): latest done run}."""
    out = {}
    for r in runs:
        if r["status"] == "done":
            out[(r["protocol"], r["variant"])] = r
    return out


def expectation_outcomes(store: Store, experiment, family: str | None = None) -> list[ExpectationResult]:
    """Each expectation of `experiment` (engine.config.Experiment) from the latest done runs of
    each seed of one protocol family (the catalogue's own, else the one with most runs)."""
    from engine.expectations import NOT_RUN, combine

    runs = store.runs(experiment=experiment.name)
    family = family or main_family(runs, family_hash(experiment.run_config(experiment.reference_variant
                                                                           if experiment.reference_variant in experiment.variants
                                                                           else next(iter(experiment.variants)))))
    latest = latest_done([r for r in runs if family_of(r) == family])
    protocols = sorted({p for p, _ in latest}, key=lambda p: min(seed_of(r) for (q, _), r in latest.items() if q == p))
    results = []
    for exp in experiment.expectations:
        per_seed = []
        for protocol in protocols:
            left, right = latest.get((protocol, exp.left)), latest.get((protocol, exp.right))
            if left is None or right is None:
                continue
            try:
                diff = compare_runs(store, left["id"], right["id"]).get(exp.metric)
            except UserError:
                diff = None
            outcome = exp.outcome(diff.low, diff.high) if diff is not None else NOT_RUN
            per_seed.append((seed_of(left), diff, outcome))
        done = [o for _, d, o in per_seed if d is not None]
        results.append(ExpectationResult(exp.text, combine(done) if done else NOT_RUN, per_seed))
    return results


def family_of(run: dict) -> str:
    return family_hash(run["config"] or "{}")


def seed_of(run: dict) -> int:
    return int(json.loads(run["config"] or "{}").get("sampling", {}).get("seed", 0))


def main_family(runs: list[dict], preferred: str | None = None) -> str | None:
    """The protocol family a table ranks: `preferred` when it has runs, else the one with the
    most runs (ties: the one with the latest run)."""
    counts: dict[str, list[int]] = {}
    for r in runs:
        counts.setdefault(family_of(r), []).append(r["id"])
    if preferred in counts:
        return preferred
    if not counts:
        return None
    return max(counts, key=lambda f: (len(counts[f]), max(counts[f])))
