"""`engine report EXPERIMENT --out DIR`: a Markdown report of an experiment for a paper or a
lab notebook, from what the store already holds (nothing is sampled again).

    DIR/report.md     definition, results table with paired differences and verdicts,
                      the expectations and their outcomes, links to the files below
    DIR/table.tex     the results table as a LaTeX tabular
    DIR/pareto.png    FID and CLIP score (or prompt accuracy without CLIP) against size
    DIR/fisher.png    (experiments with Fisher runs) per-layer Fisher information against the
                      measured sensitivity, log scales, with the run's Spearman correlation
    DIR/samples.png   side-by-side samples: one labelled column per variant, one row per
                      prompt (same prompt and noise across a row)

Only the main protocol family P1 (engine/table_groups.py) is plotted and gridded. matplotlib
(Agg backend) is imported only here.
"""

from __future__ import annotations

from pathlib import Path

from engine.export import display_rows, result_rows, to_latex, to_markdown
from engine.grids import SAMPLES_FILE, load_samples
from engine.paired_runs import expectation_outcomes, main_family, seed_of
from engine.protocol import family_hash, protocol_fields
from engine.store import Store


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_plot(rows: list[dict], path: Path, title: str) -> Path:
    """FID (left) and CLIP or prompt accuracy (right) against checkpoint size, one labelled
    point per variant, the non-dominated points joined."""
    plt = _pyplot()
    second = "clip_score" if any(r.get("clip_score") is not None for r in rows) else "prompt_acc"
    panels = [("fid", "FID (lower is better)", True), (second, f"{second} (higher is better)", False)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, label, lower) in zip(axes, panels):
        points = [(r["size_mb"], r[key], r["variant"], r.get(f"{key}_sd")) for r in rows
                  if r.get("size_mb") is not None and r.get(key) is not None]
        for x, y, name, sd in points:
            ax.errorbar([x], [y], yerr=[sd] if sd else None, fmt="o", capsize=3)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front, best = [], None
        for x, y, _, _ in sorted(points):
            if best is None or (y < best if lower else y > best):
                front.append((x, y))
                best = y
        if len(front) > 1:
            ax.plot(*zip(*front), "--", color="grey", linewidth=1)
        ax.set_xlabel("checkpoint size (MB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fisher_plot(layers: list[dict], spearman: float | None, path: Path, title: str) -> Path | None:
    """Per-layer Fisher information against measured sensitivity (both log scales), one point per
    layer that has both (positive); None when no layer has both."""
    points = [(l["fisher"], l["sensitivity"]) for l in layers
              if l.get("fisher") is not None and l.get("sensitivity") is not None
              and l["fisher"] > 0 and l["sensitivity"] > 0]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.scatter(*zip(*points), s=14)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("Fisher information (estimated)")
    ax.set_ylabel("measured sensitivity")
    rho = "" if spearman is None else f", Spearman {spearman:.3f}"
    ax.set_title(f"{title}: {len(points)} layers{rho}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sample_grid(columns: list[tuple[str, Path]], path: Path, rows: int = 10) -> Path:
    """Labelled side-by-side grid from the runs' samples files."""
    plt = _pyplot()
    stacks = [load_samples(p) for _, p in columns]
    n = min(rows, *(len(images) for images, _ in stacks))
    fig, axes = plt.subplots(n, len(columns), figsize=(1.1 * len(columns) + 0.6, 1.1 * n + 0.4), squeeze=False)
    for c, ((name, _), (images, labels)) in enumerate(zip(columns, stacks)):
        for r in range(n):
            ax = axes[r][c]
            ax.imshow(images[r], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"digit {int(labels[r])}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _runs_of_main_family(store: Store, experiment) -> tuple[str | None, list[dict]]:
    runs = store.runs(experiment=experiment.name)
    preferred = family_hash(experiment.run_config(next(iter(experiment.variants))))
    family = main_family(runs, preferred)
    return family, [r for r in runs if family_hash(r["config"] or "{}") == family]


def write_report(store: Store, experiment, out: Path) -> list[Path]:
    """Write the report files into `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    family, runs = _runs_of_main_family(store, experiment)
    rows = result_rows(store, experiment=experiment.name)
    preferred = {experiment.name: family} if family else None
    written = []
    table_md = to_markdown(rows, preferred) if rows else "no runs yet\n"
    (out / "table.tex").write_text(to_latex(rows, preferred) if rows else "% no runs yet\n")
    written.append(out / "table.tex")

    lines = [f"# {experiment.name}", "", experiment.description, ""]
    if runs:
        fields = protocol_fields(runs[0]["config"], include_seed=False)
        seeds = sorted({seed_of(r) for r in runs})
        lines += ["Protocol (P1): " + ", ".join(f"{k} {v}" for k, v in fields.items()) + f", seeds {seeds}.", ""]
    lines += ["## Variants", ""]
    from engine.methods import describe_variant

    for name, v in experiment.variants.items():
        mark = " (reference)" if name == experiment.reference_variant else ""
        lines.append(f"- **{name}**{mark}: {v.method}, {describe_variant(experiment, v)}. {v.description}")
    lines += ["", "## Results", "", table_md,
              "FID 95% CI: the sampling spread of one run's FID (its samples resampled, the reference "
              "statistics fixed); it does not include FID's finite-sample bias. dFID and the other d columns: "
              f"paired bootstrap of the difference to the reference variant `{experiment.reference_variant}` on the "
              "same samples (same prompts and noise), 95% interval; the verdict says whether the run is "
              "significantly better, worse, or neither (n.s.). With several seeds, metrics are mean ± sd over seeds "
              "and the differences are listed per seed (* where significant).", ""]
    lines += ["## Expectations", ""]
    results = expectation_outcomes(store, experiment, family) if experiment.expectations else []
    if not results:
        lines.append("None declared.")
    for res in results:
        lines.append(f"- `{res.text}`: **{res.outcome}**")
        for seed, diff, outcome in res.per_seed:
            if diff is not None:
                lines.append(f"  - seed {seed}: difference {diff.diff:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}], {outcome}")
    lines.append("")

    shown, _, _ = display_rows([r for r in rows if r["family"] == family], preferred) if rows else ([], [], [])
    done = [r for r in shown if r.get("status") == "done"]
    if done:
        written.append(pareto_plot(done, out / "pareto.png", experiment.name))
        lines += ["## Size against quality", "", "![Pareto plot](pareto.png)", ""]
    fisher_runs = [r for r in runs if r["status"] == "done"
                   and store.metrics(r["id"]).get("fisher_spearman") is not None]
    if fisher_runs:
        run = fisher_runs[-1]
        spearman = store.metrics(run["id"])["fisher_spearman"]
        plot = fisher_plot(store.layers(run["id"]), spearman, out / "fisher.png",
                           f"{experiment.name} / {run['variant']} (run {run['id']})")
        if plot is not None:
            written.append(plot)
            lines += ["## Fisher against measured sensitivity", "",
                      f"Run {run['id']} ({run['variant']}): each point is a layer; Spearman rank correlation "
                      f"of the estimated Fisher information with the measured sensitivity {spearman:.3f}.", "",
                      "![Fisher against sensitivity](fisher.png)", ""]
    columns = []
    first_seed = {}
    for r in runs:
        if r["status"] == "done":
            seed = seed_of(r)
            first_seed.setdefault("seed", seed)
            if seed == first_seed["seed"]:
                path = store.runs_dir / r["folder"] / SAMPLES_FILE
                if path.exists():
                    columns = [c for c in columns if c[0] != r["variant"]] + [(r["variant"], path)]
    if columns:
        order = list(experiment.variants)
        columns.sort(key=lambda c: order.index(c[0]) if c[0] in order else len(order))
        written.append(sample_grid(columns, out / "samples.png"))
        lines += ["## Samples", "", f"Seed {first_seed['seed']}; each row: one prompt and one initial noise "
                  "for every variant.", "", "![Samples](samples.png)", ""]
    lines += ["LaTeX table: [table.tex](table.tex)", ""]
    (out / "report.md").write_text("\n".join(lines))
    written.insert(0, out / "report.md")
    return written
