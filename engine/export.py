"""Results as tables: one row per run, written as CSV, JSON, Markdown or LaTeX.

Torch-free; `engine export`, `engine run`'s final table and qtui's export all use these.
CSV and JSON have one row per run; the Markdown, LaTeX and terminal tables group runs by
protocol and seeds and mark the best values within a group (engine/table_groups.py).

"FID 95% CI" is the sampling spread of one run's FID: the percentile interval of the FIDs of
its samples resampled with replacement (the reference statistics fixed), centred on the point
estimate (engine/metrics/fid.py `fid_bootstrap`); it does not include FID's finite-sample bias
(see the floor). Whether two variants differ is read from the paired difference to the
reference variant ("dFID vs ref"), never from two overlapping per-run intervals.
"""

from __future__ import annotations

import csv
import io
import json

from engine.methods import describe_run
from engine.protocol import family_hash, protocol_hash
from engine.store import Store
from engine.table_groups import group_rows

# (key, header, format) of the results table, in display order.
COLUMNS = [
    ("id", "run", "{}"),
    ("experiment", "experiment", "{}"),
    ("variant", "variant", "{}"),
    ("status", "status", "{}"),
    ("bits", "bits", "{}"),
    ("protocol", "protocol", "{}"),
    ("samples", "n", "{}"),
    ("seeds", "seeds", "{}"),
    ("fid", "FID", "{:.2f}"),
    ("fid_ci", "FID 95% CI (own samples resampled)", "{}"),
    ("d_fid_text", "dFID to ref [paired 95% CI]", "{}"),
    ("verdict", "FID vs ref", "{}"),
    ("kid", "KID", "{:.4f}"),
    ("prompt_acc", "prompt acc", "{:.3f}"),
    ("d_prompt_acc_text", "d acc [paired 95% CI]", "{}"),
    ("clip_score", "CLIP", "{:.2f}"),
    ("clip_ci", "CLIP 95% CI", "{}"),
    ("d_clip_score_text", "d CLIP [paired 95% CI]", "{}"),
    ("size_mb", "size MB", "{:.3f}"),
    ("size_ratio", "xFP32", "{:.3f}"),
    ("reduction_pct", "reduction %", "{:.1f}"),
    ("latency_ms", "ms/image", "{:.2f}"),
    ("peak_mem_mb", "peak MB", "{:.0f}"),
    ("model_mb", "model MB", "{:.2f}"),  # the denoiser's parameters and buffers as held while sampling
    ("sampling_mem_mb", "sampling MB", "{:.0f}"),
    ("mean_bits", "mean bits", "{:.2f}"),
    ("fisher_spearman", "Spearman", "{:.2f}"),  # method fisher: estimated vs measured sensitivity
    ("fisher_curv_spearman", "Spearman 2-sided", "{:.2f}"),  # ... first-order term cancelled
    ("calibration_s", "calib s", "{:.1f}"),
    ("quantize_s", "quant s", "{:.1f}"),
    ("compile_s", "compile s", "{:.1f}"),
    ("finetune_s", "finetune s", "{:.1f}"),
]


PAIRED_KEYS = [f"d_{m}{s}" for m in ("fid", "prompt_acc", "clip_score") for s in ("", "_ci_low", "_ci_high")]
TEXT_KEYS = ("experiment", "variant", "status", "bits", "protocol", "seeds", "fid_ci", "clip_ci", "verdict",
             "d_fid_text", "d_prompt_acc_text", "d_clip_score_text")


def execution_label(config: dict) -> str:
    """' real' / ' bf16 autocast' after the bits label for runs that set execution keys."""
    label = " real" if config.get("execution") == "real" else ""
    return label + (f" {config['autocast']} autocast" if config.get("autocast") else "")


def result_rows(store: Store, experiment: str | None = None, run_ids: list[int] | None = None) -> list[dict]:
    """Raw values per run (None where a metric is missing), in run order."""
    rows = []
    for r in store.results(experiment):
        if run_ids is not None and r["id"] not in run_ids:
            continue
        config = json.loads(r["config"] or "{}")
        low, high = r.get("fid_ci_low"), r.get("fid_ci_high")
        size = r.get("size_bytes")
        ratio = r.get("size_ratio")
        rows.append(
            {
                "_config": r["config"] or "{}",
                "is_reference": r["variant"] == config.get("reference_variant", "fp"),
                "protocol": r.get("protocol") or protocol_hash(config),
                "family": family_hash(config),
                "seed": config.get("sampling", {}).get("seed"),
                "samples": config.get("sampling", {}).get("samples"),
                **{k: r.get(k) for k in PAIRED_KEYS},
                "kid": r.get("kid"),
                "kid_ci_low": r.get("kid_ci_low"),
                "kid_ci_high": r.get("kid_ci_high"),
                "id": r["id"],
                "experiment": r["experiment"],
                "variant": r["variant"],
                "status": r["status"],
                "bits": describe_run(config, r.get("dtype_bits")) + execution_label(config),
                "fid": r.get("fid"),
                "fid_ci_low": low,
                "fid_ci_high": high,
                "fid_ci": f"[{low:.2f}, {high:.2f}]" if low is not None and high is not None else None,
                "prompt_acc": r.get("prompt_acc"),
                "clip_score": r.get("clip_score"),
                "clip_score_ci_low": r.get("clip_score_ci_low"),
                "clip_score_ci_high": r.get("clip_score_ci_high"),
                "clip_ci": _interval(r.get("clip_score_ci_low"), r.get("clip_score_ci_high")),
                "size_mb": size / 1e6 if size is not None else None,
                "size_ratio": ratio,
                "reduction_pct": (1 - ratio) * 100 if ratio is not None else None,
                "latency_ms": r.get("latency_ms"),
                "peak_mem_mb": r.get("peak_mem_mb"),
                "model_mb": r["model_bytes"] / 2**20 if r.get("model_bytes") is not None else None,
                "sampling_mem_mb": r.get("sampling_mem_mb"),
                "mean_bits": r.get("mean_bits"),
                "fisher_spearman": r.get("fisher_spearman"),
                "fisher_curv_spearman": r.get("fisher_curv_spearman"),
                "calibration_s": r.get("calibration_s"),
                "quantize_s": r.get("quantize_s"),
                "compile_s": r.get("compile_s"),
                "finetune_s": r.get("finetune_s"),
                "fid_floor": r.get("fid_floor"),
                "error": r.get("error"),
            }
        )
    return rows


def _interval(low, high) -> str | None:
    return f"[{low:.2f}, {high:.2f}]" if low is not None and high is not None else None


def visible_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """Drop columns that no row has (for example CLIP on the digits default)."""
    return [c for c in COLUMNS if any(row.get(c[0]) is not None for row in rows)] or COLUMNS[:4]


def cell(row: dict, key: str, fmt: str) -> str:
    """A value as text; "mean ± sd" on rows averaged over seeds."""
    value = row.get(key)
    if value is None:
        return ""
    sd = row.get(f"{key}_sd")
    return fmt.format(value) + (f" ± {fmt.format(sd)}" if sd is not None else "")


def is_best(row: dict, key: str) -> bool:
    return key in row.get("_best", ())


def display_rows(rows: list[dict], preferred: dict[str, str] | None = None) -> tuple[list[dict], list[dict], list[str]]:
    """(grouped rows, their columns, notes) for the Markdown, LaTeX and terminal tables."""
    shown, notes = group_rows(rows, preferred)
    cols = visible_columns(shown)
    if len({r["experiment"] for r in shown}) == 1 and len({r["protocol"] for r in shown}) == 1:
        cols = [c for c in cols if c[0] != "protocol"]  # one protocol: nothing to tell apart
    if all(r.get("seeds") and "," not in str(r["seeds"]) for r in shown) and len({r.get("seeds") for r in shown}) <= 1:
        cols = [c for c in cols if c[0] != "seeds"]
    return shown, cols, notes


CSV_EXTRA = ["protocol", "seed", "samples", "fid_ci_low", "fid_ci_high", "clip_score_ci_low", "clip_score_ci_high",
             "kid_ci_low", "kid_ci_high", *PAIRED_KEYS,
             "fid_floor", "error"]


def to_csv(rows: list[dict]) -> str:
    """One line per run: the raw numbers (paired intervals as their two ends)."""
    derived = ("protocol", "samples", "seeds", "fid_ci", "clip_ci", "verdict", "d_fid_text", "d_prompt_acc_text", "d_clip_score_text")
    keys = [c[0] for c in COLUMNS if c[0] not in derived] + CSV_EXTRA
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def to_markdown(rows: list[dict], preferred: dict[str, str] | None = None) -> str:
    shown, cols, notes = display_rows(rows, preferred)
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |"]
    lines.append("|" + "|".join("---" if k in TEXT_KEYS else "---:" for k, _, _ in cols) + "|")
    for row in shown:
        texts = [cell(row, k, f).replace("|", "\\|") for k, _, f in cols]
        texts = [f"**{t}**" if t and is_best(row, k) else t for t, (k, _, _) in zip(texts, cols)]
        lines.append("| " + " | ".join(texts) + " |")
    lines += [""] + [f"- {note}" for note in notes] if notes else []
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("$", r"\$")):
        text = text.replace(a, b)
    return text


def to_latex(rows: list[dict], preferred: dict[str, str] | None = None) -> str:
    shown, cols, notes = display_rows(rows, preferred)
    align = "".join("l" if k in TEXT_KEYS else "r" for k, _, _ in cols)
    lines = [r"\begin{tabular}{" + align + "}", r"\hline"]
    lines.append(" & ".join(_latex_escape(h) for _, h, _ in cols) + r" \\")
    lines.append(r"\hline")
    for row in shown:
        texts = [_latex_escape(cell(row, k, f)).replace("±", r"$\pm$") for k, _, f in cols]
        texts = [rf"\textbf{{{t}}}" if t and is_best(row, k) else t for t, (k, _, _) in zip(texts, cols)]
        lines.append(" & ".join(texts) + r" \\")
    lines += [r"\hline", r"\end{tabular}"]
    lines += [f"% {note}" for note in notes]
    return "\n".join(lines) + "\n"


def to_json(store: Store, rows: list[dict]) -> str:
    """Everything about each run: config, metrics, layers and artifacts."""
    out = []
    for row in rows:
        run = store.get_run(row["id"])
        out.append(
            {
                **{k: run[k] for k in ("id", "experiment", "variant", "status", "config_hash", "protocol", "created_at",
                                       "started_at", "finished_at", "error", "git_commit", "host")},
                "config": json.loads(run["config"] or "{}"),
                "versions": json.loads(run["versions"] or "{}"),
                "metrics": store.metrics(row["id"]),
                "layers": store.layers(row["id"]),
                "artifacts": store.artifacts(row["id"]),
            }
        )
    return json.dumps(out, indent=2) + "\n"


FORMATS = {"csv": to_csv, "md": to_markdown, "latex": to_latex}


def export(store: Store, fmt: str, experiment: str | None = None, run_ids: list[int] | None = None) -> str:
    rows = result_rows(store, experiment, run_ids)
    if fmt == "json":
        return to_json(store, rows)
    return FORMATS[fmt](rows)
