"""Real (low-bit) execution: modules built from the packed checkpoint reproduce the simulated
model, hold what their codes and scales take, and run end to end through `engine run`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from engine.quant import RTNConfig, quantize_
from engine.quant.checkpoint import store_and_reload
from engine.quant.lowbit import QuantConv2d, QuantLinear, model_bytes, read_packed_layers, to_lowbit
from tests.conftest import TINY_TOML, engine


def _tiny_unet(tiny_models):
    from engine.models.loader import load_text_to_image

    return load_text_to_image(tiny_models["model"], device=torch.device("cpu"))


def _inputs(model, n=4):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((n, *model.sample_shape), generator=gen)
    states = model.encode(["a handwritten digit seven"] * n).states
    return x, torch.tensor(400), states


@pytest.mark.parametrize("bits,symmetric", [(4, True), (8, True), (4, False), (8, False)])
def test_real_modules_reproduce_the_simulated_model_exactly(tiny_models, tmp_path, bits, symmetric):
    """Same weights (dequantized from the same codes) and the same kernels: equal outputs."""
    model = _tiny_unet(tiny_models)
    report = quantize_(model.denoiser, RTNConfig(bits={"conv": bits, "attention": bits, "linear": bits},
                                                 symmetric=symmetric))
    path = tmp_path / "w.safetensors"
    store_and_reload(model.denoiser, report.packed, report.half, path)
    x, t, states = _inputs(model)
    with torch.no_grad():
        simulated = model.denoiser(x, t, states).sample
        lowbit = to_lowbit(model.denoiser, path)
        real = model.denoiser(x, t, states).sample
    assert lowbit.layers == len(report.packed)
    kinds = {type(m) for m in model.denoiser.modules()}
    assert QuantLinear in kinds and QuantConv2d in kinds
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in model.denoiser.modules())
    assert torch.equal(real, simulated)  # tolerance 0: identical arithmetic


def test_model_bytes_of_a_real_w4_layer_is_its_codes_and_scales(tmp_path):
    torch.manual_seed(0)
    lin = nn.Linear(33, 10)  # odd number of weights: the last byte holds one code
    holder = nn.Sequential(lin)
    report = quantize_(holder, RTNConfig(bits={"linear": 4}))
    path = tmp_path / "w.safetensors"
    store_and_reload(holder, report.packed, report.half, path)
    [layer] = read_packed_layers(path)
    assert layer.codes.numel() == math.ceil(330 / 2)
    to_lowbit(holder, path)
    real = holder[0]
    assert isinstance(real, QuantLinear)
    codes, scales, bias = math.ceil(330 / 2), 10 * 2, 10 * 2  # uint8 nibbles, fp16 scales, fp16 bias
    assert model_bytes(real) == codes + scales + bias
    assert model_bytes(nn.Linear(33, 10)) == (330 + 10) * 4


def test_real_w4_keeps_int8_activation_quantizers(tiny_models, tmp_path):
    """RTN W4A8 (calibrated, static int8 inputs of every Linear): the real model keeps each
    Linear's activation quantizer and scale, and still equals the simulated one."""
    from engine.quant.act_quant import act_quant_of, add_act_quant

    model = _tiny_unet(tiny_models)
    report = quantize_(model.denoiser, RTNConfig(bits={"conv": 4, "attention": 4, "linear": 4}))
    linears = [m for m in model.denoiser.modules() if isinstance(m, nn.Linear)]
    for m in linears:
        add_act_quant(m, 8, "static", absmax=2.0)
    path = tmp_path / "w.safetensors"
    store_and_reload(model.denoiser, report.packed, report.half, path)
    x, t, states = _inputs(model)
    with torch.no_grad():
        simulated = model.denoiser(x, t, states).sample
        to_lowbit(model.denoiser, path)
        real = model.denoiser(x, t, states).sample
    reals = [m for m in model.denoiser.modules() if isinstance(m, QuantLinear)]
    assert len(reals) == len(linears) and all(act_quant_of(m) is not None for m in reals)
    assert torch.equal(real, simulated)


def test_real_execution_refuses_other_widths(tmp_path):
    holder = nn.Sequential(nn.Linear(8, 4))
    report = quantize_(holder, RTNConfig(bits={"linear": 3}))
    path = tmp_path / "w.safetensors"
    store_and_reload(holder, report.packed, report.half, path)
    with pytest.raises(ValueError, match="3-bit codes; real execution supports 4 and 8 bits"):
        to_lowbit(holder, path)


REAL_TOML = TINY_TOML + """
[experiments.tiny.variants.A-real]
description = "all W4, real execution"
method = "rtn"
bits = 4
execution = "real"
"""


def test_engine_run_real_equals_simulated(tmp_path, tiny_models):
    """`engine run` of W4 simulated and W4 real: the same samples, and model_bytes shrinks."""
    from engine.grids import load_samples
    from engine.store import Store

    toml = tmp_path / "experiments.toml"
    toml.write_text(REAL_TOML.format(model=tiny_models["model"], classifier=tiny_models["classifier"]))
    runs_dir = tmp_path / "runs"
    result = engine("run", "tiny", "--variant", "fp", "--variant", "A", "--variant", "A-real",
                    "--experiments", str(toml), "--runs-dir", str(runs_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    store = Store.open(runs_dir)
    runs = {r["variant"]: r for r in store.runs(experiment="tiny")}
    assert all(r["status"] == "done" for r in runs.values()), [r["error"] for r in runs.values()]
    metrics = {v: store.metrics(r["id"]) for v, r in runs.items()}
    images = {v: load_samples(runs_dir / r["folder"] / "samples.safetensors")[0] for v, r in runs.items()}
    assert np.array_equal(images["A"], images["A-real"])
    assert metrics["A"]["fid"] == metrics["A-real"]["fid"]
    assert metrics["A-real"]["model_bytes"] < 0.3 * metrics["fp"]["model_bytes"]
    assert metrics["A"]["model_bytes"] >= metrics["fp"]["model_bytes"]  # simulated: FP32 in memory
    for m in metrics.values():
        assert m["peak_mem_mb"] > 0 and "sampling_mem_mb" in m
    assert json.loads(runs["A-real"]["config"])["execution"] == "real"
    assert "execution" not in json.loads(runs["A"]["config"])  # default: config (and hash) unchanged


def test_sampling_memory_sees_what_the_block_allocates():
    """peak_mem_mb / sampling_mem_mb come from the kernel's resident high-water mark, reset at
    the start of the block: a 200 MB tensor touched inside shows up, one freed before does not."""
    from engine.execution import Runtime

    before = torch.ones(50 * 2**20, dtype=torch.float32)  # 200 MB, freed before the block
    del before
    runtime = Runtime(torch.device("cpu"), None)
    with runtime.sampling() as small:
        torch.ones(2**20)
    with runtime.sampling() as big:
        t = torch.ones(50 * 2**20, dtype=torch.float32)
        del t
    if "sampling_mem_mb" not in big:
        pytest.skip("/proc/self/clear_refs is not writable here: peak RSS cannot be reset")
    assert big["sampling_mem_mb"] >= 190 and small["sampling_mem_mb"] < 100
    assert big["peak_mem_mb"] >= big["sampling_mem_mb"]


def test_bf16_autocast_runs_the_block_in_bfloat16():
    from engine.execution import Runtime

    lin = nn.Linear(4, 4)
    with Runtime(torch.device("cpu"), "bf16").sampling():
        y = lin(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
