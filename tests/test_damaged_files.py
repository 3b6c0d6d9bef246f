"""Damaged files in a run folder and a damaged database: one clear error naming the file and
what is wrong, never a safetensors panic or a traceback, nothing overwritten; `engine verify`."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from engine.errors import DamagedDatabase, DamagedFile
from engine.methods import validate_method
from engine.store import Store
from tests.conftest import REPO, engine


# ------------------------------------------------------------------ files built here
def packed_file(path):
    """A real packed checkpoint of a small model (two quantized layers, one float16 buffer)."""
    from engine.quant import RTNConfig, quantize_, save_packed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    report = quantize_(model, RTNConfig(bits={"linear": 4}))
    save_packed(path, model, report.packed, report.half)
    return model


def header_of(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def with_header(path, header, data):
    """Rewrite `path` with `header` (JSON) and tensor bytes `data`."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def damage(path, kind):
    """One kind of damage to a safetensors file."""
    raw = path.read_bytes()
    header, data = header_of(path)
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) - len(data) // 2])
    elif kind == "short-prefix":
        path.write_bytes(raw[:5])
    elif kind == "garbage":
        path.write_bytes(b"\x07" * 8 + os.urandom(200))
    elif kind == "not-json":
        n = int.from_bytes(raw[:8], "little")
        path.write_bytes(raw[:8] + b"{" + b"\xff" * (n - 1) + raw[8 + n:])
    elif kind == "past-end":  # the last tensor claims 1000 times its elements, consistently
        name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
        start, stop = header[name]["data_offsets"]
        header[name]["shape"] = [math.prod(header[name]["shape"]) * 1000]
        header[name]["data_offsets"] = [start, start + (stop - start) * 1000]
        with_header(path, header, data)
    elif kind == "dtype-shape":
        name = next(k for k in header if k not in ("__metadata__", "quant.codes") and header[k]["dtype"] == "F16")
        header[name]["dtype"] = "F32"  # twice the bytes its range holds
        with_header(path, header, data)
    elif kind == "missing-codes":
        del header["quant.codes"]
        with_header(path, header, data)
    elif kind == "trailing":
        path.write_bytes(raw + b"\0" * 12)
    else:
        raise ValueError(kind)


DAMAGE = {
    "truncated": r"truncated: header says \d+ bytes of tensors, file has \d+",
    "short-prefix": r"truncated: 5 bytes, not even the 8-byte header length",
    "garbage": r"not a safetensors file|truncated: the header says",
    "not-json": r"garbage header: not JSON",
    "past-end": r"truncated: header says \d+ bytes of tensors, file has \d+",
    "dtype-shape": r"tensor \S+: dtype F32 x shape \[\d+\] is \d+ bytes, its byte range \[\d+, \d+\) holds \d+",
    "missing-codes": r"\d+ bytes after the last tensor|tensor \S+: its byte range \[\d+, \d+\) leaves \d+ bytes unused",
    "trailing": r"12 bytes after the last tensor",
}


def test_packed_round_trip_loads(tmp_path):
    from engine.file_checks import check_safetensors
    from engine.quant import load_packed

    path = tmp_path / "weights.safetensors"
    model = packed_file(path)
    header = check_safetensors(path)
    assert {"quant.codes", "quant.scales", "quant.biases"} <= set(header)
    state = load_packed(path)
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value.float()), key


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_packed_checkpoint_is_one_clear_error(tmp_path, kind):
    from engine.quant import load_packed

    path = tmp_path / "weights.safetensors"
    packed_file(path)
    damage(path, kind)
    with pytest.raises(DamagedFile, match=DAMAGE[kind]) as info:
        load_packed(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert info.value.path == str(path)


def test_missing_tensor_with_consistent_offsets_is_named(tmp_path):
    """quant.codes removed and the offsets rewritten: the header is valid, the metadata still
    lists quantized layers."""
    from engine.quant import load_packed

    path = tmp_path / "weights.safetensors"
    packed_file(path)
    header, data = header_of(path)
    start, stop = header.pop("quant.codes")["data_offsets"]
    for entry in header.values():
        if isinstance(entry, dict) and "data_offsets" in entry and entry["data_offsets"][0] >= stop:
            entry["data_offsets"] = [o - (stop - start) for o in entry["data_offsets"]]
    with_header(path, header, data[:start] + data[stop:])
    with pytest.raises(DamagedFile, match=r"missing tensor quant.codes \(the metadata lists 2 quantized layers\)"):
        load_packed(path)


def test_flipped_byte_in_the_metadata_is_a_damaged_file(tmp_path):
    from engine.quant import load_packed

    path = tmp_path / "weights.safetensors"
    packed_file(path)
    raw = bytearray(path.read_bytes())
    at = raw.index(b'"layers\\"') if b'"layers\\"' in raw else raw.index(b"layers")
    raw[at + 2] ^= 0x01  # `layers` -> `lbyers`: the metadata no longer lists them
    path.write_bytes(bytes(raw))
    with pytest.raises(DamagedFile, match="not a valid packed checkpoint"):
        load_packed(path)


def calibration_file(path):
    from engine.quant.calibration_hessians import save_calibration

    tensors = {"hessian.a": torch.eye(4), "absmax.a": torch.tensor(2.0)}
    save_calibration(path, {"method": "gptq", "params": {"bits": 4}, "nsamples": {"a": 10}}, tensors)
    return tensors


@pytest.mark.parametrize("kind", ["truncated", "short-prefix", "not-json", "dtype-shape", "trailing"])
def test_damaged_calibration_file(tmp_path, kind):
    from engine.quant.calibration_hessians import load_calibration

    path = tmp_path / "calibration.safetensors"
    tensors = calibration_file(path)
    meta, loaded = load_calibration(path)
    assert meta["nsamples"] == {"a": 10} and torch.equal(loaded["hessian.a"], tensors["hessian.a"])
    if kind == "dtype-shape":  # no float16 tensor here: make the F32 Hessian claim F64
        header, data = header_of(path)
        header["hessian.a"]["dtype"] = "F64"
        with_header(path, header, data)
        pattern = r"tensor hessian.a: dtype F64 x shape \[4, 4\] is 128 bytes, its byte range \[\d+, \d+\) holds 64"
    else:
        damage(path, kind)
        pattern = DAMAGE[kind]
    with pytest.raises(DamagedFile, match=pattern):
        load_calibration(path)


def test_calibration_without_its_block_inputs_is_named(tmp_path, tiny_mmdit):
    from engine.models.loader import load_text_to_image
    from engine.quant.calibration_hessians import save_calibration
    from engine.quant.gptq_method import requantize, targets_of

    denoiser = load_text_to_image(tiny_mmdit, torch.device("cpu")).denoiser
    params = validate_method("gptq", {"bits": 4})
    names = [t.name for t in targets_of(denoiser, "gptq", params)]
    path = tmp_path / "calibration.safetensors"
    layout = [{"args": [], "kwargs": {"hidden_states": {"tensor": "block_input.0.hidden_states"},
                                      "joint_attention_kwargs": {"value": None}}}]
    save_calibration(path, {"method": "gptq", "params": params, "layers": names, "block_inputs": layout},
                     {"absmax.x": torch.tensor(1.0)})
    with pytest.raises(DamagedFile, match=r"calibration.safetensors: missing tensor block_input.0.hidden_states$"):
        requantize(denoiser, path)
    save_calibration(path, {"method": "gptq", "params": params, "layers": names[1:], "block_inputs": layout}, {})
    with pytest.raises(DamagedFile, match=f"its {len(names) - 1} layers are not the model's {len(names)} GPTQ targets"):
        requantize(denoiser, path)
    save_calibration(path, {"method": "gptq", "params": {"bits": 4}, "layers": names}, {})
    with pytest.raises(DamagedFile, match="no GPTQ params and layer list"):
        requantize(denoiser, path)


def test_a_safetensors_file_that_is_not_calibration(tmp_path):
    from safetensors.torch import save_file

    from engine.quant.calibration_hessians import load_calibration

    path = tmp_path / "calibration.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(DamagedFile, match="not a qtui calibration file"):
        load_calibration(path)


def test_damaged_samples_file(tmp_path):
    from engine.grids import load_samples, save_samples

    path = tmp_path / "samples.safetensors"
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    save_samples(path, images, [3, 5])
    got, labels = load_samples(path)
    assert np.array_equal(got, images) and labels.tolist() == [3, 5]
    damage(path, "truncated")
    with pytest.raises(DamagedFile, match=r"samples.safetensors: truncated: header says"):
        load_samples(path)


def eval_npz(folder):
    from engine.evaluate import save_eval

    data = {"features": np.ones((4, 3)), "prompts": np.array(["a"] * 4), "feature_model": np.array("m"),
            "clip_model": np.array(""), "reference": np.array("r"), "reference_stats": np.array("ref.npz"),
            "seed": np.array(0), "labels": np.arange(4)}
    return save_eval(folder, data)


@pytest.mark.parametrize("kind", ["truncated", "flipped", "garbage", "missing"])
def test_damaged_eval_npz(tmp_path, kind):
    from engine.evaluate import load_eval

    path = eval_npz(tmp_path)
    assert load_eval(tmp_path).labels.tolist() == [0, 1, 2, 3]
    raw = bytearray(path.read_bytes())
    if kind == "truncated":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
        pattern = r"eval.npz: damaged .npz \(truncated or not a zip file"
    elif kind == "flipped":
        at = raw.index(b"\x00\x00\xf0\x3f")  # inside the float64 ones of `features`
        raw[at + 3] ^= 0x40
        path.write_bytes(bytes(raw))
        pattern = r"eval.npz: damaged .npz \(Bad CRC-32"
    elif kind == "garbage":
        path.write_bytes(os.urandom(300))
        pattern = r"eval.npz: damaged .npz"
    else:
        np.savez(path, features=np.ones(2))
        pattern = r"eval.npz: missing arrays prompts, feature_model"
    with pytest.raises(DamagedFile, match=pattern) as info:
        load_eval(tmp_path)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ artifact fingerprints
def test_add_artifact_records_size_and_sha256_and_old_databases_gain_the_columns(tmp_path):
    import hashlib

    runs = tmp_path / "runs"
    store = Store.open(runs)
    run_id = store.create_run("e", "v", {}, "h")
    path = runs / "run-00001" / "x.bin"
    path.parent.mkdir()
    path.write_bytes(b"abc" * 10)
    store.add_artifact(run_id, "x", path)
    store.add_artifact(run_id, "gone", runs / "nowhere.bin")
    rows = store.artifacts(run_id)
    assert (rows[0]["size"], rows[0]["sha256"]) == (30, hashlib.sha256(b"abc" * 10).hexdigest())
    assert rows[1]["size"] is None and rows[1]["sha256"] is None
    store.close()
    # a database from before the columns: dropped here, added back in place on open (twice)
    conn = sqlite3.connect(runs / "qtui.db")
    conn.execute("alter table artifacts drop column size")
    conn.execute("alter table artifacts drop column sha256")
    conn.commit()
    conn.close()
    for _ in range(2):
        store = Store.open(runs)
        assert {"size", "sha256"} <= set(store.db["artifacts"].columns_dict)
        assert store.schema_version() == 2
        assert [r["sha256"] for r in store.artifacts(run_id)] == [None, None]
        store.close()


# ------------------------------------------------------------------ engine verify, end to end
@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_models):
    """A real `engine run` of the tiny experiment's fp and A (RTN W4) variants."""
    from tests.conftest import TINY_TOML

    root = tmp_path_factory.mktemp("verify")
    toml = root / "experiments.toml"
    toml.write_text(TINY_TOML.format(model=tiny_models["model"], classifier=tiny_models["classifier"]))
    runs = root / "runs"
    result = engine("run", "tiny", "--variant", "fp", "--variant", "A", "--samples", "10",
                    "--experiments", str(toml), "--runs-dir", str(runs))
    assert result.returncode == 0, result.stdout + result.stderr
    return root, runs, toml


def verify(runs, *args):
    return engine("verify", "--runs-dir", str(runs), *args)


def test_verify_a_real_run_then_damage_its_checkpoint(finished, tmp_path):
    import shutil

    _, runs_src, _ = finished
    runs = tmp_path / "runs"
    shutil.copytree(runs_src, runs)  # a copied runs folder still verifies (relative paths)
    store = Store.open(runs)
    ids = {r["variant"]: r["id"] for r in store.runs()}
    kinds = {a["kind"] for a in store.artifacts(ids["A"])}
    assert {"checkpoint", "eval", "samples", "grid"} <= kinds
    assert all(a["sha256"] for a in store.artifacts(ids["A"]))
    result = verify(runs)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [f"run {ids['fp']} ok", f"run {ids['A']} ok"]

    checkpoint = runs / store.get_run(ids["A"])["folder"] / "weights.safetensors"
    original = checkpoint.read_bytes()
    raw = bytearray(original)
    raw[-3] ^= 0xFF  # a flipped byte in the tensor data: only the sha256 sees it
    checkpoint.write_bytes(bytes(raw))
    result = verify(runs, str(ids["A"]))
    assert result.returncode == 2
    assert result.stdout.strip() == (f"run {ids['A']}: weights.safetensors: sha256 differs from the recorded "
                                     "one (altered after the run)")

    checkpoint.write_bytes(original[: len(original) - 100])
    result = verify(runs, "--experiment", "tiny")
    assert result.returncode == 2
    assert result.stdout.splitlines() == [
        f"run {ids['fp']} ok",
        f"run {ids['A']}: weights.safetensors: {len(original) - 100} bytes, {len(original)} when the run wrote it "
        "(truncated after the run)"]

    # an old row without fingerprint: the parse itself reports the truncation
    with store.db.conn:
        store.db.conn.execute("update artifacts set size = null, sha256 = null where run_id = ?", (ids["A"],))
    result = verify(runs, str(ids["A"]))
    assert result.returncode == 2
    assert result.stdout.strip().startswith(f"run {ids['A']}: weights.safetensors: truncated: header says ")
    checkpoint.write_bytes(original)
    assert verify(runs, str(ids["A"])).returncode == 0
    (checkpoint.parent / "eval.npz").unlink()
    result = verify(runs, str(ids["A"]))
    assert result.returncode == 2 and result.stdout.strip() == f"run {ids['A']}: eval.npz: missing"
    assert "Traceback" not in result.stderr
    assert verify(runs, "999").stderr.strip() == f"error: no run 999 in {runs.resolve() / 'qtui.db'}"


def test_verify_loads_the_checkpoint_into_the_runs_model_strictly(finished, tmp_path):
    """A checkpoint whose bytes match its record but not the model (here: the record rewritten
    after swapping in another model's checkpoint) fails the strict load."""
    import shutil

    from engine.file_checks import fingerprint

    _, runs_src, _ = finished
    runs = tmp_path / "runs"
    shutil.copytree(runs_src, runs)
    store = Store.open(runs)
    run = [r for r in store.runs() if r["variant"] == "A"][0]
    checkpoint = runs / run["folder"] / "weights.safetensors"
    packed_file(checkpoint)  # a valid packed file of another model
    size, sha = fingerprint(checkpoint)
    with store.db.conn:
        store.db.conn.execute("update artifacts set size = ?, sha256 = ? where run_id = ? and kind = 'checkpoint'",
                              (size, sha, run["id"]))
    result = verify(runs, str(run["id"]))
    assert result.returncode == 2
    line = result.stdout.strip()
    assert line.startswith(f"run {run['id']}: weights.safetensors: does not load into the run's model (")
    assert "Missing key(s)" in line and "\n" not in line


# ------------------------------------------------------------------ a damaged database
def make_db(runs):
    store = Store.open(runs)
    for i in range(30):  # enough rows for several pages
        store.create_run("e", f"v{i}", {"sampling": {"samples": i}, "pad": "x" * 500}, "h")
    store.close()
    # fold the write-ahead log into the file, as after a clean exit
    conn = sqlite3.connect(runs / "qtui.db")
    conn.execute("pragma wal_checkpoint(truncate)")
    conn.close()
    for suffix in ("-wal", "-shm"):
        p = runs / f"qtui.db{suffix}"
        if p.exists():
            p.unlink()
    return runs / "qtui.db"


DB_DAMAGE = {
    "truncated": (lambda raw: raw[: len(raw) // 3], r"truncated: its header says \d+ bytes \(\d+ pages\), the file has \d+"),
    "garbage": (lambda raw: b"\x13" * len(raw), r"not an SQLite database: its header is wrong"),
    "short": (lambda raw: raw[:40], r"truncated: 40 bytes, shorter than SQLite's 100-byte header"),
    "pages-overwritten": (lambda raw: raw[:4096] + b"\x55" * (len(raw) - 4096), r"SQLite says: (database disk image is malformed|file is not a database)"),
}


@pytest.mark.parametrize("kind", sorted(DB_DAMAGE))
def test_store_open_refuses_a_damaged_database_and_changes_nothing(tmp_path, kind):
    runs = tmp_path / "runs"
    path = make_db(runs)
    change, pattern = DB_DAMAGE[kind]
    path.write_bytes(change(path.read_bytes()))
    before = path.read_bytes()
    with pytest.raises(DamagedDatabase, match=pattern) as info:
        Store.open(runs)
    message = str(info.value)
    assert message.startswith(f"{path}: damaged database (") and "\n" not in message
    assert "nothing was changed" in message and f'sqlite3 {path}.damaged ".recover" | sqlite3 {path}' in message
    assert path.read_bytes() == before
    assert not (runs / "qtui.db-wal").exists()


def test_an_empty_database_file_is_new_unless_a_log_holds_its_pages(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    path = runs / "qtui.db"
    path.write_bytes(b"")
    Store.open(runs).close()  # SQLite's empty database: created as new
    assert path.stat().st_size > 0
    path.write_bytes(b"")
    (runs / "qtui.db-wal").write_bytes(b"\x37\x7f\x06\x82" + b"\0" * 60)
    with pytest.raises(DamagedDatabase, match=r"the file is empty but its write-ahead log qtui.db-wal holds 64 bytes"):
        Store.open(runs)
    assert path.read_bytes() == b""


@pytest.mark.parametrize("command", [["list"], ["queue"], ["export"], ["verify"], ["show", "tiny"],
                                     ["run", "tiny", "--variant", "fp"]])
def test_engine_commands_on_a_damaged_database_exit_2_with_one_line(tmp_path, tiny_experiments, command):
    runs = tmp_path / "runs"
    path = make_db(runs)
    path.write_bytes(path.read_bytes()[:5000])
    before = path.read_bytes()
    result = engine(*command, "--experiments", str(tiny_experiments), "--runs-dir", str(runs), timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path.resolve()}: damaged database (truncated"), result.stderr
    assert path.read_bytes() == before


def test_qtui_exits_2_before_starting_on_a_damaged_database(tmp_path, tiny_experiments):
    runs = tmp_path / "runs"
    path = make_db(runs)
    path.write_bytes(b"not a database at all" * 100)
    before = path.read_bytes()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "qtui.app", "--runs-dir", str(runs), "--experiments",
                             str(tiny_experiments)], capture_output=True, text=True, timeout=60, env=env,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().startswith(f"qtui: error: {runs / 'qtui.db'}: damaged database (not an SQLite")
    assert len(result.stderr.strip().splitlines()) == 1
    assert path.read_bytes() == before


# ------------------------------------------------------------------ engine verify --requantize (GPTQ)
from tests.test_gptq_method import GPTQ_TOML  # noqa: E402


def test_verify_requantize_reproduces_a_gptq_runs_codes(tmp_path, tiny_mmdit, tiny_models):  # noqa: F811
    from safetensors.torch import load_file, save_file

    from engine.file_checks import fingerprint
    from engine.quant.calibration_hessians import META_KEY

    toml = tmp_path / "experiments.toml"
    toml.write_text(GPTQ_TOML.format(model=tiny_mmdit, classifier=tiny_models["classifier"]))
    runs = tmp_path / "runs"
    result = engine("run", "tiny-gptq", "--variant", "gptq-w2a8", "--experiments", str(toml), "--runs-dir", str(runs))
    assert result.returncode == 0, result.stdout + result.stderr
    store = Store.open(runs)
    run = store.runs()[0]
    result = verify(runs, "--requantize")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"run {run['id']} ok"

    # other calibration inputs, recorded as if the run had written them: GPTQ no longer gives its codes
    path = runs / run["folder"] / "calibration.safetensors"
    tensors = load_file(str(path))
    assert any(k.startswith("block_input.") for k in tensors) and not any(k.startswith("hessian.") for k in tensors)
    generator = torch.Generator().manual_seed(0)
    for key in [k for k in tensors if k.endswith(".hidden_states")]:
        tensors[key] = torch.randn(tensors[key].shape, generator=generator) * tensors[key].std()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(tensors, str(path), metadata={META_KEY: meta[META_KEY]})
    size, sha = fingerprint(path)
    with store.db.conn:
        store.db.conn.execute("update artifacts set size = ?, sha256 = ? where run_id = ? and kind = 'calibration'",
                              (size, sha, run["id"]))
    assert verify(runs).returncode == 0  # the files parse and the checkpoint loads
    result = verify(runs, "--requantize")
    assert result.returncode == 2
    assert result.stdout.strip().startswith(
        f"run {run['id']}: weights.safetensors: requantized codes differ from the checkpoint's in ")


def test_verify_requantize_says_a_run_kept_no_calibration(tmp_path, tiny_mmdit, tiny_models):  # noqa: F811
    toml = tmp_path / "experiments.toml"
    toml.write_text(GPTQ_TOML.format(model=tiny_mmdit, classifier=tiny_models["classifier"]).replace(
        'method = "gptq"', 'method = "gptq"\nkeep_calibration = false'))
    runs = tmp_path / "runs"
    result = engine("run", "tiny-gptq", "--variant", "gptq-w2a8", "--experiments", str(toml), "--runs-dir", str(runs),
                    "--samples", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    store = Store.open(runs)
    run = store.runs()[0]
    assert json.loads(run["config"])["params"]["keep_calibration"] is False
    assert {a["kind"] for a in store.artifacts(run["id"])} >= {"checkpoint"}
    assert "calibration" not in {a["kind"] for a in store.artifacts(run["id"])}
    assert not (runs / run["folder"] / "calibration.safetensors").exists()
    assert store.metrics(run["id"])["calibration_bytes"] == 0
    result = verify(runs, "--requantize")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == (f"run {run['id']} ok (kept no calibration (keep_calibration = false): "
                                     "not requantized)")


def test_verify_loads_qat_dgq_minmax_and_ptq_checkpoints(tmp_path, tiny_models):
    """The methods whose checkpoints hold activation quantizers (QAT W4A8, dgq, minmax) load
    strictly through their `prepare_load`; PTQ's own checkpoint parses."""
    from tests.conftest import TINY_TOML
    from tests.test_dgq import DGQ_TOML
    from tests.test_ptq_qat import E2E_TOML

    toml = tmp_path / "experiments.toml"
    toml.write_text(TINY_TOML.format(model=tiny_models["model"], classifier=tiny_models["classifier"]) + E2E_TOML
                    + DGQ_TOML.format(model=tiny_models["model"], classifier=tiny_models["classifier"]))
    runs = tmp_path / "runs"
    for args in (("tiny", "--variant", "P", "--variant", "Q", "--samples", "10"), ("tiny-dgq",)):
        result = engine("run", *args, "--experiments", str(toml), "--runs-dir", str(runs))
        assert result.returncode == 0, result.stdout + result.stderr
    ids = [r["id"] for r in Store.open(runs).runs()]
    assert len(ids) == 4
    result = verify(runs)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [f"run {i} ok" for i in ids]


def test_compare_refuses_eval_data_altered_where_the_archive_does_not_look(finished, tmp_path):
    """A bit flipped in a zip local header (its copy of the CRC) leaves np.load reading the right
    arrays; the recorded sha256 still tells `engine compare` the file is not the run's."""
    import shutil

    _, runs_src, _ = finished
    runs = tmp_path / "runs"
    shutil.copytree(runs_src, runs)
    ok = engine("compare", "1", "2", "--runs-dir", str(runs))
    assert ok.returncode == 0, ok.stderr
    path = runs / "run-00002" / "eval.npz"
    data = bytearray(path.read_bytes())
    data[15] ^= 0x04  # the local header's CRC-32: the central directory's copy is the one read
    path.write_bytes(bytes(data))
    import numpy as np

    with np.load(path) as z:
        assert len(z.files) > 0 and z[z.files[0]] is not None  # the archive itself still reads
    bad = engine("compare", "1", "2", "--runs-dir", str(runs))
    assert bad.returncode == 2
    assert bad.stderr.startswith(f"error: {path}: sha256 differs") and bad.stderr.count("\n") == 1, bad.stderr


def test_no_bit_flip_in_an_npz_escapes_as_anything_but_a_damaged_file(tmp_path):
    """Every bit of a small .npz flipped in turn (three bits per byte): it still reads, or it is
    one DamagedFile. Flips in the zip headers can claim a zip version, encryption or another
    codec, which numpy and zipfile raise as NotImplementedError, RuntimeError or zlib.error."""
    import numpy as np

    from engine.errors import DamagedFile
    from engine.file_checks import check_npz

    path = tmp_path / "eval.npz"
    np.savez_compressed(path, features=np.arange(40.0).reshape(8, 5), labels=np.arange(8))
    data = path.read_bytes()
    damaged = 0
    for at in range(len(data)):
        for bit in (0, 3, 6):
            flipped = bytearray(data)
            flipped[at] ^= 1 << bit
            path.write_bytes(bytes(flipped))
            try:
                check_npz(path)
            except DamagedFile:
                damaged += 1
    assert damaged > len(data)  # most flips are caught (CRCs, headers)
