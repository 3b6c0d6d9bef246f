"""Which runs a results table compares: protocol groups, repeats over seeds, best marks.

Rows (one per run, from `engine.export.result_rows`) are grouped per experiment by protocol
family (engine/protocol.py: the protocol without the seed). Groups are labelled P1, P2, ... per
experiment; P1 is the family the catalogue defines (when given) or the one with the most runs.
A note under the table says how every other group differs from P1. Best marks are given within
a group only, so a run of another protocol is shown and marked but never ranked with the rest.

Within a group whose done runs span several seeds (`seeds = [0, 1, 2]`), each variant is one
row: the latest done run of each seed, metrics as mean +- sd over seeds (sd with n - 1), and the
paired differences to the reference variant per seed, each computed within its own seed's
protocol (same prompts and noise), listed in seed order with * where its 95% interval excludes
0; the verdict counts the seeds that were significantly better or worse. A group with one seed
keeps one row per run.
"""

from __future__ import annotations

import statistics

from engine.metrics.paired import BETTER, SAME, WORSE, verdict
from engine.protocol import differences

# metric key -> "min" / "max": which value is best (within a group)
BEST = {"fid": "min", "kid": "min", "prompt_acc": "max", "clip_score": "max", "size_mb": "min"}
AVERAGED = ("fid", "kid", "prompt_acc", "clip_score", "size_mb", "size_ratio", "latency_ms", "peak_mem_mb",
            "mean_bits", "fisher_spearman", "fisher_curv_spearman", "calibration_s", "quantize_s", "fid_floor")
DIFFS = ("fid", "prompt_acc", "clip_score")
SHORT = {BETTER: "better", WORSE: "worse", SAME: "n.s."}


def _diff_text(row: dict, metric: str) -> str | None:
    d, low, high = (row.get(f"d_{metric}{s}") for s in ("", "_ci_low", "_ci_high"))
    if d is None or low is None or high is None:
        return None
    if row.get("is_reference") and d == low == high == 0.0:
        return "0 (ref)"
    return f"{d:+.2f} [{low:+.2f}, {high:+.2f}]" if metric == "fid" else f"{d:+.3f} [{low:+.3f}, {high:+.3f}]"


def _verdict(row: dict, metric: str) -> str | None:
    low, high = row.get(f"d_{metric}_ci_low"), row.get(f"d_{metric}_ci_high")
    if low is None or high is None or (low == high == 0.0):
        return None  # the reference itself, or no paired data
    return SHORT[verdict(metric, low, high)]


def _single(row: dict) -> dict:
    out = dict(row)
    for metric in DIFFS:
        out[f"d_{metric}_text"] = _diff_text(row, metric)
    out["verdict"] = _verdict(row, "fid")
    out["seeds"] = str(row.get("seed"))
    return out


def _aggregate(runs: list[dict]) -> dict:
    """One row for a variant's runs over several seeds (runs sorted by seed)."""
    out = {k: runs[-1].get(k) for k in ("experiment", "variant", "bits", "samples", "family", "status")}
    out.update(id=",".join(str(r["id"]) for r in runs), seeds=",".join(str(r["seed"]) for r in runs),
               n_seeds=len(runs))
    for key in AVERAGED:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = statistics.fmean(values)
            out[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
    for metric in DIFFS:
        parts, verdicts = [], []
        for r in runs:
            d, low, high = (r.get(f"d_{metric}{s}") for s in ("", "_ci_low", "_ci_high"))
            if d is None:
                parts.append("-")
                continue
            sig = low is not None and high is not None and not (low <= 0.0 <= high)
            parts.append((f"{d:+.2f}" if metric == "fid" else f"{d:+.3f}") + ("*" if sig else ""))
            if low is not None and high is not None and not low == high == 0.0:
                verdicts.append(verdict(metric, low, high))
        out[f"d_{metric}_text"] = ", ".join(parts) if any(p != "-" for p in parts) else None
        if metric == "fid" and verdicts:
            better, worse = verdicts.count(BETTER), verdicts.count(WORSE)
            out["verdict"] = (f"better {better}/{len(verdicts)}" if better and not worse else
                              f"worse {worse}/{len(verdicts)}" if worse and not better else
                              f"n.s. {len(verdicts) - better - worse}/{len(verdicts)}" if not better else
                              f"mixed {better}+/{worse}-")
    return out


def _mark_best(rows: list[dict]) -> None:
    done = [r for r in rows if r.get("status") == "done"]
    for key, direction in BEST.items():
        values = [r[key] for r in done if r.get(key) is not None]
        if len(values) < 2:
            continue
        if min(values) == max(values):
            continue  # all equal: nothing is best
        best = min(values) if direction == "min" else max(values)
        for r in done:
            if r.get(key) == best:
                r.setdefault("_best", set()).add(key)


def group_rows(rows: list[dict], preferred: dict[str, str] | None = None) -> tuple[list[dict], list[str]]:
    """(display rows, notes). `preferred`: {experiment: family} to put first as P1."""
    from engine.paired_runs import main_family

    out, notes = [], []
    experiments = list(dict.fromkeys(r["experiment"] for r in rows))
    for exp in experiments:
        exp_rows = [r for r in rows if r["experiment"] == exp]
        first = main_family([{"id": r["id"], "config": r["_config"]} for r in exp_rows], (preferred or {}).get(exp))
        families = sorted(dict.fromkeys(r["family"] for r in exp_rows), key=lambda f: f != first)
        configs = {}
        for number, family in enumerate(families, start=1):
            label = f"P{number}"
            members = [r for r in exp_rows if r["family"] == family]
            configs[family] = members[0]["_config"]
            seeds = {r["seed"] for r in members if r["status"] == "done"}
            if len(seeds) > 1:
                latest: dict[tuple[str, int], dict] = {}
                for r in members:
                    if r["status"] == "done":
                        latest[(r["variant"], r["seed"])] = r
                variants = list(dict.fromkeys(r["variant"] for r in members))
                group = [_aggregate(sorted((r for (v, _), r in latest.items() if v == variant), key=lambda r: r["seed"]))
                         for variant in variants if any(v == variant for v, _ in latest)]
                group += [_single(r) for r in members if r["status"] != "done"]
            else:
                group = [_single(r) for r in members]
            for r in group:
                r["protocol"] = label
            _mark_best(group)
            out += group
            if number > 1:
                diff = differences(configs[first], configs[family])
                diff.pop("seed", None)
                what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items()) or "same fields"
                notes.append(f"{exp} {label}: another protocol ({what}); ranked only within {label}")
    return out, notes
