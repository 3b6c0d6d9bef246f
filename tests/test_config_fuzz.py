"""Property-based fuzzing of experiments.toml: random tables, keys, types and values around the
real schema. Loading never raises anything but a located ConfigError, and `engine list` on the
file exits 0 or 2 (never a traceback)."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine.cli import main as engine_main
from engine.config import EXPERIMENT_DEFAULTS, load_catalogue
from engine.errors import ConfigError
from qtui.toml_text import value as toml_value  # the TOML writer qtui's launch dialog uses

METHOD_KEYS = ["bits", "symmetric", "scope", "act_bits", "act_mode", "calibration", "group_size", "damp",
               "act_order", "block_size", "strategy", "threshold", "ratio", "k", "budget", "candidates",
               "groups", "group_thresholds", "measure_sensitivity", "description", "method",
               "attn_bits", "log_quant", "start_token_fp", "prompt_scaling", "lr", "steps", "batch_size", "seed"]
METHODS = ["none", "rtn", "gptq", "fisher", "dgq", "minmax", "qat", "ptq", "bogus"]
# bench/faults.py --only fuzz runs more examples with other seeds
EXAMPLES = int(os.environ.get("QTUI_FUZZ_EXAMPLES", "500"))
MODELS = ["digits-unet", "digits-mmdit"] * 4 + ["digits-classifier", "no-such-model", "."]


scalars = st.one_of(
    st.booleans(), st.integers(-3, 3000), st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from(["4", "", "all", "blocks", "static", "dynamic", "global", "budget", "ratio", "groups",
                     "meanstd", "*", "conv_in"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["conv", "attention", "linear", "samples", "seed",
                                                             "steps", "held_out", "x"]), inner, max_size=3)),
    max_leaves=6,
)
# Mostly values the schema accepts, so that fuzzing reaches the checks behind the first ones.
VALID = {
    "samples": st.integers(1, 64), "steps": st.integers(1, 50), "guidance": st.floats(0, 5), "seed": st.integers(0, 9),
    "batch_size": st.integers(1, 64), "bootstrap": st.integers(0, 50), "description": st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=5),
    "feature_model": st.just("digits-classifier"),
    "bits": st.one_of(st.integers(2, 8), st.fixed_dictionaries({}, optional={r: st.integers(1, 9) for r in
                                                                           ("conv", "attention", "linear")})),
    "symmetric": st.booleans(), "scope": st.sampled_from(["all", "blocks"]), "act_bits": st.sampled_from([8, 16, 4]),
    "act_mode": st.sampled_from(["static", "dynamic"]), "group_size": st.sampled_from([8, 16, 7, 0]),
    "calibration": st.fixed_dictionaries({}, optional={"samples": st.integers(0, 4), "held_out": st.integers(0, 4),
                                                       "seed": st.integers(-1, 3), "steps": st.integers(0, 5)}),
    "strategy": st.sampled_from(["global", "groups", "ratio", "meanstd", "budget", "nope"]),
    "threshold": st.floats(0, 1), "ratio": st.floats(0, 1), "k": st.floats(-1, 3), "budget": st.floats(0, 1),
    "candidates": st.lists(st.sampled_from([2, 4, 6, 8, 16, 32]), max_size=3),
    "groups": st.lists(st.lists(st.sampled_from(["conv_in", "*", "down_blocks.0", "nope"]), max_size=2), max_size=2),
    "group_thresholds": st.lists(st.floats(0, 1), max_size=2),
    "attn_bits": st.sampled_from([8, 16, 4]), "log_quant": st.booleans(), "start_token_fp": st.booleans(),
    "prompt_scaling": st.booleans(), "lr": st.floats(0, 0.1),
}


@st.composite
def mutated(draw, keys: list[str], fixed: dict) -> dict:
    """A table of valid values for some of `keys`, then up to two mutations: a key given a
    random value, an unknown key, or a required key removed."""
    table = dict(fixed)
    for key in draw(st.lists(st.sampled_from(keys), max_size=4, unique=True)):
        table[key] = draw(VALID[key]) if key in VALID else draw(values)
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2]))):
        kind = draw(st.sampled_from(["value"] * 6 + ["unknown", "drop"]))
        key = draw(st.sampled_from(keys + list(fixed)))
        if kind == "value":
            table[key] = draw(values)
        elif kind == "unknown":
            table["unknown_key"] = draw(values)
        else:
            table.pop(key, None)
    return table


variant = st.sampled_from(METHODS).flatmap(
    lambda m: mutated([k for k in METHOD_KEYS if k != "method"], {"method": m}))
experiment = st.sampled_from(MODELS).flatmap(
    lambda m: mutated([k for k in EXPERIMENT_DEFAULTS if k != "model"], {"model": m}))
names = st.sampled_from(["a", "b-1", "fp", "x.y"] * 3 + ["bad name"])


@st.composite
def catalogues(draw) -> str:
    lines = []
    for name in draw(st.lists(names, min_size=1, max_size=2, unique=True)):
        exp = draw(experiment)
        lines.append(f"[experiments.{json.dumps(name)}]")
        lines += [f"{key} = {toml_value(v)}" for key, v in exp.items()]
        for vname in draw(st.lists(names, min_size=1, max_size=3, unique=True)):
            lines.append(f"[experiments.{json.dumps(name)}.variants.{json.dumps(vname)}]")
            lines += [f"{key} = {toml_value(v)}" for key, v in draw(variant).items()]
    if draw(st.integers(0, 9)) == 7:
        lines.insert(0, draw(st.sampled_from(["top = 1", "experiments = 3", "[[experiments]]", "x = [", ""])))
    return "\n".join(lines) + "\n"


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=catalogues())
def test_random_catalogues_load_or_fail_with_a_located_error(tmp_path, text):
    path = tmp_path / "experiments.toml"
    path.write_text(text, encoding="utf-8")
    try:
        load_catalogue(path)
        event("valid catalogue")
    except ConfigError as exc:
        event(f"error at {(exc.key or '').split('.')[-1] or 'file'}")
        assert str(exc).startswith(str(path)), exc
        assert "\n" not in str(exc)


@pytest.mark.parametrize("text", [
    '[experiments.a]\nmodel = "digits-unet"\nsamples = inf\n[experiments.a.variants.v]\nmethod = "none"\n',
    '[experiments.a]\nmodel = "digits-unet"\nguidance = nan\n[experiments.a.variants.v]\nmethod = "none"\n',
    '[experiments.a]\nmodel = "digits-unet"\n[experiments.a.variants.v]\nmethod = "rtn"\nbits = {conv = [4]}\n',
    '[experiments.a]\nmodel = "digits-unet"\n[experiments.a.variants.v]\nmethod = "fisher"\nstrategy = []\n',
    '[experiments.a]\nmodel = "digits-unet"\n[experiments.a.variants.v]\nmethod = "gptq"\nbits = 4\ncalibration = {samples = "x"}\n',
])
def test_engine_list_exits_2_on_bad_catalogues(tmp_path, capsys, text):
    path = tmp_path / "experiments.toml"
    path.write_text(text, encoding="utf-8")
    code = engine_main(["list", "--experiments", str(path), "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"error: {path}") and err.count("\n") == 1
