"""Methods `dgq` and `minmax`: activation groups, the log2 attention quantizer, the start-token
column, per-prompt deltas, bad keys, the stored checkpoint, and `engine run` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.config import load_catalogue
from engine.errors import ConfigError
from engine.methods import validate_method
from engine.quant.dgq.attention import QuantSoftmaxAttnProcessor, SoftmaxSettings, quantize_rows
from engine.quant.dgq.groups import IndexStats, fake_quant_groups, plan_groups
from engine.quant.dgq.log_quant import PERCENTILES, choose_delta, fake_quant, log2_fake_quant, uniform_fake_quant
from engine.quant.dgq.softmax_stats import row_maxima
from engine.store import Store
from tests.conftest import engine


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _softmax_like(rows: int, keys: int, seed: int, sharpness: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, keys, generator=g) * sharpness, dim=-1)


def _own_group(labels: torch.Tensor, index: int) -> bool:
    return int((labels == labels[index]).sum()) == 1


# ------------------------------------------------------------------ activation groups

def test_channel_outliers_choose_the_channel_axis_and_get_their_own_groups():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, 8, 8, generator=g)  # a conv input [B, C, H, W]
    x[:, 3] *= 40.0
    x[:, 17] = x[:, 17] * 15.0 + 30.0
    stats = IndexStats()
    stats.update(x[:2])
    stats.update(x[2:])
    plan = plan_groups(stats, k=8, bits=6)
    assert plan.axis == "channel" and plan.labels.shape == (32,) and plan.groups == 8
    assert plan.spreads["channel"] > plan.spreads["position"]
    assert _own_group(plan.labels, 3) and _own_group(plan.labels, 17)
    # each group's grid covers its members' calibrated range: no clipping on the calibration data
    q = fake_quant_groups(x, 0, plan.labels, plan.scale, plan.zero, 6)
    step = plan.scale[plan.labels].view(1, -1, 1, 1)
    assert ((q - x).abs() <= step / 2 + 1e-5).all()
    # the grouped error is far below the per-tensor one on the ordinary channels
    one = plan_groups(stats, k=1, bits=6)
    assert one.axis == "tensor" and one.groups == 1
    q1 = fake_quant_groups(x, 2, one.labels, one.scale, one.zero, 6)
    normal = [c for c in range(32) if c not in (3, 17)]
    assert (q - x)[:, normal].pow(2).mean() < 0.05 * (q1 - x)[:, normal].pow(2).mean()


@pytest.mark.parametrize("shape", [(4, 64, 16), (4, 16, 8, 8)])
def test_position_outliers_choose_the_position_axis_and_get_their_own_groups(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g)
    outliers = (5, 40)
    if len(shape) == 3:  # tokens [B, N, C]
        x[:, 5] *= 40.0
        x[:, 40] = x[:, 40] * 10.0 - 25.0
    else:  # conv input: pixels (0, 5) and (5, 0) are positions 5 and 40 of the 8 x 8 grid
        x[:, :, 0, 5] *= 40.0
        x[:, :, 5, 0] = x[:, :, 5, 0] * 10.0 - 25.0
    stats = IndexStats()
    stats.update(x)
    plan = plan_groups(stats, k=8, bits=6)
    assert plan.axis == "position" and plan.labels.shape == (64,)
    assert all(_own_group(plan.labels, i) for i in outliers)


def test_groups_larger_than_every_axis_are_refused():
    stats = IndexStats()
    stats.update(torch.randn(2, 8, 4))  # 8 tokens, 4 channels
    assert plan_groups(stats, k=8, bits=6).axis == "position"
    with pytest.raises(ValueError, match=r"9 groups exceed every axis of its input \(4 channels, 8 positions\)"):
        plan_groups(stats, k=9, bits=6, name="layer")


# ------------------------------------------------------------------ attention quantizers

@pytest.mark.parametrize("bits", [4, 6, 8])
def test_log2_quantizer_round_trip_and_bounds(bits):
    delta = torch.tensor(0.8)
    # every level is a fixed point (float32 holds them down to 2^-126: 8-bit codes past ~125
    # are below its normal range, so the round trip is checked on the first 120)
    levels = delta * 2.0 ** -torch.arange(min(2**bits, 120), dtype=torch.float32)
    assert torch.equal(log2_fake_quant(levels, delta, bits), levels)
    x = _softmax_like(500, 77, seed=bits)
    q = log2_fake_quant(x, delta, bits)
    reference = (delta.double() * 2.0 ** -torch.round(-torch.log2(x.double() / delta.double())).clamp(0, 2**bits - 1))
    assert torch.equal(q, reference.float())
    assert torch.equal(log2_fake_quant(q, delta, bits), q)  # idempotent
    inside = (x >= delta * 2.0 ** -(2**bits - 1)) & (x <= delta)
    ratio = q[inside] / x[inside]
    assert ratio.max() <= 2**0.5 + 1e-6 and ratio.min() >= 2**-0.5 - 1e-6  # within half a level in log2
    assert (q[x > delta] == delta).all()


def test_log2_keeps_small_probabilities_that_uniform_rounds_to_zero():
    x = _softmax_like(2000, 77, seed=0)
    for bits in (4, 6):
        d_log, d_uni = torch.tensor(choose_delta(x, bits, True)), torch.tensor(choose_delta(x, bits, False))
        q_log, q_uni = fake_quant(x, d_log, bits, True), fake_quant(x, d_uni, bits, False)
        small = (x < d_uni / (2**bits - 1) / 2) & (x >= d_log * 2.0 ** -(2**bits - 1))
        assert small.float().mean() > 0.3  # softmax-like: most probabilities are below half a uniform step
        assert (q_uni[small] == 0).all()  # uniform: relative error 1
        rel_log = ((q_log - x).abs() / x)[small]
        assert rel_log.max() <= 2**0.5 - 1 + 1e-6
    # the price: on the few large probabilities, log2's steps are a factor sqrt(2) wide, so its
    # total squared error is larger than uniform's at 8 bits (the ablation measures which wins)
    d8 = torch.tensor(choose_delta(x, 8, True))
    assert (fake_quant(x, d8, 8, True) - x).pow(2).sum() > (uniform_fake_quant(x, x.min(), x.max(), 8) - x).pow(2).sum()


def test_choose_delta_picks_the_least_squared_error_percentile():
    x = _softmax_like(300, 20, seed=3)
    best = choose_delta(x, 4, True)
    errors = {float(d): (fake_quant(x, d, 4, True) - x).pow(2).sum().item()
              for d in torch.quantile(x.double().reshape(-1), torch.tensor(PERCENTILES, dtype=torch.float64)).float()}
    assert errors[best] == min(errors.values())


def _probs(batch: int, heads: int, nq: int, nk: int, seed: int) -> torch.Tensor:
    return _softmax_like(batch * heads * nq, nk, seed).view(batch, heads, nq, nk)


@pytest.mark.parametrize("log", [True, False])
def test_start_token_column_is_unchanged_bit_for_bit(log):
    probs = _probs(3, 2, 16, 8, seed=4).view(6, 16, 8)  # [prompts x heads, queries, keys]
    settings = SoftmaxSettings(bits=4, log=log, start_fp=True, prompt_scaling=True)
    delta, lo = torch.tensor(0.5), torch.tensor(0.0)
    q = quantize_rows(probs, settings, cross=True, delta=delta, lo=lo)
    assert torch.equal(q[..., 0], probs[..., 0])
    assert not torch.equal(q[..., 1:], probs[..., 1:])
    # self-attention has no start token; and without start_fp the column is quantized too
    assert not torch.equal(quantize_rows(probs, settings, cross=False, delta=delta, lo=lo)[..., 0], probs[..., 0])
    off = SoftmaxSettings(bits=4, log=log, start_fp=False, prompt_scaling=True)
    assert not torch.equal(quantize_rows(probs, off, cross=True, delta=delta, lo=lo)[..., 0], probs[..., 0])


def _cross_attention():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()


def test_per_prompt_deltas_differ_within_a_batch_and_each_prompt_is_quantized_alone():
    attn = _cross_attention()
    attn.register_buffer("softmax_delta", torch.tensor(1.0))
    attn.register_buffer("softmax_lo", torch.tensor(0.0))
    proc = QuantSoftmaxAttnProcessor("attn", SoftmaxSettings(bits=4, log=True, start_fp=True, prompt_scaling=True))
    proc.active = True
    attn.set_processor(proc)
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 10, 16, generator=g)
    states = torch.randn(4, 6, 8, generator=g) * torch.tensor([0.3, 1.0, 3.0, 6.0]).view(4, 1, 1)
    seen = []
    original = proc.row_deltas

    def spy(maxima, heads):
        deltas = original(maxima, heads)
        if deltas.shape[0] == 8:  # the batch of 4 prompts x 2 heads
            seen.append(deltas.view(4, 2))
        return deltas

    proc.row_deltas = spy
    with torch.no_grad():
        batch = attn(hidden, encoder_hidden_states=states)
        alone = torch.cat([attn(hidden[i : i + 1], encoder_hidden_states=states[i : i + 1]) for i in range(4)])
    assert (seen[0][:, 0] == seen[0][:, 1]).all()  # one delta per prompt, shared by its heads
    deltas = seen[0][:, 0]
    assert len(set(deltas.tolist())) == 4 and deltas.max() > 1.5 * deltas.min()
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)
    # a delta shared by the batch (the largest prompt's) quantizes the other prompts differently
    p4 = _probs(2, 2, 10, 6, seed=6)
    p4[1] = p4[1] ** 3 / (p4[1] ** 3).sum(-1, keepdim=True)
    probs = p4.view(4, 10, 6)
    per_prompt = quantize_rows(probs, proc.settings, True, proc.row_deltas(row_maxima(probs, True), 2), torch.tensor(0.0))
    shared = quantize_rows(probs, proc.settings, True, row_maxima(probs, True).max(), torch.tensor(0.0))
    assert not torch.equal(per_prompt, shared)


# ------------------------------------------------------------------ keys

def _catalogue(tmp_path, model, classifier, variant: str):
    path = tmp_path / "experiments.toml"
    path.write_text(f'[experiments.e]\nmodel = "{model}"\nfeature_model = "{classifier}"\n\n'
                    f"[experiments.e.variants.v]\n{variant}\n")
    return path


@pytest.mark.parametrize(
    "variant, key, message",
    [
        ('method = "dgq"\nbits = 9\nact_bits = 6', "bits", "between 2 and 8"),
        ('method = "dgq"\nbits = 8\nact_bits = 3', "act_bits", "between 4 and 8"),
        ('method = "dgq"\nbits = 8\nact_bits = 6\nattn_bits = 12', "attn_bits", "between 4 and 8"),
        ('method = "minmax"\nbits = 8\nact_bits = 9', "act_bits", "between 4 and 8"),
        ('method = "dgq"\nbits = 8\nact_bits = 6\ngroups = 0', "groups", "integer >= 1"),
        ('method = "dgq"\nbits = 8\nact_bits = 6\ngroups = 16', "groups",
         "16 groups exceed the 8 input channels of layer time_embedding.linear_1"),
        ('method = "dgq"\nbits = 8\nact_bits = 6\nlog_quant = "yes"', "log_quant", "true or false"),
        ('method = "dgq"\nbits = 8\nact_bits = 6\ncalibration = { samples = 0 }', "calibration.samples",
         "empty calibration set"),
        ('method = "minmax"\nbits = 8\nact_bits = 6\ngroups = 4', "groups", "unknown key for method 'minmax'"),
    ],
)
def test_bad_dgq_keys_are_located_errors(tmp_path, tiny_models, variant, key, message):
    path = _catalogue(tmp_path, tiny_models["model"], tiny_models["classifier"], variant)
    with pytest.raises(ConfigError) as info:
        load_catalogue(path)
    err = info.value
    assert err.key == f"experiments.e.variants.v.{key}" and message in err.message
    assert err.file == str(path)
    assert path.read_text().splitlines()[err.line - 1].startswith(key.split(".")[0])


def test_keys_normalize_with_defaults():
    params = validate_method("dgq", {"bits": 4, "act_bits": 6})
    assert params == {"bits": 4, "symmetric": True, "act_bits": 6, "attn_bits": 6, "groups": 16,
                      "log_quant": True, "start_token_fp": True, "prompt_scaling": True,
                      "calibration": {"samples": 32, "seed": 1, "steps": 20}}
    from engine.methods import describe_bits

    assert describe_bits("dgq", {**params, "groups": 1, "log_quant": False}) == "W4A6 g1 -log"
    assert describe_bits("minmax", validate_method("minmax", {"bits": 8, "act_bits": 8})) == "W8A8 min-max"


# ------------------------------------------------------------------ end to end

DGQ_TOML = """
[experiments.tiny-dgq]
model = "{model}"
feature_model = "{classifier}"
samples = 10
steps = 3
guidance = 2.0
batch_size = 10
bootstrap = 5

[experiments.tiny-dgq.variants.minmax-w8a6]
method = "minmax"
bits = 8
act_bits = 6
calibration = {{ samples = 4, steps = 3 }}

[experiments.tiny-dgq.variants.dgq-w4a6]
method = "dgq"
bits = 4
act_bits = 6
groups = 4
calibration = {{ samples = 4, steps = 3 }}
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("e2e-dgq")
    toml = root / "experiments.toml"
    toml.write_text(DGQ_TOML.format(model=tiny_models["model"], classifier=tiny_models["classifier"]))
    result = engine("run", "tiny-dgq", "--experiments", str(toml), "--runs-dir", str(root / "runs"))
    return result, Store.open(root / "runs")


def test_engine_run_records_dgq_and_minmax_with_layer_rows(finished):
    result, store = finished
    assert result.returncode == 0, result.stdout + result.stderr
    runs = {r["variant"]: r for r in store.runs()}
    assert set(runs) == {"minmax-w8a6", "dgq-w4a6"} and all(r["status"] == "done" for r in runs.values())
    for variant, run in runs.items():
        metrics = store.metrics(run["id"])
        assert {"calibration_s", "quantize_s", "fid", "prompt_acc", "size_ratio"} <= set(metrics)
        layers = store.layers(run["id"])
        weights = [l for l in layers if l["role"] in ("conv", "linear", "attention")]
        softmax = [l for l in layers if l["role"] == "softmax"]
        assert weights and all(json.loads(l["extra"])["act_bits"] == 6 for l in weights)
        assert len(softmax) == 2 * sum(1 for l in layers if l["name"].endswith("attn1.to_q"))
        for row in softmax:
            extra = json.loads(row["extra"])
            assert row["bits"] == 6 and row["params"] == 0 and 0 < extra["delta"] <= 1
            if extra["cross"]:
                assert 0 < row["start_share"] < 1 and extra["start_share"] == row["start_share"]
            else:
                assert row["start_share"] is None
        groups = {json.loads(l["extra"])["act_groups"] for l in weights}
        axes = {json.loads(l["extra"])["act_axis"] for l in weights}
        if variant == "minmax-w8a6":
            assert groups == {1} and axes == {"tensor"}
            assert all(json.loads(r["extra"])["quantizer"] == "uniform min-max" for r in softmax)
        else:
            assert max(groups) == 4 and axes <= {"channel", "position"} and len(axes) == 2
            assert all(json.loads(r["extra"])["quantizer"] == "log2" for r in softmax)
    assert "W4A6 g4" in result.stdout and "W8A6 min-max" in result.stdout


def test_images_come_from_the_stored_dgq_checkpoint(finished, tiny_models):
    from engine.data.digits import eval_labels, prompt_for
    from engine.grids import load_samples, to_uint8
    from engine.models.loader import load_text_to_image
    from engine.quant import load_packed
    from engine.methods import load_quantized
    from engine.sampling import initial_noise, sample_images

    _, store = finished
    run = [r for r in store.runs() if r["variant"] == "dgq-w4a6"][0]
    config = json.loads(run["config"])
    folder = store.runs_dir / run["folder"]
    stored, _ = load_samples(folder / "samples.safetensors")
    model = load_text_to_image(tiny_models["model"])
    prompts = [prompt_for(label) for label in eval_labels(10)]
    noise = initial_noise(10, model.sample_shape, config["sampling"]["seed"])
    args = (prompts, noise, config["sampling"]["steps"], config["sampling"]["guidance"], 10)
    full_precision = to_uint8(sample_images(model, *args)).astype(int)
    state = load_packed(folder / "weights.safetensors")
    assert {"conv_in.dgq_scale", "conv_in.dgq_group"} <= set(state)
    load_quantized(model.denoiser, "dgq", config["params"], state)
    quantized = to_uint8(sample_images(model, *args)).astype(int)
    assert np.abs(quantized - stored.astype(int)).max() <= 1
    assert np.abs(full_precision - stored.astype(int)).max() > 1


def _sd_style_unet():
    """A tiny UNet2DConditionModel with Stable Diffusion 1.x's block types and a CLIP-like
    77-token context (the bring-your-own SD pipeline's denoiser, random weights)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8,
    ).eval()


@pytest.mark.parametrize("method", ["dgq", "minmax"])
def test_dgq_applies_unchanged_to_a_stable_diffusion_unet(method, tmp_path):
    from engine.quant.checkpoint import store_and_reload
    from engine.quant.dgq.calibration import DGQSettings, quantize_denoiser

    unet = _sd_style_unet()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    states = torch.randn(4, 77, 24, generator=g)
    states[:, 0] = 4 * states[0, 0]  # every prompt starts with the same start-of-text state
    with torch.no_grad():
        reference = unet(latents, 10, states).sample
        keys = {"bits": 8, "act_bits": 8, **({"groups": 8} if method == "dgq" else {})}
        settings = DGQSettings.from_params(validate_method(method, keys), minmax=method == "minmax")
        result = quantize_denoiser(unet, settings, lambda: [unet(latents, t, states) for t in (900, 500, 10)])
        quantized = unet(latents, 10, states).sample
        store_and_reload(unet, result.packed, result.half, tmp_path / "weights.safetensors")
        reloaded = unet(latents, 10, states).sample
    assert torch.equal(reloaded, quantized)
    error = ((quantized - reference).norm() / reference.norm()).item()
    assert 0 < error < 0.2
    softmax = [row for row in result.layers if row["role"] == "softmax"]
    names = {row["name"] for row in softmax}
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.softmax" in names and len(names) == 2 * 4  # down 1, mid 1, up 2
    cross = [json.loads(row["extra"]) for row in softmax if json.loads(row["extra"])["cross"]]
    assert len(cross) == 4 and all(0 < c["start_share"] < 1 and c["start_token_fp"] == (method == "dgq") for c in cross)
    k_rows = [json.loads(r["extra"]) for r in result.layers if r["name"].endswith("attn2.to_k")]
    assert all(e["act_groups"] == (8 if method == "dgq" else 1) for e in k_rows)


SD_VARIANTS = """
[experiments.sd.variants.dgq]
method = "dgq"
bits = 8
act_bits = 8
groups = 8
calibration = {{ samples = 3, seed = 1, steps = 2 }}

[experiments.sd.variants.minmax]
method = "minmax"
bits = 8
act_bits = 8
calibration = {{ samples = 3, seed = 1, steps = 2 }}
"""


def test_dgq_and_minmax_on_the_tiny_stable_diffusion_pipeline(tmp_path, tiny_sd, sd_evaluation):
    """The run's quantize stage (pack, store, load back) through the SD adapter, then sampling
    from the stored model: the same code as on the digits UNet, nothing SD-specific."""
    from tests.test_real_pipelines import SD_TOML, quantize_and_sample, write

    toml = write(tmp_path, SD_TOML + SD_VARIANTS, tiny_sd)
    fp_images = quantize_and_sample(tmp_path, toml, "sd", "fp")[2]
    for variant in ("dgq", "minmax"):
        layers, metrics, images = quantize_and_sample(tmp_path, toml, "sd", variant)
        softmax = [json.loads(l["extra"]) for l in layers if l["role"] == "softmax"]
        assert len(softmax) == 8 and sum(s["cross"] for s in softmax) == 4  # down 1, mid 1, up 2 blocks
        assert all(0 < s["start_share"] < 1 for s in softmax if s["cross"])
        acts = [json.loads(l["extra"]) for l in layers if l["role"] != "softmax"]
        assert {a["act_groups"] for a in acts} == ({1} if variant == "minmax" else {8})
        # W8 codes are 1/4 of FP32; the quantizers' buffers weigh more in so tiny a model
        assert metrics["size_ratio"] < 0.4 and metrics["calibration_s"] > 0
        assert torch.isfinite(images).all() and not torch.equal(images, fp_images)
        assert (images - fp_images).abs().mean() < 0.2


@pytest.fixture
def sd_evaluation(inception_home, tiny_clip_dir, tmp_path_factory):
    """The evaluation keys the SD test catalogues need (tests/test_real_pipelines.py)."""
    from tests.test_real_pipelines import EVALUATION, evaluation_toml

    EVALUATION["keys"] = evaluation_toml(inception_home, tiny_clip_dir, tmp_path_factory.mktemp("reference"))
    yield
    EVALUATION.clear()
