"""The `gptq` method on a tiny MMDiT: calibration Hessians, block-by-block inputs, GPTQ against
RTN per layer, activation quantization, grouped packing, bad input, and `engine run` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from engine.config import load_catalogue
from engine.errors import ConfigError
from engine.methods import validate_method
from engine.store import Store
from tests.conftest import engine

CAL = {"samples": 4, "held_out": 3, "steps": 3, "seed": 1}
SAMPLING = {"guidance": 2.0, "batch_size": 4}
TO_Q = "transformer_blocks.{}.attn.to_q"

GPTQ_TOML = """
[experiments.tiny-gptq]
model = "{model}"
feature_model = "{classifier}"
samples = 10
steps = 3
guidance = 2.0
batch_size = 10
bootstrap = 5

[experiments.tiny-gptq.variants.rtn-w4a8]
method = "rtn"
bits = 4
scope = "blocks"
act_bits = 8
calibration = {{ samples = 4, held_out = 3, steps = 3 }}

[experiments.tiny-gptq.variants.gptq-w2a8]
description = "2 bits, so that the tiny model's images visibly differ from full precision"
method = "gptq"
bits = 2
group_size = 8
act_order = true
act_bits = 8
calibration = {{ samples = 4, held_out = 3, steps = 3 }}
"""


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load(path):
    from engine.models.loader import load_text_to_image

    return load_text_to_image(path, torch.device("cpu"))


class HessianLog:
    """GPTQ.quantize wrapped: each layer's Hessian and token count as GPTQ used them, and how
    many GPTQ collectors (each holding a Hessian) were alive at the most."""

    def __init__(self, monkeypatch):
        import weakref

        from engine.quant import gptq as gptq_module

        self.hessians, self.tokens, self.alive, self.max_alive = {}, {}, weakref.WeakSet(), 0
        self.alive_per_block = {}
        init, quantize = gptq_module.GPTQ.__init__, gptq_module.GPTQ.quantize

        def tracked_init(g, layer, name=""):
            init(g, layer, name)
            self.alive.add(g)
            self.max_alive = max(self.max_alive, len(self.alive))
            blocks = {int(other.name.split(".")[1]) for other in self.alive}
            self.alive_per_block[name] = blocks

        def logged_quantize(g, **kwargs):
            self.hessians[g.name], self.tokens[g.name] = g.H.clone(), g.nsamples
            return quantize(g, **kwargs)

        monkeypatch.setattr(gptq_module.GPTQ, "__init__", tracked_init)
        monkeypatch.setattr(gptq_module.GPTQ, "quantize", logged_quantize)


@pytest.fixture(scope="module")
def gptq_run(tiny_mmdit, tmp_path_factory):
    """GPTQ W4A8 (static) quantized in place by the driver, its Hessians (HessianLog)."""
    from engine.quant.gptq_method import quantize_calibrated

    folder = tmp_path_factory.mktemp("gptq")
    model = load(tiny_mmdit)
    params = validate_method("gptq", {"bits": 4, "act_bits": 8, "calibration": CAL})
    with pytest.MonkeyPatch.context() as monkeypatch:
        log = HessianLog(monkeypatch)
        result = quantize_calibrated(model, "gptq", params, SAMPLING, folder)
    return result, model, params, log


def direct_hessians(path, names):
    """2/n X^T X of each layer's raw inputs on the full-precision model, over the same
    calibration prompts, noise and steps."""
    from engine.quant.calibration_hessians import calibration_set, run_sampler

    model = load(path)
    modules = dict(model.denoiser.named_modules())
    inputs = {name: [] for name in names}
    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n in names]
    cal = calibration_set(model, CAL)
    run_sampler(model, cal.prompts, cal.noise, CAL, SAMPLING)
    for h in hooks:
        h.remove()
    out = {}
    for name, xs in inputs.items():
        x = torch.cat(xs).double()
        out[name] = 2 * x.T @ x / x.shape[0]
    return out


def test_hessians_equal_x_transpose_x_and_later_blocks_see_quantized_inputs(gptq_run, tiny_mmdit):
    _, _, _, log = gptq_run
    direct = direct_hessians(tiny_mmdit, [TO_Q.format(0), TO_Q.format(1)])
    first = log.hessians[TO_Q.format(0)].double()
    assert torch.allclose(first, direct[TO_Q.format(0)], rtol=1e-4, atol=1e-5 * first.abs().max().item())
    # 4 prompts x 3 steps x 2 (guidance) model calls, 64 image tokens each
    assert log.tokens[TO_Q.format(0)] == 4 * 3 * 2 * 64
    # block 1 was calibrated on the outputs of the quantized block 0, not the FP ones
    second, fp_second = log.hessians[TO_Q.format(1)].double(), direct[TO_Q.format(1)]
    change = (second - fp_second).norm() / fp_second.norm()
    assert 1e-4 < change < 0.5


def test_held_out_prompts_are_disjoint_from_calibration_prompts(tiny_mmdit):
    from engine.data.digits import prompt_for
    from engine.quant.calibration_hessians import calibration_set, run_sampler
    from engine.sampling import initial_noise

    model = load(tiny_mmdit)
    # Far more prompts than the 30 (digit, wording) pairs: drawn alike, they would repeat.
    cal = calibration_set(model, {**CAL, "samples": 64, "held_out": 32})
    assert not set(cal.prompts) & set(cal.held_out_prompts)
    evaluation = {prompt_for(d) for d in range(10)}  # what the evaluation samples
    assert set(cal.held_out_prompts) == evaluation and not set(cal.prompts) & evaluation
    for prompts in (cal.prompts, cal.held_out_prompts):  # every digit, equally often (up to one)
        counts = [sum(p.endswith((f" {w}", f" {d}")) for p in prompts) for d, w in
                  enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))]
        assert sum(counts) == len(prompts) and max(counts) - min(counts) <= 1
    # The text conditioning differs: no held-out prompt encodes to a calibration prompt's states.
    cond, held = model.encode(cal.prompts), model.encode(cal.held_out_prompts)
    states, pooled, held_states, held_pooled = cond.states, cond.pooled, held.states, held.pooled
    assert torch.cdist(held_pooled, pooled).min() > 1e-3
    assert torch.cdist(held_states.flatten(1), states.flatten(1)).min() > 1e-3
    # Noise: disjoint rows, and not the evaluation's noise even when the seeds are equal.
    assert torch.cdist(cal.held_out_noise.flatten(1), cal.noise.flatten(1)).min() > 1
    evaluation_noise = initial_noise(64, model.sample_shape, CAL["seed"])
    assert torch.cdist(cal.noise.flatten(1), evaluation_noise.flatten(1)).min() > 1

    # What a conditioning layer (block 0's adaLN: timestep and pooled prompt) sees on held-out
    # prompts is never a calibration input, except the unconditional half of guidance (the
    # empty prompt), which both sets and the evaluation share.
    cal = calibration_set(model, CAL)
    layer = dict(model.denoiser.named_modules())["transformer_blocks.0.norm1.linear"]

    def rows(prompts, noise):
        seen = []
        handle = layer.register_forward_pre_hook(lambda m, a: seen.extend(r.numpy().tobytes() for r in a[0]))
        try:
            run_sampler(model, prompts, noise, CAL, SAMPLING)
        finally:
            handle.remove()
        return seen

    calibration, held_out = set(rows(cal.prompts, cal.noise)), rows(cal.held_out_prompts, cal.held_out_noise)
    unconditional = set(rows([""] * 2, cal.noise[:2]))
    repeated = [r for r in held_out if r in calibration]
    assert repeated and set(repeated) <= unconditional
    assert len(repeated) == len(held_out) // 2  # the unconditional half exactly


def test_gptq_beats_rtn_on_nearly_every_layer(gptq_run):
    result, _, _, _ = gptq_run
    quantized = [l for l in result.layers if l["bits"] is not None]
    assert len(quantized) == 14 + 11  # the last block has no to_add_out nor ff_context
    assert all(l["name"].startswith("transformer_blocks.") for l in quantized)
    wins = sum(l["out_err"] <= json.loads(l["extra"])["rtn_out_err"] for l in quantized)
    assert wins >= 0.9 * len(quantized)
    kept = {l["name"]: json.loads(l["extra"])["reason"] for l in result.layers if l["bits"] is None}
    assert "embedder" in kept["context_embedder"] and "output" in kept["proj_out"]
    assert set(result.metrics) == {"calibration_s", "quantize_s", "calibration_bytes"}
    assert result.metrics["calibration_bytes"] == result.calibration_path.stat().st_size


def test_rtn_w4a8_errors_are_the_gptq_runs_reference(gptq_run, tiny_mmdit, tmp_path):
    """Same calibration: same activation scales and held-out inputs, so the RTN run's out_err
    is exactly the rtn_out_err that the GPTQ run compares itself with."""
    from engine.quant.gptq_method import quantize_calibrated

    gptq, _, _, _ = gptq_run
    params = validate_method("rtn", {"bits": 4, "scope": "blocks", "act_bits": 8, "calibration": CAL})
    rtn = quantize_calibrated(load(tiny_mmdit), "rtn", params, SAMPLING, tmp_path)
    assert [l["name"] for l in rtn.layers] == [l["name"] for l in gptq.layers]
    for a, b in zip(rtn.layers, gptq.layers):
        if b["bits"] is not None:
            assert a["out_err"] == pytest.approx(json.loads(b["extra"])["rtn_out_err"], rel=1e-9)


def test_requantize_from_the_saved_calibration_reproduces_the_codes(gptq_run, tiny_mmdit):
    from engine.quant.calibration_hessians import load_calibration
    from engine.quant.gptq_method import requantize

    result, model, _, _ = gptq_run
    meta, tensors = load_calibration(result.calibration_path)
    # the first block's inputs, the absmax values and the config: no per-layer statistics
    assert not [k for k in tensors if not k.startswith(("block_input.", "absmax."))]
    assert len([k for k in tensors if k.startswith("absmax.")]) == len(result.packed)
    assert meta["layers"] == list(result.packed) and len(meta["block_inputs"]) == 1 * 3  # batches x steps
    fresh = load(tiny_mmdit).denoiser
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    again = requantize(fresh, result.calibration_path)
    assert set(again) == set(result.packed)
    for name, r in again.items():
        stored = result.packed[name]
        assert torch.equal(r.codes, stored.codes) and torch.equal(r.scale, stored.scale), name
        assert torch.equal(r.zero, stored.zero), name
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())  # only read
    # the quantized model holds exactly the codes' weights
    from engine.quant.rtn import dequantize

    modules = dict(model.denoiser.named_modules())
    assert all(torch.equal(modules[name].weight, dequantize(q)) for name, q in result.packed.items())


class HeldOutMoments:
    """The former out_err: float64 sums of z z^T, z = [x, q(x) - x], per layer (the reference
    the direct computation is checked against; it holds [2 in, 2 in] per layer)."""

    def __init__(self, layers, quantizers):
        self.quantizers, self.sums = quantizers, {}
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in layers.items()]

    def _hook(self, name):
        def hook(module, args):
            x = args[0].detach().float().reshape(-1, module.in_features)
            q = self.quantizers.get(name)
            z = torch.cat([x, q(x) - x], dim=1) if q is not None else x
            g = (z.T @ z).double()
            self.sums[name] = self.sums[name] + g if name in self.sums else g
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def moment_output_error(moments, w, w_q):
    """||q(X) W_q^T - X W^T|| / ||X W^T|| = sqrt(tr(M G M^T) / tr(W G_xx W^T)), M = [W_q - W, W_q]."""
    w, w_q = w.double(), w_q.double()
    cols = w.shape[1]
    m = torch.cat([w_q - w, w_q], dim=1) if moments.shape[0] == 2 * cols else w_q - w
    return max((m @ moments * m).sum().item(), 0.0) ** 0.5 / (w @ moments[:cols, :cols] * w).sum().item() ** 0.5


def test_held_out_errors_equal_the_moment_formula():
    from engine.quant.act_quant import fake_quant_static, static_scale
    from engine.quant.held_out_error import HeldOutErrors

    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(12, 5)
    x = torch.randn(40, 12, generator=g) * 3
    scale = static_scale(x.abs().max().item(), 8)
    q = lambda v: fake_quant_static(v, scale, 8)
    w = layer.weight.detach()
    w_q = w + 0.01 * torch.randn(5, 12, generator=g)
    for quantizer in ({}, {"l": q}):
        moments = HeldOutMoments({"l": layer}, quantizer)
        errors = HeldOutErrors({"l": layer}, {"l": {"a": lambda _: w_q, "b": lambda w: 2 * w}}, quantizer)
        layer(x[:25]), layer(x[25:])
        moments.remove(), errors.remove()
        xq = q(x) if quantizer else x
        for label, weight in (("a", w_q), ("b", 2 * w)):
            direct = (xq.double() @ weight.double().T - x.double() @ w.double().T).norm() / (x.double() @ w.double().T).norm()
            assert errors.relative("l")[label] == pytest.approx(direct.item(), rel=1e-5)
            assert errors.relative("l")[label] == pytest.approx(moment_output_error(moments.sums["l"], w, weight), rel=1e-5)
        assert errors.tokens["l"] == 40


def test_run_out_err_equals_the_moment_formula_on_the_held_out_pass(gptq_run, tiny_mmdit):
    """The run's out_err / rtn_out_err (computed during its held-out pass) against the former
    moment formula on the full-precision model's held-out inputs."""
    from engine.quant.calibration_hessians import calibration_set, load_calibration, run_sampler
    from engine.quant.gptq import rtn_grouped
    from engine.quant.gptq_method import activation_quantizer
    from engine.quant.rtn import dequantize

    result, _, params, _ = gptq_run
    _, tensors = load_calibration(result.calibration_path)
    model = load(tiny_mmdit)
    modules = dict(model.denoiser.named_modules())
    layers = {name: modules[name] for name in result.packed}
    quantizers = {name: activation_quantizer(8, "static", tensors[f"absmax.{name}"].item()) for name in layers}
    moments = HeldOutMoments(layers, quantizers)
    cal = calibration_set(model, CAL)
    run_sampler(model, cal.held_out_prompts, cal.held_out_noise, CAL, SAMPLING)
    moments.remove()
    table = {l["name"]: l for l in result.layers}
    for name, layer in layers.items():
        w = layer.weight.detach()
        rtn = rtn_grouped(w, 4, params["symmetric"], params["group_size"]).dequantize()
        assert table[name]["out_err"] == pytest.approx(moment_output_error(moments.sums[name], w, dequantize(result.packed[name])), rel=1e-4)
        assert json.loads(table[name]["extra"])["rtn_out_err"] == pytest.approx(moment_output_error(moments.sums[name], w, rtn), rel=1e-4)


def test_activation_quantization_bounds_and_stored_scale():
    from engine.quant.act_quant import add_act_quant, fake_quant_dynamic, fake_quant_static, static_scale

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, generator=g)
    scale = static_scale(2.0, 8)
    q = fake_quant_static(x, scale, 8)
    inside = x.abs() <= 2.0
    assert ((q - x).abs()[inside] <= scale / 2 + 1e-7).all()
    assert torch.equal(q[~inside], x[~inside].sign() * 127 * scale)
    assert len(torch.unique(torch.round(q / scale))) <= 255
    d = fake_quant_dynamic(x, 8)
    row_scale = x.abs().amax(1, keepdim=True) / 127
    assert ((d - x).abs() <= row_scale / 2 + 1e-7).all()
    layer = nn.Linear(10, 3)
    before = layer(x)
    add_act_quant(layer, 8, "static", absmax=2.0)
    assert layer.state_dict()["act_scale"] == scale
    assert torch.allclose(layer(x), nn.functional.linear(q, layer.weight, layer.bias))
    assert not torch.equal(layer(x), before)
    with pytest.raises(ValueError, match="already"):
        add_act_quant(layer, 8, "dynamic")


def test_grouped_codes_round_trip_exactly(tmp_path):
    from engine.quant.gptq import GPTQ
    from engine.quant.gptq_blocks import packed_form
    from engine.quant.packing import load_packed, save_packed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 8), nn.Linear(8, 4))
    g = GPTQ(model[0], "0")
    g.add_batch(torch.randn(200, 32))
    for symmetric in (True, False):
        result = g.quantize(4, symmetric=symmetric, group_size=8, act_order=True)
        with torch.no_grad():
            model[0].weight.copy_(result.weight)
            model[0].bias.copy_(model[0].bias.half().float())
        path = tmp_path / f"w{symmetric}.safetensors"
        save_packed(path, model, {"0": packed_form(result)})
        loaded = load_packed(path)
        assert torch.equal(loaded["0.weight"], result.weight)
        assert torch.equal(loaded["1.weight"], model[1].weight)


def test_a_failing_layer_restores_the_model_and_writes_nothing(tiny_mmdit, tmp_path, monkeypatch):
    from engine.quant import gptq as gptq_module
    from engine.quant.act_quant import act_quant_of
    from engine.quant.gptq_method import quantize_calibrated

    model = load(tiny_mmdit)
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    original = gptq_module.GPTQ.quantize

    def fail_in_block_1(self, **kwargs):
        if self.name.startswith("transformer_blocks.1."):
            self.H.fill_(-1.0)  # not positive definite, whatever the damping
        return original(self, **kwargs)

    monkeypatch.setattr(gptq_module.GPTQ, "quantize", fail_in_block_1)
    params = validate_method("gptq", {"bits": 4, "act_bits": 8, "calibration": CAL})
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.norm1\.linear is not positive definite.*larger damp"):
        quantize_calibrated(model, "gptq", params, SAMPLING, tmp_path)
    assert list(tmp_path.iterdir()) == []
    after = model.denoiser.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(act_quant_of(m) for m in model.denoiser.modules())


@pytest.mark.parametrize(
    "variant, key, message",
    [
        ('method = "gptq"\nbits = 9', "bits", "between 2 and 8"),
        ('method = "gptq"\nbits = 4\ndamp = 0', "damp", "must be a number > 0"),
        ('method = "gptq"\nbits = 4\ngroup_size = 12', "group_size", "does not divide the input width 16"),
        ('method = "gptq"\nbits = 4\ncalibration = { samples = 0 }', "calibration.samples", "empty calibration set"),
        ('method = "gptq"\nbits = 4\nact_bits = 4', "act_bits", "must be 8"),
        ('method = "rtn"\nbits = 4\nact_mode = "sometimes"', "act_mode", "static, dynamic"),
        ('method = "gptq"\nbits = 4\nkeep_calibration = 0', "keep_calibration", "must be true or false"),
        ('method = "rtn"\nbits = 4\nkeep_calibration = false', "keep_calibration", "calibrated RTN only"),
    ],
)
def test_bad_gptq_keys_are_located_errors(tmp_path, tiny_mmdit, tiny_models, variant, key, message):
    path = tmp_path / "experiments.toml"
    path.write_text(f'[experiments.e]\nmodel = "{tiny_mmdit}"\nfeature_model = "{tiny_models["classifier"]}"\n\n'
                    f"[experiments.e.variants.v]\n{variant}\n")
    with pytest.raises(ConfigError) as info:
        load_catalogue(path)
    err = info.value
    assert err.key == f"experiments.e.variants.v.{key}" and message in err.message
    assert err.file == str(path)
    assert path.read_text().splitlines()[err.line - 1].startswith(key.split(".")[0])


def test_gptq_needs_a_transformer(tmp_path, tiny_models):
    path = tmp_path / "experiments.toml"
    path.write_text(f'[experiments.e]\nmodel = "{tiny_models["model"]}"\nfeature_model = "{tiny_models["classifier"]}"\n\n'
                    '[experiments.e.variants.v]\nmethod = "gptq"\nbits = 4\n')
    with pytest.raises(ConfigError, match="needs a transformer denoiser"):
        load_catalogue(path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_mmdit, tiny_models):
    root = tmp_path_factory.mktemp("e2e-gptq")
    toml = root / "experiments.toml"
    toml.write_text(GPTQ_TOML.format(model=tiny_mmdit, classifier=tiny_models["classifier"]))
    result = engine("run", "tiny-gptq", "--experiments", str(toml), "--runs-dir", str(root / "runs"))
    return result, Store.open(root / "runs")


def test_engine_run_records_gptq_and_rtn_with_int8_activations(finished):
    result, store = finished
    assert result.returncode == 0, result.stdout + result.stderr
    runs = {r["variant"]: r for r in store.runs()}
    assert set(runs) == {"rtn-w4a8", "gptq-w2a8"} and all(r["status"] == "done" for r in runs.values())
    layers = {v: {l["name"]: l for l in store.layers(r["id"])} for v, r in runs.items()}
    for variant, run in runs.items():
        metrics = store.metrics(run["id"])
        assert {"calibration_s", "quantize_s", "fid", "prompt_acc", "size_ratio"} <= set(metrics)
        assert metrics["size_ratio"] < 0.5
        kinds = {a["kind"] for a in store.artifacts(run["id"])}
        assert {"checkpoint", "calibration"} <= kinds
        assert layers[variant][TO_Q.format(0)]["out_err"] > 0
    gptq = [l for l in layers["gptq-w2a8"].values() if l["bits"] is not None]
    assert sum(l["out_err"] <= json.loads(l["extra"])["rtn_out_err"] for l in gptq) >= 0.9 * len(gptq)
    assert "W2A8 g8" in result.stdout


def test_images_come_from_the_stored_gptq_checkpoint(finished, tiny_mmdit):
    from engine.data.digits import eval_labels, prompt_for
    from engine.grids import load_samples, to_uint8
    from engine.methods import load_quantized
    from engine.quant import load_packed
    from engine.sampling import initial_noise, sample_images

    _, store = finished
    run = [r for r in store.runs() if r["variant"] == "gptq-w2a8"][0]
    config = json.loads(run["config"])
    folder = store.runs_dir / run["folder"]
    stored, _ = load_samples(folder / "samples.safetensors")
    model = load(tiny_mmdit)
    prompts = [prompt_for(l) for l in eval_labels(10)]
    noise = initial_noise(10, model.sample_shape, config["sampling"]["seed"])
    args = (prompts, noise, config["sampling"]["steps"], config["sampling"]["guidance"], 10)
    full_precision = to_uint8(sample_images(model, *args)).astype(int)
    load_quantized(model.denoiser, "gptq", config["params"], load_packed(folder / "weights.safetensors"))
    quantized = to_uint8(sample_images(model, *args)).astype(int)
    assert np.abs(quantized - stored.astype(int)).max() <= 1
    assert np.abs(full_precision - stored.astype(int)).max() > 1


def test_the_shipped_experiment_compares_four_variants_on_the_shipped_mmdit():
    """The catalogue's gptq-w4a8 entry, checked variant by variant against the shipped model
    (the whole catalogue needs every shipped model, which test_config covers)."""
    import tomllib

    from engine.methods import check_against_model
    from engine.models.layer_shapes import read_model_tensors
    from engine.models.registry import SHIPPED_DIR
    from tests.conftest import REPO

    exp = tomllib.loads((REPO / "experiments.toml").read_text())["experiments"]["gptq-w4a8"]
    assert exp["model"] == "digits-mmdit" and exp["samples"] >= 1000
    tensors = read_model_tensors(SHIPPED_DIR / "digits-mmdit")
    params = {}
    for name, raw in exp["variants"].items():
        keys = {k: v for k, v in raw.items() if k not in ("description", "method")}
        params[name] = validate_method(raw["method"], keys)
        check_against_model(raw["method"], params[name], lambda: tensors)
    assert set(params) == {"fp", "rtn-w4a8", "gptq-w4a8", "gptq-w4a16"}
    assert params["gptq-w4a8"]["act_bits"] == 8 and params["gptq-w4a16"]["act_bits"] == 16
    assert params["rtn-w4a8"]["calibration"] == params["gptq-w4a8"]["calibration"]
    training = json.loads((SHIPPED_DIR / "digits-mmdit" / "training.json").read_text())
    assert training["train_config"]["seed"] == 0


def mmdit_block_inputs(layers: int):
    """A random SD3Transformer2DModel with `layers` blocks and its first block's inputs over
    3 calls (as the calibration pass records them)."""
    from diffusers import SD3Transformer2DModel

    from engine.quant.calibration_hessians import BlockInputs

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=8).eval()
    inputs, handle = BlockInputs.record(model.transformer_blocks[0])
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16), torch.randn(2, 8), torch.rand(2) * 1000)
    handle.remove()
    return model, inputs


@pytest.mark.parametrize("act_bits", [16, 8])
def test_gptq_holds_one_block_at_a_time_whatever_the_depth(monkeypatch, act_bits):
    """Structural memory bound: GPTQ collectors (each holding a Hessian) of one block only are
    alive at any time, as many at most for 2 as for 8 blocks; one quantized block copy at a
    time; nothing but codes is returned, and the model's weights are only read."""
    from types import SimpleNamespace
    import copy
    import weakref

    from engine.quant import gptq_blocks
    from engine.quant.act_quant import act_quant_of
    from engine.quant.gptq_blocks import LayerQuant, gptq_block_by_block
    from engine.quant.gptq_method import act_installer, targets_of
    from engine.quant.rtn import QuantizedTensor

    log = HessianLog(monkeypatch)
    copies, copies_alive = weakref.WeakSet(), []

    def tracked_deepcopy(block):
        duplicate = copy.deepcopy(block)
        copies.add(duplicate)
        copies_alive.append(len(copies))
        return duplicate

    monkeypatch.setattr(gptq_blocks, "copy", SimpleNamespace(deepcopy=tracked_deepcopy))
    params = validate_method("gptq", {"bits": 4, "act_bits": act_bits})
    peak = {}
    for depth in (2, 8):
        model, inputs = mmdit_block_inputs(depth)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        targets = targets_of(model, "gptq", params)
        absmax = {t.name: 4.0 for t in targets}
        log.max_alive, log.alive_per_block = 0, {}
        quants = gptq_block_by_block(model.transformer_blocks, targets, inputs.calls, params,
                                     act_installer(act_bits, "static", absmax))
        peak[depth] = log.max_alive
        assert all(blocks == {int(name.split(".")[1])} for name, blocks in log.alive_per_block.items())
        assert len(log.alive_per_block) == len(targets) and len(log.alive) == 0 and len(copies) == 0
        assert max(copies_alive) == 1
        assert set(quants) == {t.name for t in targets}
        assert all(type(q) is LayerQuant and type(q.packed) is QuantizedTensor for q in quants.values())
        after = model.state_dict()
        assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
        assert not any(act_quant_of(m) for m in model.modules())
    assert peak[2] == peak[8] == 14  # the Linear layers of one (not last) block


def test_calibrated_rtn_on_a_unet_pipeline(tiny_sd, tmp_path):
    """Calibrated RTN with scope "all" (every conv and Linear) on a Stable Diffusion UNet:
    no transformer blocks, errors measured layer by layer during the held-out pass."""
    from engine.quant.act_quant import act_quant_of
    from engine.quant.calibration_hessians import calibration_set, load_calibration, run_sampler
    from engine.quant.gptq_method import activation_quantizer, quantize_calibrated
    from engine.quant.rtn import dequantize
    from tests.tiny_pipelines import PROMPTS

    model = load(tiny_sd)
    sampling = {**SAMPLING, "prompts": PROMPTS}
    cal = {"samples": 2, "held_out": 2, "steps": 2, "seed": 1}
    params = validate_method("rtn", {"bits": 4, "act_bits": 8, "calibration": cal})
    result = quantize_calibrated(model, "rtn", params, sampling, tmp_path)
    modules = dict(model.denoiser.named_modules())
    table = {l["name"]: l for l in result.layers}
    convs = [n for n in result.packed if isinstance(modules[n], nn.Conv2d)]
    linears = [n for n in result.packed if isinstance(modules[n], nn.Linear)]
    assert convs and linears and all(table[n]["out_err"] is None for n in convs)
    assert all(0 < table[n]["out_err"] < 1 for n in linears)
    assert all(torch.equal(modules[n].weight, dequantize(q).to(modules[n].weight.dtype)) for n, q in result.packed.items())
    assert all(act_quant_of(modules[n]) for n in linears) and not any(act_quant_of(modules[n]) for n in convs)
    meta, tensors = load_calibration(result.calibration_path)  # the config and absmax only
    assert set(tensors) == {f"absmax.{n}" for n in linears} and meta["method"] == "rtn"
    # against the former moment formula on the full-precision model's held-out inputs
    fp = load(tiny_sd)
    fp_modules = dict(fp.denoiser.named_modules())
    some = linears[:4]
    moments = HeldOutMoments({n: fp_modules[n] for n in some},
                             {n: activation_quantizer(8, "static", tensors[f"absmax.{n}"].item()) for n in some})
    split = calibration_set(fp, cal, PROMPTS)
    run_sampler(fp, split.held_out_prompts, split.held_out_noise, cal, sampling)
    moments.remove()
    for n in some:
        reference = moment_output_error(moments.sums[n], fp_modules[n].weight.detach(), dequantize(result.packed[n]))
        assert table[n]["out_err"] == pytest.approx(reference, rel=1e-4)


def test_keep_calibration_false_writes_no_file(tiny_mmdit, tmp_path):
    from engine.quant.gptq_method import quantize_calibrated

    params = validate_method("gptq", {"bits": 4, "keep_calibration": False, "calibration": CAL})
    assert params["keep_calibration"] is False
    assert "keep_calibration" not in validate_method("gptq", {"bits": 4, "keep_calibration": True})
    result = quantize_calibrated(load(tiny_mmdit), "gptq", params, SAMPLING, tmp_path)
    assert result.calibration_path is None and result.metrics["calibration_bytes"] == 0
    assert list(tmp_path.iterdir()) == [] and len(result.packed) == 25
