"""`engine report` draws fisher.png when the experiment has a Fisher run (layers with both
`fisher` and `sensitivity`, run metric `fisher_spearman`), and not otherwise."""

from __future__ import annotations

from tests.test_protocols import add_run, experiment


def test_report_has_a_fisher_plot_only_with_a_fisher_run(tmp_path):
    from engine.report import write_report
    from engine.store import Store

    store = Store.open(tmp_path / "runs")
    add_run(store, "fp")
    a = add_run(store, "A", shift=0.4, size=200)
    files = write_report(store, experiment([]), tmp_path / "plain")
    assert "fisher.png" not in {p.name for p in files}

    store.put_layers(a, [{"name": f"layer{i}", "role": "conv", "params": 100, "bits": 4,
                          "weight_err": 0.1, "fisher": 10.0 ** -i, "sensitivity": 10.0 ** (-i / 2),
                          "out_err": None, "extra": None} for i in range(6)]
                     + [{"name": "fp_layer", "role": "conv", "params": 100, "bits": None, "weight_err": 0.0,
                         "fisher": None, "sensitivity": None, "out_err": None, "extra": None}])
    store.put_metrics(a, {"fisher_spearman": 1.0})
    files = write_report(store, experiment([]), tmp_path / "report")
    assert "fisher.png" in {p.name for p in files}
    assert (tmp_path / "report" / "fisher.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report" / "report.md").read_text()
    assert "![Fisher against sensitivity](fisher.png)" in md
    assert f"Run {a} (A)" in md and "measured sensitivity 1.000" in md
    store.close()
