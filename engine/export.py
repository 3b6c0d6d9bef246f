"""Results as tables: one row per run, written as CSV, JSON, Markdown or LaTeX.

Torch-free; `engine export`, `engine run`'s final table and qtui's export all use these.
"""

from __future__ import annotations

import csv
import io
import json

from engine.methods import describe_bits
from engine.store import Store

# (key, header, format) of the results table, in display order.
COLUMNS = [
    ("id", "run", "{}"),
    ("experiment", "experiment", "{}"),
    ("variant", "variant", "{}"),
    ("status", "status", "{}"),
    ("bits", "bits", "{}"),
    ("fid", "FID", "{:.2f}"),
    ("fid_ci", "95% CI", "{}"),
    ("prompt_acc", "prompt acc", "{:.3f}"),
    ("clip_score", "CLIP", "{:.3f}"),
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
                "id": r["id"],
                "experiment": r["experiment"],
                "variant": r["variant"],
                "status": r["status"],
                "bits": describe_bits(config.get("method", "none"), config.get("params", {})) + execution_label(config),
                "fid": r.get("fid"),
                "fid_ci_low": low,
                "fid_ci_high": high,
                "fid_ci": f"[{low:.2f}, {high:.2f}]" if low is not None and high is not None else None,
                "prompt_acc": r.get("prompt_acc"),
                "clip_score": r.get("clip_score"),
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


def visible_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """Drop columns that no row has (for example CLIP on the digits default)."""
    return [c for c in COLUMNS if any(row.get(c[0]) is not None for row in rows)] or COLUMNS[:4]


def cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "" if value is None else fmt.format(value)


def to_csv(rows: list[dict]) -> str:
    keys = [c[0] for c in COLUMNS if c[0] != "fid_ci"] + ["fid_floor", "error"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def to_markdown(rows: list[dict]) -> str:
    cols = visible_columns(rows)
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |"]
    lines.append("|" + "|".join("---" if k in ("experiment", "variant", "status", "bits") else "---:" for k, _, _ in cols) + "|")
    for row in rows:
        lines.append("| " + " | ".join(cell(row, k, f).replace("|", "\\|") for k, _, f in cols) + " |")
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("$", r"\$")):
        text = text.replace(a, b)
    return text


def to_latex(rows: list[dict]) -> str:
    cols = visible_columns(rows)
    align = "".join("l" if k in ("experiment", "variant", "status", "bits", "fid_ci") else "r" for k, _, _ in cols)
    lines = [r"\begin{tabular}{" + align + "}", r"\hline"]
    lines.append(" & ".join(_latex_escape(h) for _, h, _ in cols) + r" \\")
    lines.append(r"\hline")
    for row in rows:
        lines.append(" & ".join(_latex_escape(cell(row, k, f)) for k, _, f in cols) + r" \\")
    lines += [r"\hline", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_json(store: Store, rows: list[dict]) -> str:
    """Everything about each run: config, metrics, layers and artifacts."""
    out = []
    for row in rows:
        run = store.get_run(row["id"])
        out.append(
            {
                **{k: run[k] for k in ("id", "experiment", "variant", "status", "config_hash", "created_at",
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
