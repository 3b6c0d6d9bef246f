"""qtui's logic without the UI: sorting, best values, export formats, log coalescing,
heatmap data and half-block images."""

from __future__ import annotations

import csv
import io
import json

import pytest

from qtui.columns import BY_KEY, COLUMNS, best_values, fid_text, human_bytes, sort_rows
from qtui.export import export_runs, format_for
from qtui.halfblock import ImageError, load_halfblock, target_size
from qtui.heatmap_data import block_of, build_matrix, cell_text, lines, make_scale
from qtui.log_tail import format_line, format_lines
from qtui.model import Progress, RunRow
from qtui_helpers import fill_demo


def run(i, status="done", **metrics) -> RunRow:
    return RunRow(id=i, experiment=f"e{i % 2}", variant=f"v{i}", status=status, metrics=metrics)


ROWS = [
    run(1, fid=5.0, prompt_acc=0.5, size_bytes=100),
    run(2, fid=None, prompt_acc=0.9),
    run(3, fid=2.0, size_bytes=300, clip_score=0.3),
    run(4, status="failed"),
    run(5, fid=2.0, prompt_acc=0.1, size_bytes=200),
]


@pytest.mark.parametrize("key", [c.key for c in COLUMNS])
@pytest.mark.parametrize("descending", [False, True])
def test_sort_puts_missing_values_last_in_both_directions(key, descending):
    column = BY_KEY[key]
    ordered = sort_rows(ROWS, column, descending)
    values = [column.value(r) for r in ordered]
    present = [v for v in values if v is not None]
    assert values[: len(present)] == present  # no None before a value
    assert present == sorted(present, reverse=descending)
    assert sorted(r.id for r in ordered) == [1, 2, 3, 4, 5]


def test_sort_ties_keep_id_order():
    ordered = sort_rows(ROWS, BY_KEY["fid"])
    assert [r.id for r in ordered] == [3, 5, 1, 2, 4]
    assert [r.id for r in sort_rows(ROWS, BY_KEY["fid"], True)] == [1, 3, 5, 2, 4]


def test_best_values_follow_each_columns_direction():
    best = best_values(ROWS)
    assert best["fid"] == 2.0  # lower is better
    assert best["acc"] == 0.9  # higher is better
    assert best["size"] == 100
    assert "clip" not in best  # one value: nothing to compare
    assert "latency" not in best  # nobody has it
    assert "id" not in best and "status" not in best
    assert "clip" not in best_values([run(1, clip_score=0.3), run(2, clip_score=0.3)])  # all equal


def test_cell_texts():
    r = run(7, fid=12.345, fid_ci_low=11.9, fid_ci_high=12.81)
    assert fid_text(r) == "12.35 [11.9,12.8]"
    assert fid_text(run(8, fid=123.4)) == "123.4"
    assert fid_text(run(9)) == "—"
    assert human_bytes(999) == "999 B"
    assert human_bytes(1_170_000) == "1.17 MB"
    assert BY_KEY["acc"].text(run(1, prompt_acc=0.875)) == "87.5"


def test_progress_eta_from_stage_rate():
    p = Progress(run_id=1, stage="sampling", done=50, total=200, time=110.0,
                 stage_start_time=100.0, stage_start_done=0)
    assert p.fraction == 0.25
    assert p.eta(now=110.0) == pytest.approx(30.0)  # 150 steps at 0.2 s
    assert p.eta(now=115.0) == pytest.approx(25.0)
    assert Progress(run_id=1, stage="load", done=0, total=0, time=1.0).eta() is None


# ---------------------------------------------------------------- export
def test_export_keeps_the_screen_order_and_uses_the_engine_formats(tmp_path):
    ids = fill_demo(tmp_path / "runs", with_images=False)
    order = [ids["w2"], ids["fp32"], ids["failed"]]  # as sorted and filtered on screen
    out = export_runs(tmp_path / "runs", tmp_path / "x" / "t.csv", order)
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [int(r["id"]) for r in table] == order
    assert table[0]["fid"] == "41.7" and table[2]["status"] == "failed" and table[2]["fid"] == ""
    md = export_runs(tmp_path / "runs", tmp_path / "t.md", order).read_text().splitlines()
    assert len(md) == 2 + len(order) and "| w2 |" in md[2] and "| fp32 |" in md[3]
    tex = export_runs(tmp_path / "runs", tmp_path / "t.tex", order).read_text()
    assert "\\begin{tabular}" in tex and tex.count("\\\\") == 1 + len(order)
    data = json.loads(export_runs(tmp_path / "runs", tmp_path / "t.json", order).read_text())
    assert [r["id"] for r in data] == order and data[0]["layers"]
    with pytest.raises(ValueError, match="unknown format"):
        format_for(tmp_path / "t.xlsx")


# ---------------------------------------------------------------- logs
def test_progress_lines_coalesce_and_others_stay():
    raw = ['{"event": "log", "message": "hello"}']
    raw += [f'{{"event": "progress", "stage": "sampling", "done": {d}, "total": 1000}}' for d in range(1000)]
    raw += ["Traceback (most recent call last):", '{"event": "progress", "stage": "metrics", "done": 1, "total": 2}']
    assert [text for text, _ in format_lines(raw)] == [
        "hello", "[sampling] 999/1000", "Traceback (most recent call last):", "[metrics] 1/2"]
    assert [stage for _, stage in format_lines(raw)] == [None, "sampling", None, "metrics"]


def test_format_line_keeps_unknown_events_readable():
    assert format_line('{"event": "done", "status": "done"}') == ("[done] status=done", None)
    assert format_line("{not json") == ("{not json", None)
    stages = format_lines(['{"event": "progress", "stage": "a", "done": 1, "total": 2}',
                           '{"event": "progress", "stage": "b", "done": 1, "total": 2}'])
    assert stages == [("[a] 1/2", "a"), ("[b] 1/2", "b")]


# ---------------------------------------------------------------- heatmap data
def test_blocks_are_module_prefixes():
    assert block_of("down_blocks.1.attentions.0.to_q") == "down_blocks.1"
    assert block_of("mid_block.resnets.0.conv1") == "mid_block"
    assert block_of("transformer_blocks.3.attn.to_q") == "transformer_blocks.3"
    assert block_of("conv_in") == "conv_in"
    assert block_of("time_embedding.linear_1") == "time_embedding"


def layer(name, role, bits, err, params=10):
    return {"name": name, "role": role, "params": params, "bits": bits, "weight_err": err}


def test_matrix_aligns_layers_by_name_and_collapses_blocks():
    a = [layer("conv_in", "conv", None, 0.0), layer("down.0.conv", "conv", None, 0.0, 30),
         layer("down.0.to_q", "attention", None, 0.0)]
    b = [layer("conv_in", "conv", 4, 0.1), layer("down.0.conv", "conv", 4, 0.2, 30),
         layer("down.0.to_q", "attention", 8, 0.01)]
    m = build_matrix({1: a, 2: b}, {1: "fp", 2: "w4"})
    assert [l.name for l in m.layers] == ["conv_in", "down.0.conv", "down.0.to_q"]
    assert m.quantities() == ["bits", "weight_err"]
    rows = lines(m, "bits", set())
    assert rows[0].fp == [True, False] and rows[0].values == [None, 4]
    folded = lines(m, "bits", {"down.0"})
    assert [r.label for r in folded] == ["conv_in", "▸ down.0"]
    assert folded[1].fp == [True, False]
    assert folded[1].values[1] == pytest.approx((4 * 30 + 8 * 10) / 40)  # params-weighted
    scale = make_scale(lines(m, "weight_err", set()), "weight_err")
    assert scale.low == 0.0 and scale.high == 0.2 and not scale.log
    assert scale.index(0.0) == 0 and scale.index(0.2) == 7
    assert cell_text(4.0, "bits", False, False) == "4"
    assert cell_text(None, "bits", True, False) == "FP"
    assert cell_text(1.2e-5, "weight_err", False, False) == "1.2e-5"  # the exponent stays readable
    for value in (1.23456e-5, -9.87e-12, 3.3e150, -4.4e-150, 12345.6, 0.000999, 0.5, 1e-3):
        text = cell_text(value, "fisher", False, False)
        assert len(text) <= 7 and float(text) == pytest.approx(value, rel=0.06), (value, text)


def test_scale_goes_logarithmic_over_wide_ranges():
    m = build_matrix({1: [layer("a", "conv", 2, 1e-1), layer("b", "conv", 8, 1e-5)]}, {1: "x"})
    scale = make_scale(lines(m, "weight_err", set()), "weight_err")
    assert scale.log
    assert scale.index(1e-3) == 4  # the middle of 1e-5 .. 1e-1 on a log scale


# ---------------------------------------------------------------- half-block images
def test_halfblock_pairs_pixel_rows(tmp_path):
    from PIL import Image

    image = Image.new("RGB", (4, 4))
    for x in range(4):
        image.putpixel((x, 0), (255, 0, 0))
        image.putpixel((x, 1), (0, 0, 255))
    image.save(tmp_path / "a.png")
    hb = load_halfblock(tmp_path / "a.png", max_width=4)
    assert hb.width == 4 and hb.height == 2
    assert hb.lines[0][0] == ((255, 0, 0), (0, 0, 255))
    assert hb.lines[1][0] == ((0, 0, 0), (0, 0, 0))


def test_halfblock_scaling_and_errors(tmp_path):
    assert target_size(32, 32, 80, None) == (64, 64, True)  # whole-factor enlargement
    assert target_size(1000, 500, 80, None) == (80, 40, False)
    assert target_size(32, 32, 200, 10) == (32, 32, False)  # too few lines to enlarge
    assert target_size(32, 32, 200, 40) == (64, 64, True)
    with pytest.raises(ImageError, match="not found"):
        load_halfblock(tmp_path / "missing.png", 40)
    (tmp_path / "bad.png").write_text("not a png")
    with pytest.raises(ImageError, match="not a readable image"):
        load_halfblock(tmp_path / "bad.png", 40)


# ---------------------------------------------------------------- start-up budget
def test_importing_the_app_pulls_in_nothing_heavy():
    """torch, diffusers, numpy (via sqlite-utils) and Pillow load in threads or subprocesses."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import qtui.app"],
                         capture_output=True, text=True, check=True)
    modules = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    heavy = {"torch", "diffusers", "numpy", "sqlite_utils", "PIL", "scipy", "engine.store", "engine.config"}
    assert not modules & heavy, sorted(modules & heavy)
    assert "textual.app" in modules and "qtui.app" in modules


# ---------------------------------------------------------------- configs and protocols
def test_config_toml_round_trips():
    import tomllib

    from qtui.toml_text import to_toml
    from qtui_helpers import config_for

    config = config_for("e", "B", {"conv": 4, "attention": 8}, description='quote " and ü')
    config["params"]["calibration"] = {"samples": 32, "seed": 1}
    config["params"]["groups"] = [[1, 2], [3]]
    config["eval"]["weight"] = float("inf")
    config["missing"] = None
    back = tomllib.loads(to_toml(config))
    del config["missing"]
    assert back == config
    assert "# missing is not set" in to_toml({"missing": None})


def test_protocol_key_separates_what_changes_numbers():
    from qtui.protocol import describe_protocol, protocol_key
    from qtui_helpers import config_for

    a = config_for("e", "A", {"conv": 4}, samples=1000)
    b = config_for("e", "B", {"conv": 8}, samples=1000, description="other words")
    b["sampling"]["batch_size"] = 50  # batch size changes no number
    assert protocol_key(a) == protocol_key(b) != ""
    for change in ({"samples": 100}, {"seed": 1}, {"steps": 50}, {"guidance": 2.0}):
        c = config_for("e", "A", {"conv": 4}, samples=1000)
        c["sampling"].update(change)
        assert protocol_key(c) != protocol_key(a), change
    d = config_for("e", "A", {"conv": 4}, samples=1000)
    d["model"]["id"] = "other-model"
    assert protocol_key(d) != protocol_key(a)
    assert protocol_key({}) == "" and protocol_key({"experiment": "e"}) == ""
    assert describe_protocol(a) == "n=1000 seed 0 · 5 steps · guidance 1.0 · tiny-model / tiny-model"


def test_run_info_from_stored_configs():
    import json

    from qtui.run_info import derive
    from qtui_helpers import config_for

    text = json.dumps(config_for("e", "B", {"conv": 4, "attention": 8, "linear": 4}, samples=100,
                                 description="conv W4, attention W8"))
    description, quant, samples, protocol = derive(text)
    assert (description, quant, samples) == ("conv W4, attention W8", "conv W4, attention W8, linear W4", 100)
    from engine.protocol import protocol_hash

    assert protocol == protocol_hash(text)  # qtui groups runs as the engine does
    assert derive(None) == ("", "", None, "") and derive("not json")[:3] == ("", "", None)
    assert derive(json.dumps({"method": "nonexistent"}))[1] == "nonexistent"


def test_heatmap_column_names_fit_or_are_numbered_with_a_legend():
    from qtui.heatmap_data import column_labels, sort_lines

    names = ["fp", "gptq-w4a8", "gptq-w4a8-act-order"]
    labels, widths, legend = column_labels(names, 80)
    assert labels == names and widths == [7, 9, 19] and legend == []
    labels, widths, legend = column_labels(names, 30)
    assert labels == ["1", "2", "3"] and widths == [7, 7, 7] and legend == list(zip(labels, names))
    m = build_matrix({1: [{"name": "a", "role": "conv", "params": 1, "bits": 4, "weight_err": 0.3},
                          {"name": "b", "role": "conv", "params": 1, "bits": None, "weight_err": None},
                          {"name": "c", "role": "conv", "params": 1, "bits": 8, "weight_err": 0.01}]},
                     {1: "A"})
    rows = lines(m, "weight_err", set())
    assert [r.label for r in sort_lines(rows, 0, True)] == ["a", "c", "b"]  # missing last
    assert [r.label for r in sort_lines(rows, 0, False)] == ["c", "a", "b"]
    bits = lines(m, "bits", set())
    assert [r.label for r in sort_lines(bits, 0, True)] == ["c", "a", "b"]  # FP last, not as 32


def test_heatmap_columns_keep_to_the_highlighted_runs_protocol():
    from qtui.components.heatmap_screen import pick_columns

    runs = [RunRow(1, "e", "fp", "done", protocol="p1000"), RunRow(2, "e", "A", "done", protocol="p1000"),
            RunRow(3, "e", "A", "done", protocol="p100"), RunRow(4, "e", "B", "done", protocol="p100")]
    every = {1, 2, 3, 4}
    assert [r.id for r in pick_columns(runs, every, ["fp", "A", "B"], prefer=3)] == [3, 4]
    assert [r.id for r in pick_columns(runs, every, ["fp", "A", "B"], prefer=2)] == [1, 2]
    assert [r.id for r in pick_columns(runs, every, ["fp", "A", "B"], prefer=None)] == [1, 3, 4]
