"""Method `fisher` (the LAQFI study): calibration, Fisher information, Fisher-weighted error,
measured sensitivity, the five allocation strategies, bad input, and `engine run` end to end."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest

from engine.quant import allocation
from engine.quant.fisher import spearman
from tests.conftest import engine


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loaded(tiny_models):
    import torch

    from engine.calibration import calibration_for
    from engine.models.loader import load_text_to_image

    model = load_text_to_image(tiny_models["model"], torch.device("cpu"))
    return model, calibration_for(model, 6, seed=3)


def _layers(model):
    from engine.quant import quantizable_layers

    return quantizable_layers(model.denoiser)


# --- calibration ------------------------------------------------------------------------


def test_calibration_is_seeded_covers_the_schedule_and_targets_the_true_noise(loaded):
    from diffusers import DDPMScheduler

    from engine.calibration import calibration_for, digits_source

    model, calib = loaded
    images, prompts = digits_source()
    again = calibration_for(model, 6, seed=3)
    assert again.prompts == calib.prompts and again.noisy.equal(calib.noisy)
    assert not calibration_for(model, 6, seed=4).noisy.equal(calib.noisy)
    # one timestep in each sixth of the schedule [0, 1000)
    for k, t in enumerate(sorted(calib.timesteps.tolist())):
        assert math.floor(k * 1000 / 6) <= t <= (k + 1) * 1000 / 6
    # x_t is the true noise added to the chosen digit, and the target is that noise
    alphas = DDPMScheduler.from_config(model.scheduler_config).alphas_cumprod[calib.timesteps].view(-1, 1, 1, 1)
    x0 = images[calib.indices]
    assert (alphas.sqrt() * x0 + (1 - alphas).sqrt() * calib.target - calib.noisy).abs().max() < 1e-5
    assert not calib.flow
    for prompt, index in zip(calib.prompts, calib.indices.tolist()):
        assert prompt == "" or prompt in prompts[index]
    with pytest.raises(ValueError, match="empty"):
        calibration_for(model, 0, seed=3)


# --- Fisher information -----------------------------------------------------------------


def _direct_fisher(denoiser, calib, names, target):
    """The mean over samples of the squared gradient of each sample's loss, one at a time."""
    import torch.nn.functional as F

    modules = dict(denoiser.named_modules())
    sums = {n: 0.0 for n in names}
    for i in range(len(calib)):
        denoiser.zero_grad(set_to_none=True)
        if calib.flow:
            pred = denoiser(calib.noisy[i : i + 1], calib.states[i : i + 1], calib.pooled[i : i + 1],
                            calib.timesteps[i : i + 1]).sample
        else:
            pred = denoiser(calib.noisy[i : i + 1], calib.timesteps[i : i + 1], calib.states[i : i + 1]).sample
        F.mse_loss(pred, target[i : i + 1]).backward()
        for n in names:
            sums[n] = sums[n] + modules[n].weight.grad.detach().pow(2)
    denoiser.zero_grad(set_to_none=True)
    return {n: s / len(calib) for n, s in sums.items()}


def _close(a, b) -> bool:
    return all(((a[n] - b[n]).abs().max() <= 1e-4 * b[n].abs().max() + 1e-12).item() for n in b)


def test_fisher_is_the_mean_squared_per_sample_gradient_of_the_trained_model(loaded, tiny_models):
    from engine.models.loader import load_text_to_image
    from engine.quant.fisher_sums import per_sample_fisher

    model, calib = loaded
    names = [n for n, _, _ in _layers(model)]
    fisher = per_sample_fisher(model.denoiser, calib, names)
    trained = load_text_to_image(tiny_models["model"]).denoiser  # the same weights, loaded again
    assert _close(fisher, _direct_fisher(trained, calib, names, calib.target))
    # What the seed's code did instead gives other values: a loss against the noisy input, or
    # a freshly initialised network.
    assert not _close(fisher, _direct_fisher(trained, calib, names, calib.noisy))
    fresh = type(trained).from_config(trained.config)
    assert not _close(fisher, per_sample_fisher(fresh, calib, names))


def test_fisher_of_a_rectified_flow_mmdit_is_the_direct_one(tiny_mmdit):
    import torch

    from engine.calibration import calibration_for
    from engine.models.loader import load_text_to_image
    from engine.quant.fisher_sums import per_sample_fisher

    model = load_text_to_image(tiny_mmdit, torch.device("cpu"))
    calib = calibration_for(model, 5, seed=2)
    assert calib.flow
    names = [n for n, _, _ in _layers(model)]
    fisher = per_sample_fisher(model.denoiser, calib, names, budget=1)  # one layer per group, too
    assert _close(fisher, _direct_fisher(load_text_to_image(tiny_mmdit).denoiser, calib, names, calib.target))


def test_fisher_memory_is_one_layer_gradient_and_one_group_of_sums(loaded, monkeypatch):
    """Structural check of the memory design: when a gradient is squared into its sum, it is
    the only gradient alive and has the weight's own shape (no per-sample or chunk dimension);
    only the current group's weights require gradients, and that group's float32 sums fit the
    budget (or are one layer); each group makes one pass over the samples."""
    import torch

    from engine.quant import fisher_sums

    model, calib = loaded
    denoiser = model.denoiser
    layers = _layers(model)
    names = [n for n, _, _ in layers]
    sizes = {n: m.weight.numel() for n, m, _ in layers}
    params = dict(denoiser.named_parameters())
    budget = -(-4 * sum(sizes.values()) // 3)  # a third of the float32 sums: three groups
    flags = {k: p.requires_grad for k, p in params.items()}
    seen, groups_seen = [], []
    real = fisher_sums._accumulate

    def spy(total, param):
        alive = [k for k, p in params.items() if p.grad is not None]
        tracked = sorted(k[: -len(".weight")] for k, p in params.items() if p.requires_grad)
        assert len(alive) == 1 and params[alive[0]] is param and param.grad.shape == param.shape
        assert total.dtype == torch.float32 and total.shape == param.shape
        if not groups_seen or groups_seen[-1] != tracked:
            groups_seen.append(tracked)
        seen.append(alive[0])
        real(total, param)
        assert param.grad is None

    monkeypatch.setattr(fisher_sums, "_accumulate", spy)
    passes = []
    handle = denoiser.register_forward_hook(lambda *a: passes.append(1))
    try:
        progress = []
        fisher = fisher_sums.per_sample_fisher(denoiser, calib, names, budget,
                                               on_progress=lambda *event: progress.append(event))
    finally:
        handle.remove()
    expected = fisher_sums.layer_groups([sizes[n] for n in names], budget)
    k = len(expected)
    assert k == math.ceil(4 * sum(sizes.values()) / budget) == 3
    assert [sorted(g) for g in groups_seen] == [sorted(names[i] for i in g) for g in expected]
    for group in groups_seen:  # within the budget plus one layer
        assert 4 * sum(sizes[n] for n in group) < budget + 4 * max(sizes[n] for n in group)
    assert len(seen) == len(names) * len(calib)  # every weight's gradient, once per sample
    assert len(passes) == len(expected) * len(calib)
    assert [(d, t) for d, t, _ in progress] == [(i + 1, k * len(calib)) for i in range(k * len(calib))]
    assert progress[-1][2] == f"Fisher information, layer group {k}/{k}"
    # the model is left as it was: flags, no gradients; the result is that of one group
    assert {k: p.requires_grad for k, p in params.items()} == flags
    assert all(p.grad is None for p in params.values())
    monkeypatch.setattr(fisher_sums, "_accumulate", real)
    assert _close(fisher, fisher_sums.per_sample_fisher(denoiser, calib, names))


def test_layer_groups_fit_the_budget_in_model_order():
    from engine.quant.fisher_sums import available_memory, layer_groups

    assert layer_groups([10, 10, 10, 10], 80) == [[0, 1], [2, 3]]  # float32 sums: 40 bytes each
    assert layer_groups([10, 30, 5, 5], 80) == [[0], [1], [2, 3]]  # 30 elements: one group alone
    assert layer_groups([10, 10], 10**9) == [[0, 1]]
    assert layer_groups([3, 3, 3], 1) == [[0], [1], [2]]
    # as many groups as the budget needs (72 / 40: two), balanced, within the budget plus one layer
    assert layer_groups([6, 6, 6], 40) == [[0, 1], [2]]
    assert layer_groups([1] * 10, 20) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert layer_groups([1] * 9 + [2], 20) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # 44 / 20: three
    import torch

    free = available_memory(torch.device("cpu"))
    assert free is None or 0 < free
    # the default budget: half the model's own bytes (or half the free memory, if less)
    from engine.quant.fisher_sums import sums_budget

    model = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Linear(100, 50).to(torch.bfloat16))
    own = 4 * 10100 + 2 * 5050
    assert sums_budget(model) == (own // 2 if free is None else min(own // 2, free // 2))


def test_fisher_stats_do_not_depend_on_the_grouping_and_report_progress(loaded):
    from engine.quant.fisher import compute_fisher_stats

    model, calib = loaded
    events = []
    one = compute_fisher_stats(model.denoiser, calib, budget=10**12, on_progress=lambda *e: events.append(e))
    assert [e[:2] for e in events] == [(i + 1, len(calib)) for i in range(len(calib))]
    assert events[0][2] == "Fisher information"
    many = compute_fisher_stats(model.denoiser, calib, budget=1)
    np.testing.assert_allclose(many.fisher, one.fisher, rtol=1e-5)
    for key in one.errors:
        np.testing.assert_allclose(many.errors[key], one.errors[key], rtol=1e-5)
    assert many.loss == one.loss


def test_fisher_of_a_bfloat16_model_is_close_to_float32(loaded, tiny_models):
    import copy

    import torch

    from engine.quant.fisher import compute_fisher_stats

    model, calib = loaded
    half = copy.deepcopy(model.denoiser).to(torch.bfloat16)
    full = compute_fisher_stats(model.denoiser, calib)
    low = compute_fisher_stats(half, calib)
    assert np.isfinite(low.fisher).all() and low.loss == pytest.approx(full.loss, rel=0.05)
    assert spearman(low.fisher, full.fisher) > 0.95


def test_fisher_weighted_error_is_half_the_fisher_weighted_squared_error(loaded):
    import torch

    from engine.quant.fisher import fisher_weighted_errors
    from engine.quant.rtn import fake_quantize

    model, _ = loaded
    layers = _layers(model)[:5]
    g = torch.Generator().manual_seed(0)
    weights = {n: m.weight for n, m, _ in layers}
    fisher = {n: torch.rand(m.weight.shape, generator=g) for n, m, _ in layers}
    errors = fisher_weighted_errors(weights, fisher)
    for i, (name, w) in enumerate(weights.items()):
        for bits, symmetric, key in ((4, True, "w4s"), (3, False, "w3a"), (8, True, "w8s")):
            direct = 0.5 * (fisher[name] * (fake_quantize(w, bits, symmetric) - w) ** 2).sum().item()
            assert errors[key][i] == pytest.approx(direct, rel=1e-5)
        direct16 = 0.5 * (fisher[name] * (w.detach().half().float() - w) ** 2).sum().item()
        assert errors["fp16"][i] == pytest.approx(direct16, rel=1e-5) and errors["fp32"][i] == 0.0
        assert errors["w8s"][i] < errors["w4s"][i]


def test_fisher_weighted_error_in_blocks_of_rows_is_that_of_the_whole_weight(loaded, monkeypatch):
    import torch

    from engine.quant import fisher as fisher_module

    model, _ = loaded
    layers = _layers(model)
    g = torch.Generator().manual_seed(1)
    weights = {n: m.weight for n, m, _ in layers}
    fisher = {n: torch.rand(m.weight.shape, generator=g) for n, m, _ in layers}
    whole = fisher_module.fisher_weighted_errors(weights, fisher)
    monkeypatch.setattr(fisher_module, "ERROR_CHUNK", 7)  # a few rows (or one) at a time
    rows = fisher_module.fisher_weighted_errors(weights, fisher)
    for key in whole:
        np.testing.assert_allclose(rows[key], whole[key], rtol=1e-9, atol=0)


def test_measured_sensitivity_quantizes_one_layer_at_a_time_and_restores_it(loaded):
    import torch

    from engine.quant.fisher import calibration_loss, measured_sensitivity
    from engine.quant.rtn import fake_quantize

    model, calib = loaded
    denoiser = model.denoiser
    before = {k: v.clone() for k, v in denoiser.state_dict().items()}
    measured = measured_sensitivity(denoiser, calib, 2, True)
    assert all(torch.equal(v, before[k]) for k, v in denoiser.state_dict().items())
    assert measured.base == pytest.approx(calibration_loss(denoiser, calib))
    i = int(np.argmax(np.abs(measured.increase)))
    _, module, _ = _layers(model)[i]
    w, b = module.weight.detach().clone(), module.bias.detach().clone()
    losses = []
    with torch.no_grad():
        for stored_w, stored_b in ((fake_quantize(w, 2), b.half().float()),  # quantized: w + d
                                   (2 * w - fake_quantize(w, 2), 2 * b - b.half().float())):  # w - d
            module.weight.copy_(stored_w)
            module.bias.copy_(stored_b)
            losses.append(calibration_loss(denoiser, calib))
    denoiser.load_state_dict(before)
    assert measured.increase[i] == pytest.approx(losses[0] - measured.base, rel=1e-4)
    assert measured.curvature[i] == pytest.approx((losses[0] + losses[1]) / 2 - measured.base, rel=1e-3, abs=1e-9)


def test_spearman_on_known_rankings_and_against_scipy():
    from scipy.stats import spearmanr

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40), rng.integers(0, 5, 40)  # many ties
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)


# --- strategies -------------------------------------------------------------------------

SCORES = [5.0, 1.0, 3.0, 0.5, 10.0]


def test_two_level_strategies_on_hand_made_scores():
    assert allocation.by_threshold(SCORES, 0.3, 8, 4) == [8, 4, 8, 4, 8]  # >= 3
    assert allocation.by_threshold(SCORES, 1.0, 16, 4) == [4, 4, 4, 4, 16]
    # group 0 = first two layers with a low threshold (0.5), group 1 the rest (6)
    assert allocation.by_groups(SCORES, [0, 0, 1, 1, 1], [0.05, 0.6], 8, 4) == [8, 8, 4, 4, 8]
    assert allocation.by_ratio(SCORES, 0.4, 8, 4) == [8, 4, 4, 4, 8]
    assert allocation.by_ratio(SCORES, 0.0, 8, 4) == [4] * 5 and allocation.by_ratio(SCORES, 1.0, 8, 4) == [8] * 5
    assert allocation.by_ratio([1.0, 1.0, 1.0], 1 / 3, 8, 4) == [8, 4, 4]  # ties: model order
    # mean 3.9, population std 3.441: k=1 cuts at 7.34, k=0 at 3.9, k=-1 at 0.46
    assert allocation.by_mean_std(SCORES, 1.0, 8, 4) == [4, 4, 4, 4, 8]
    assert allocation.by_mean_std(SCORES, 0.0, 8, 4) == [8, 4, 4, 4, 8]
    assert allocation.by_mean_std(SCORES, -1.0, 8, 4) == [8] * 5


def _instance(n: int, seed: int, scale: int = 1):
    rng = np.random.default_rng(seed)
    costs, errors = [], []
    for _ in range(n):
        size = int(rng.integers(10, 100)) * scale
        costs.append({4: size * 4, 6: size * 6, 8: size * 8})
        e4 = float(rng.random() * 10)
        errors.append({4: e4, 6: e4 * rng.uniform(0.05, 0.3), 8: e4 * rng.uniform(0.0, 0.05)})
    return errors, costs


def test_budget_is_optimal_on_small_instances_and_always_fits():
    for seed in range(4):
        errors, costs = _instance(6, seed)
        cheapest = allocation.total_cost(costs, [4] * 6)
        for capacity in np.linspace(cheapest, allocation.total_cost(costs, [8] * 6), 7).astype(int):
            bits = allocation.by_budget(errors, costs, int(capacity))
            assert allocation.total_cost(costs, bits) <= capacity
            feasible = [c for c in itertools.product((4, 6, 8), repeat=6)
                        if allocation.total_cost(costs, list(c)) <= capacity]
            best = min(allocation.total_error(errors, list(c)) for c in feasible)
            assert allocation.total_error(errors, bits) == pytest.approx(best)
        with pytest.raises(ValueError, match="cheapest"):
            allocation.by_budget(errors, costs, cheapest - 1)


def test_budget_with_rounded_costs_fits_and_beats_uniform_assignments():
    errors, costs = _instance(60, 7, scale=997)  # capacities far above the DP resolution
    for fraction, resolution in itertools.product((0.55, 0.7, 0.76, 0.9), (512, 1 << 16)):
        capacity = int(fraction * allocation.total_cost(costs, [8] * 60))
        bits = allocation.by_budget(errors, costs, capacity, resolution=resolution)
        assert allocation.total_cost(costs, bits) <= capacity
        uniform = [allocation.total_error(errors, [b] * 60) for b in (4, 6, 8)
                   if allocation.total_cost(costs, [b] * 60) <= capacity]
        assert allocation.total_error(errors, bits) <= min(uniform)  # never worse than uniform
        if resolution == 1 << 16:  # fine enough to use the slack: strictly better than uniform
            assert allocation.total_error(errors, bits) < min(uniform)


# --- the plan on a real model -----------------------------------------------------------


def test_predicted_size_is_the_size_on_disk_and_budgets_are_checked_first(loaded, tmp_path):
    import copy

    import torch

    from engine.mixed_precision import PlanError
    from engine.pipeline import dense_bytes
    from engine.quant import RTNConfig, quantize_, save_packed
    from engine.quant.fisher_method import PackedSize, plan_fisher

    model, _ = loaded
    names = [n for n, _, _ in _layers(model)]
    bits = {n: (4, 6, 8, 16, 32)[i % 5] for i, n in enumerate(names)}
    predicted = PackedSize(model.denoiser, symmetric=False).size(bits)
    denoiser = copy.deepcopy(model.denoiser)
    report = quantize_(denoiser, RTNConfig(bits={}, symmetric=False, layer_bits=bits))
    assert save_packed(tmp_path / "w.safetensors", denoiser, report.packed, report.half) == predicted

    fp32 = dense_bytes(model.denoiser, torch.float32)
    least = PackedSize(model.denoiser, True).size({n: 4 for n in names})
    params = {"strategy": "budget", "budget": (least - 1) / fp32, "candidates": [4, 6, 8], "symmetric": True,
              "calibration": {"samples": 4, "seed": 1}, "measure_sensitivity": False}
    with pytest.raises(PlanError, match="budget: no assignment"):
        plan_fisher(model, params, fp32, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # refused before any statistic was computed
    params["budget"] = least / fp32 + 0.02
    plan = plan_fisher(model, params, fp32, tmp_path / "cache")
    assert PackedSize(model.denoiser, True).size(plan.bits) <= plan.max_bytes
    assert set(plan.bits.values()) <= {4, 6, 8} and len(set(plan.bits.values())) > 1
    # 6-bit codes take 6 bits: a budget below uniform W8 can be met with W6 (when W6 took W8's
    # bytes, no assignment of [6, 8] fitted below the W8 size).
    sizer = PackedSize(model.denoiser, True)
    w6, w8 = sizer.size(dict.fromkeys(names, 6)), sizer.size(dict.fromkeys(names, 8))
    weights = sum(m.weight.numel() for _, m, _ in _layers(model))
    assert w8 - w6 >= 0.24 * weights  # a quarter of a byte less per weight, up to padding
    plan = plan_fisher(model, {**params, "candidates": [6, 8], "budget": (w6 + w8) / 2 / fp32}, fp32, tmp_path / "cache")
    assert sizer.size(plan.bits) <= plan.max_bytes < w8 and set(plan.bits.values()) == {6, 8}


def test_group_check_needs_every_layer_in_a_group():
    from engine.mixed_precision import LayerShape, PlanError, check_groups

    layers = [LayerShape("conv_in", (4, 1, 3, 3), True), LayerShape("down.attn.to_q", (4, 4), False, certain=True)]
    check_groups([["conv_in"], ["*"]], layers)
    with pytest.raises(PlanError, match="layers in no group: down.attn.to_q"):
        check_groups([["conv_in"]], layers)
    with pytest.raises(PlanError, match=r"group 2 \['up'\] matches no layer"):
        check_groups([["conv_in"], ["up"], ["*"]], layers)


# --- bad input: one located line before anything runs ----------------------------------

FISHER_TOML = """
[experiments.fisher]
model = "{model}"
feature_model = "{classifier}"
samples = 10
steps = 2
guidance = 2.0
batch_size = 10
bootstrap = 10

[experiments.fisher.variants.fp]
method = "none"

[experiments.fisher.variants.mixed]
method = "fisher"
strategy = "global"
threshold = 0.2
high = 16
calibration = {{ samples = 8, seed = 1 }}

[experiments.fisher.variants.budget]
method = "fisher"
strategy = "budget"
budget = 0.2
calibration = {{ samples = 8, seed = 1 }}
"""

BAD = [
    ("threshold zero", "strategy = 'global'\nthreshold = 0", "threshold", "must be in (0, 1], got 0"),
    ("threshold above one", "strategy = 'global'\nthreshold = 1.5", "threshold", "got 1.5"),
    ("ratio out of range", "strategy = 'ratio'\nratio = 1.2", "ratio", "must be in [0, 1], got 1.2"),
    ("k out of range", "strategy = 'meanstd'\nk = 50", "k", "must be in [-10, 10]"),
    ("budget zero", "strategy = 'budget'\nbudget = 0", "budget", "must be in (0, 1]"),
    ("budget cannot be met", "strategy = 'budget'\nbudget = 0.05", "budget", "no assignment of [4, 6, 8] bits fits 5.0%"),
    ("unknown strategy", "strategy = 'magic'", "strategy", "unknown strategy 'magic'"),
    ("empty calibration", "strategy = 'ratio'\nratio = 0.5\ncalibration = { samples = 0 }", "calibration.samples",
     "empty calibration set"),
    ("high not allowed", "strategy = 'ratio'\nratio = 0.5\nhigh = 12", "high", "must be one of 8, 16, 32"),
    ("low not below high", "strategy = 'ratio'\nratio = 0.5\nlow = 8", "low", "must be below high (8)"),
    ("key of another strategy", "strategy = 'ratio'\nratio = 0.5\nthreshold = 0.1", "threshold",
     "is a key of strategy 'global'"),
    ("missing strategy key", "strategy = 'global'", "strategy", "needs threshold"),
    ("group matches nothing", "strategy = 'groups'\ngroups = [['nope'], ['*']]\ngroup_thresholds = [0.1, 0.1]",
     "groups", "group 1 ['nope'] matches no layer"),
    ("layers in no group", "strategy = 'groups'\ngroups = [['conv_in']]\ngroup_thresholds = [0.1]",
     "groups", "layers in no group"),
    ("thresholds per group", "strategy = 'groups'\ngroups = [['conv_in'], ['*']]\ngroup_thresholds = [0.1]",
     "group_thresholds", "a list of 2 numbers"),
    ("calibration steps", "strategy = 'ratio'\nratio = 0.5\ncalibration = { steps = 0 }", "calibration.steps",
     "must be an integer between 1 and 1000, got 0"),
    ("calibration guidance", "strategy = 'ratio'\nratio = 0.5\ncalibration = { guidance = 'high' }",
     "calibration.guidance", "must be a finite number >= 0"),
    ("calibration key", "strategy = 'ratio'\nratio = 0.5\ncalibration = { sample = 4 }", "calibration.sample",
     "unknown key; keys are samples, seed, steps, guidance"),
]


def _bad_toml(tmp_path, tiny_models, body: str):
    path = tmp_path / "experiments.toml"
    text = FISHER_TOML.format(model=tiny_models["model"], classifier=tiny_models["classifier"])
    path.write_text(text + "\n[experiments.fisher.variants.bad]\nmethod = 'fisher'\n" + body + "\n")
    return path


@pytest.mark.parametrize("name,body,key,message", BAD, ids=[b[0] for b in BAD])
def test_bad_fisher_keys_are_one_located_error(tmp_path, tiny_models, name, body, key, message):
    from engine.config import load_catalogue
    from engine.errors import ConfigError

    path = _bad_toml(tmp_path, tiny_models, body)
    with pytest.raises(ConfigError) as info:
        load_catalogue(path)
    err = info.value
    assert message in str(err) and "\n" not in str(err)
    assert err.file == str(path) and err.key == f"experiments.fisher.variants.bad.{key}"
    assert err.line is not None and key.split(".")[0] in path.read_text().splitlines()[err.line - 1]


def test_cli_refuses_an_unmeetable_budget_with_one_line(tmp_path, tiny_models):
    path = _bad_toml(tmp_path, tiny_models, "strategy = 'budget'\nbudget = 0.05")
    runs = tmp_path / "runs"
    result = engine("run", "fisher", "--experiments", str(path), "--runs-dir", str(runs))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "experiments.toml:" in lines[0] and "budget" in lines[0]
    assert not runs.exists()


def test_shipped_catalogue_declares_the_fisher_experiment():
    from engine.config import load_catalogue
    from engine.methods import describe_bits
    from tests.conftest import REPO

    exp = load_catalogue(REPO / "experiments.toml").get("fisher-adaptive")
    assert list(exp.variants) == ["fp", "uniform-w4", "uniform-w8", "global", "groups", "ratio", "meanstd", "budget"]
    assert exp.samples >= 1000 and (exp.steps, exp.guidance, exp.batch_size) == (20, 2.0, 250)
    labels = {name: describe_bits(v.method, v.params) for name, v in exp.variants.items()}
    assert labels["uniform-w4"] == "W4" and labels["uniform-w8"] == "W8"
    assert labels["ratio"] == "W8/W4 ratio p=0.25" and labels["meanstd"] == "W8/W4 meanstd k=1"
    assert labels["budget"] == "W4/6/8 budget 20%"
    fisher = [v.params for v in exp.variants.values() if v.method == "fisher"]
    assert len({json.dumps(p["calibration"]) for p in fisher}) == 1  # one calibration set: one cache entry


# --- engine run end to end ----------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_models):
    from engine.store import Store

    root = tmp_path_factory.mktemp("fisher-e2e")
    toml = root / "experiments.toml"
    toml.write_text(FISHER_TOML.format(model=tiny_models["model"], classifier=tiny_models["classifier"]))
    # fp is covered by test_engine_run; the image test below samples its own FP reference
    result = engine("run", "fisher", "--variant", "mixed", "--variant", "budget", "--experiments", str(toml),
                    "--runs-dir", str(root / "runs"))
    return result, Store.open(root / "runs"), tiny_models


def test_fisher_runs_store_per_layer_statistics_and_the_correlation(finished):
    result, store, _ = finished
    assert result.returncode == 0, result.stdout + result.stderr
    runs = {r["variant"]: r for r in store.runs(experiment="fisher")}
    assert set(runs) == {"mixed", "budget"} and all(r["status"] == "done" for r in runs.values())
    fisher_by_variant = {}
    for variant in ("mixed", "budget"):
        metrics = store.metrics(runs[variant]["id"])
        assert -1 <= metrics["fisher_spearman"] <= 1 and -1 <= metrics["fisher_raw_spearman"] <= 1
        layers = store.layers(runs[variant]["id"])
        for layer in layers:
            assert layer["fisher"] >= 0 and layer["sensitivity"] is not None
            extra = json.loads(layer["extra"])
            assert set(extra["fisher_err"]) == {"2", "3", "4", "5", "6", "7", "8", "16", "32"}
            assert extra["rel_est_sensitivity"] == extra["fisher_err"]["4"]
        fisher_by_variant[variant] = [layer["fisher"] for layer in layers]
        est = [json.loads(layer["extra"])["rel_est_sensitivity"] for layer in layers]
        # Relative quantities (not losses: see engine.quant.fisher) carry a name that says so.
        assert "est_loss_increase" not in metrics
        chosen = sum(json.loads(l["extra"])["fisher_err"][str(l["bits"] or 32)] for l in layers)
        assert metrics["rel_est_loss_increase"] == pytest.approx(chosen)
        assert metrics["fisher_spearman"] == pytest.approx(spearman(est, [l["sensitivity"] for l in layers]))
        curvature = [json.loads(layer["extra"])["curvature"] for layer in layers]
        assert metrics["fisher_curv_spearman"] == pytest.approx(spearman(est, curvature))
    # computed once, shared through the cache
    assert fisher_by_variant["mixed"] == fisher_by_variant["budget"]
    assert store.metrics(runs["mixed"]["id"])["fisher_from_cache"] == 0
    assert store.metrics(runs["budget"]["id"])["fisher_from_cache"] == 1
    mixed_bits = {layer["bits"] for layer in store.layers(runs["mixed"]["id"])}
    assert mixed_bits == {4, 16}  # the global threshold keeps some layers at float16
    budget = store.metrics(runs["budget"]["id"])
    assert budget["size_ratio"] <= 0.2 and {l["bits"] for l in store.layers(runs["budget"]["id"])} <= {4, 6, 8}
    md = engine("export", "--format", "md", "--experiment", "fisher", "--runs-dir", str(store.runs_dir)).stdout
    assert "| FID |" in md and "| size MB |" in md and "reduction %" in md and "W4/6/8 budget 20%" in md


def test_fisher_images_come_from_the_packed_checkpoint(finished):
    import torch

    from engine.data.digits import eval_labels, prompt_for
    from engine.grids import load_samples, to_uint8
    from engine.models.loader import load_text_to_image
    from engine.quant import load_packed
    from engine.sampling import initial_noise, sample_images

    _, store, models = finished
    run = [r for r in store.runs(experiment="fisher") if r["variant"] == "mixed"][0]
    sampling = json.loads(run["config"])["sampling"]
    folder = store.runs_dir / run["folder"]
    stored, _ = load_samples(folder / "samples.safetensors")
    model = load_text_to_image(models["model"], torch.device("cpu"))
    n = 5
    args = ([prompt_for(l) for l in eval_labels(n)], initial_noise(10, model.sample_shape, sampling["seed"])[:n],
            sampling["steps"], sampling["guidance"], n)
    full_precision = to_uint8(sample_images(model, *args)).astype(int)
    model.denoiser.load_state_dict(load_packed(folder / "weights.safetensors"))
    quantized = to_uint8(sample_images(model, *args)).astype(int)
    assert np.abs(quantized - stored[:n].astype(int)).max() <= 1
    assert np.abs(full_precision - stored[:n].astype(int)).max() > 1


# --- calibration latents of a real pipeline ------------------------------------------------


def test_generated_calibration_follows_the_experiment_with_progress_and_its_own_cache_entry(tmp_path, tiny_sd):
    """A real pipeline's calibration latents are sampled with the experiment's steps, guidance
    and negative prompt (spied on the sampler), or with the variant's `calibration.steps` /
    `calibration.guidance`; progress counts the denoising steps; each generation is its own
    cache entry, and a cached one generates nothing."""
    import torch

    from engine.fisher_keys import validate_fisher
    from engine.models.loader import load_text_to_image
    from engine.quant.fisher_method import plan_fisher
    from engine.run_config import SamplingConfig

    model = load_text_to_image(tiny_sd, torch.device("cpu"))
    calls, events = [], []
    sample_batch = model.sample_batch

    def spy(prompts, latents, steps, guidance, negative_prompt="", on_step=None):
        calls.append((len(prompts), steps, guidance, negative_prompt))
        return sample_batch(prompts, latents, steps, guidance, negative_prompt=negative_prompt, on_step=on_step)

    model.sample_batch = spy
    prompts = ["a photo of a cat", "a red car on a street"]
    sampling = SamplingConfig(samples=4, steps=3, guidance=2.5, seed=0, batch_size=4, negative_prompt="blurry")
    keys = {"strategy": "ratio", "ratio": 0.25, "measure_sensitivity": False, "calibration": {"samples": 10, "seed": 1}}
    cache = tmp_path / "cache"

    def plan(params, sampling=sampling):
        calls.clear(), events.clear()
        return plan_fisher(model, validate_fisher(params), 10**9, cache, lambda *e: events.append(e),
                           prompts=prompts, sampling=sampling)

    first = plan(keys)
    assert calls == [(8, 3, 2.5, "blurry"), (2, 3, 2.5, "blurry")]  # batches of 8, the experiment's sampling
    generation = [e for e in events if e[0] == "calibration"]
    assert [e[1:3] for e in generation] == [(8 * i, 30) for i in range(1, 4)] + [(24 + 2 * i, 30) for i in range(1, 4)]
    assert "3 steps, guidance 2.5" in generation[0][3]
    stage, done, total, _ = events[-1]  # the Fisher follows: samples x layer groups
    assert stage == "fisher" and done == total and total % 10 == 0
    assert plan(keys).metrics["fisher_from_cache"] == 1 and calls == []  # cached: nothing generated
    own = plan({**keys, "calibration": {"samples": 10, "seed": 1, "steps": 2, "guidance": 1.0}})
    assert {c[1:3] for c in calls} == {(2, 1.0)} and own.metrics["fisher_from_cache"] == 0
    assert len(list(cache.glob("fisher-*.safetensors"))) == 2
    name = next(iter(first.bits))  # other latents, other statistics
    assert own.layer_info[name]["fisher"] != first.layer_info[name]["fisher"]
    positive = SamplingConfig(samples=4, steps=3, guidance=2.5, seed=0, batch_size=4, negative_prompt="")
    assert plan(keys, positive).metrics["fisher_from_cache"] == 0 and {c[3] for c in calls} == {""}
    assert len(list(cache.glob("fisher-*.safetensors"))) == 3
