"""experiments.toml: what loads, and every bad input as one clear line with exit code 2."""

from __future__ import annotations

import pytest

from engine.config import config_hash, find_line, load_catalogue
from engine.errors import ConfigError
from tests.conftest import REPO, engine


def test_shipped_catalogue_declares_the_ablation():
    catalogue = load_catalogue(REPO / "experiments.toml")
    exp = catalogue.get("attention-ablation")
    assert list(exp.variants) == ["fp", "A", "B", "C", "D"]
    assert exp.variants["fp"].method == "none"
    assert exp.variants["A"].params["bits"] == {"attention": 4, "conv": 4, "linear": 4}
    assert exp.variants["B"].params["bits"] == {"attention": 8, "conv": 4, "linear": 4}
    assert exp.variants["C"].params["bits"] == {"attention": 4, "conv": 8, "linear": 8}
    assert exp.variants["D"].params["bits"] == {"attention": 8, "conv": 8, "linear": 8}
    assert exp.samples >= 1000


def test_tiny_catalogue_and_run_config(tiny_experiments):
    exp = load_catalogue(tiny_experiments).get("tiny")
    assert exp.variants["A"].params == {"bits": {"attention": 4, "conv": 4, "linear": 4}, "symmetric": True}
    assert exp.variants["C"].params == {"bits": {"attention": 4, "conv": 8}, "symmetric": False}
    config = exp.run_config("B", samples=7)
    assert config["sampling"]["samples"] == 7 and config["method"] == "rtn"
    # The hash follows what determines results, not the description.
    other = dict(config, description="changed")
    assert config_hash(other) == config_hash(config)
    assert config_hash(exp.run_config("B", samples=8)) != config_hash(config)


def test_find_line_locates_keys_in_tables():
    text = '[experiments.x]\nmodel = "m"\n\n[experiments.x.variants.A]\nbits = { conv = 9 }\n'
    assert find_line(text, ["experiments", "x"], "model") == 2
    assert find_line(text, ["experiments", "x", "variants", "A"], "bits") == 5
    assert find_line(text, ["experiments", "x", "variants", "A"], "nothing") == 4


BAD = [
    ("malformed", "[experiments.tiny\nmodel = 1\n", "not valid TOML", 1),
    ("unknown experiment key", "@@\ncolour = 'red'\n", "experiments.tiny.colour: unknown key", 17),
    ("unknown method", "@@\n[experiments.tiny.variants.Z]\nmethod = 'magic'\n", "unknown method 'magic'", 31),
    ("unknown role", "@@\n[experiments.tiny.variants.Z]\nbits = { mlp = 4 }\n", "unknown role 'mlp'", 31),
    ("bits too high", "@@\n[experiments.tiny.variants.Z]\nbits = { conv = 9 }\n", "between 2 and 8, got 9", 31),
    ("bits too low", "@@\n[experiments.tiny.variants.Z]\nbits = 1\n", "between 2 and 8, got 1", 31),
    ("unknown variant key", "@@\n[experiments.tiny.variants.Z]\nbits = 4\ngroup = 64\n", "unknown key for method 'rtn'", 32),
    ("missing model", "@@\n[experiments.other]\nmodel = 'no-such-model'\n[experiments.other.variants.a]\nmethod = 'none'\n",
     "no model 'no-such-model'", 31),
    ("samples zero", "@@\n[experiments.other]\nmodel = '@M'\nsamples = 0\n[experiments.other.variants.a]\nmethod = 'none'\n",
     "samples: must be >= 1", 32),
]


def write_bad(tiny_experiments, body: str):
    text = tiny_experiments.read_text()
    model = load_catalogue(tiny_experiments).get("tiny").model
    if body.startswith("@@\n"):
        # insert into the tiny experiment's table (its keys end at line 11), or append a table
        extra = body[3:].replace("@M", model)
        if extra.startswith("["):
            text = text + "\n" + extra
        else:
            lines = text.splitlines(keepends=True)
            lines.insert(11, extra)  # after `bootstrap = 10`, inside [experiments.tiny]
            text = "".join(lines)
    else:
        text = body
    tiny_experiments.write_text(text)
    return text


@pytest.mark.parametrize("name,body,message,line", BAD, ids=[b[0] for b in BAD])
def test_bad_catalogue_is_one_located_error(tiny_experiments, name, body, message, line):
    text = write_bad(tiny_experiments, body)
    with pytest.raises(ConfigError) as info:
        load_catalogue(tiny_experiments)
    err = info.value
    assert message in str(err)
    assert err.file == str(tiny_experiments)
    # the reported line really holds the offending key or table
    assert err.line is not None
    offending = text.splitlines()[err.line - 1]
    if err.key:
        assert err.key.split(".")[-1] in offending, (err.line, offending)
    assert "\n" not in str(err)


def test_cli_bad_input_exits_2_and_leaves_no_database(tiny_experiments, tmp_path):
    runs = tmp_path / "runs"
    write_bad(tiny_experiments, "@@\n[experiments.tiny.variants.Z]\nbits = { conv = 9 }\n")
    result = engine("run", "tiny", "--experiments", str(tiny_experiments), "--runs-dir", str(runs))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "bits.conv" in lines[0] and "experiments.toml:" in lines[0]
    assert not runs.exists()


@pytest.mark.parametrize("args,message", [
    (["run", "nope"], "unknown experiment 'nope'"),
    (["run", "tiny", "--variant", "Q"], "has no variant 'Q'"),
    (["run", "tiny", "--samples", "0"], "--samples must be at least 1"),
])
def test_cli_unknown_experiment_or_variant(tiny_experiments, tmp_path, args, message):
    runs = tmp_path / "runs"
    runs.mkdir()
    result = engine(*args, "--experiments", str(tiny_experiments), "--runs-dir", str(runs))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert list(runs.iterdir()) == []  # no database created, nothing launched


def test_cli_database_unchanged_by_bad_input(tiny_experiments, tmp_path):
    from engine.store import Store

    runs = tmp_path / "runs"
    store = Store.open(runs)
    store.create_run("tiny", "fp", {"x": 1}, "h")
    store.close()
    files = sorted(runs.iterdir())
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    result = engine("run", "tiny", "--variant", "nope", "--experiments", str(tiny_experiments), "--runs-dir", str(runs))
    assert result.returncode == 2
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(runs.iterdir())}
    assert after == before
