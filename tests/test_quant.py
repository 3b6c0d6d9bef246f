"""Tests for engine.quant: RTN error bounds, roles, quantize_, packing and on-disk sizes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from engine.quant import (
    RTNConfig,
    dequantize,
    fake_quantize,
    layer_role,
    load_packed,
    pack_codes,
    quantizable_layers,
    quantize_,
    quantize_tensor,
    relative_error,
    save_dense,
    save_packed,
    unpack_codes,
)
from engine.quant.packing import packed_breakdown

ALL_BITS = range(2, 9)
ALL_ROLES = ("conv", "attention", "linear")
QUANT_KEYS = {"quant.codes", "quant.scales", "quant.zeros", "quant.biases"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The machine is shared with a training job: multi-threaded small ops are much slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _weights(kind: str, shape: tuple[int, ...] = (16, 64), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        # Per-channel ranges that are not centred on zero exercise the asymmetric zero point.
        lo = torch.rand(shape[0], 1, generator=g) * -2.0
        width = torch.rand(shape[0], 1, generator=g) * 3.0 + 0.1
        flat = lo + width * torch.rand(shape[0], 64, generator=g)
        return flat[:, : int(torch.tensor(shape[1:]).prod())].reshape(shape)
    return torch.randn(shape, generator=g) * 0.05


def _tiny_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 5))


@pytest.fixture(scope="module")
def unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=4,
    )


@pytest.fixture(scope="module")
def shipped_unet():
    """The architecture of the shipped digits UNet (about 1.4M parameters), randomly initialised."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _copy(model: nn.Module) -> nn.Module:
    fresh = type(model).from_config(model.config)
    fresh.load_state_dict(model.state_dict())
    return fresh


def _assert_round_trip(path, model: nn.Module) -> dict[str, torch.Tensor]:
    """load_packed(path) equals model.state_dict() exactly, floating tensors as float32."""
    state = load_packed(path)
    expected = model.state_dict()
    assert state.keys() == expected.keys()
    for key, t in expected.items():
        assert state[key].dtype == (torch.float32 if t.is_floating_point() else t.dtype), key
        assert torch.equal(state[key], t.to(state[key].dtype)), key
    return state


# --- rtn ---------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_error_at_most_half_step_per_channel(kind: str, symmetric: bool) -> None:
    for shape in [(16, 64), (4, 2, 3, 3)]:  # Linear and Conv2d layouts
        w = _weights(kind, shape)
        for bits in ALL_BITS:
            qt = quantize_tensor(w, bits, symmetric)
            assert qt.codes.dtype == torch.uint8 and qt.codes.shape == w.shape
            assert qt.scale.dtype == torch.float16 and qt.scale.shape == (shape[0],)
            assert qt.zero.dtype == torch.uint8 and qt.zero.shape == (shape[0],)
            err = (dequantize(qt) - w).abs().reshape(shape[0], -1)
            bound = qt.scale.float()[:, None] / 2 * (1 + 1e-5)
            assert (err <= bound).all(), (bits, symmetric, (err - bound).max())


@pytest.mark.parametrize("symmetric", [True, False])
def test_relative_error_decreases_with_bits(symmetric: bool) -> None:
    w = _weights("gaussian", (32, 128))
    errs = [relative_error(w, fake_quantize(w, b, symmetric)) for b in ALL_BITS]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.01


@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_in_range_and_symmetric_zero(symmetric: bool) -> None:
    w = _weights("uniform")
    for bits in ALL_BITS:
        qt = quantize_tensor(w, bits, symmetric)
        assert int(qt.codes.max()) <= 2**bits - 1
        if symmetric:
            assert (qt.zero == 2 ** (bits - 1)).all()


def _restricted_symmetric(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The former symmetric grid, +-(2^(bits-1) - 1) steps of absmax / (2^(bits-1) - 1): one
    code of 2^bits unused."""
    from engine.quant.rtn import _fp16_scale

    half = 2 ** (bits - 1)
    scale = _fp16_scale(w.abs().amax(dim=1) / (half - 1)).float()[:, None]
    return torch.round(w / scale).clamp(-half + 1, half - 1) * scale


def test_symmetric_grid_has_two_to_the_bits_levels() -> None:
    for bits in ALL_BITS:
        levels = 2**bits
        # absmax = (2^bits - 1) / 2 makes the scale 1.0 exactly: the grid is the integers
        # -2^(bits-1) .. 2^(bits-1) - 1 with zero at the mid code, and a dense ramp from
        # -absmax to absmax meets every one of its 2^bits levels.
        absmax = (levels - 1) / 2
        ramp = torch.linspace(-absmax, absmax, 4 * levels + 1)[None, :]
        qt = quantize_tensor(ramp, bits, symmetric=True)
        assert qt.scale.item() == pytest.approx(2 * absmax / (levels - 1))
        assert torch.unique(qt.codes).tolist() == list(range(levels)), bits
        assert int(qt.zero) == levels // 2 and dequantize(qt)[0, 2 * levels].item() == 0.0  # 0 is exact
        assert (dequantize(qt) - ramp).abs().max().item() <= 0.5
        # The restricted grid met only 2^bits - 1 levels of a coarser step on the same ramp.
        assert torch.unique(_restricted_symmetric(ramp, bits)).numel() == levels - 1


def test_full_symmetric_grid_lowers_the_error_by_its_finer_step() -> None:
    w = _weights("gaussian", (256, 512))
    for bits in ALL_BITS:
        ratio = relative_error(w, _restricted_symmetric(w, bits)) / relative_error(w, fake_quantize(w, bits))
        step = (2**bits - 1) / (2**bits - 2)  # how much finer the full grid's step is
        assert 1.0 < ratio <= step * 1.01, (bits, ratio)
        if bits <= 6:  # below, the gain (<1%) is within the spread of the rounding error
            assert ratio >= 1 + 0.5 * (step - 1), (bits, ratio)  # measured x1.07 at 4, x1.16 at 3


def test_symmetric_grid_reproduces_its_own_values() -> None:
    # The full symmetric grid has one more level below zero than above, so re-quantizing w_hat
    # derives another scale from its absmax (a level, not absmax itself): fake_quantize is not
    # idempotent any more (the restricted grid was). What holds: w_hat's values lie on the
    # grid, re-rounding them on it is exact, and a channel's error is at most half a step.
    w = _weights("gaussian", (16, 64))
    w[3] = 0.0  # an all-zero channel
    w[5] *= 1e-6  # a channel whose scale is a float16 subnormal
    for bits in ALL_BITS:
        qt = quantize_tensor(w, bits)
        w_hat = dequantize(qt)
        scale = qt.scale.float()[:, None]
        again = torch.round(w_hat / scale) + qt.zero.float()[:, None]
        assert torch.equal(again, qt.codes.float())
        assert torch.equal(w_hat[3], w[3]) and qt.scale[5].float() < 2.0**-14  # subnormal
        assert ((w_hat - w).abs() <= scale / 2 * (1 + 1e-5)).all()


def test_asymmetric_quantization_of_grid_weights_is_exact() -> None:
    # Weights that already lie on a full-range asymmetric grid quantize back to themselves.
    g = torch.Generator().manual_seed(1)
    for bits in ALL_BITS:
        qmax = 2**bits - 1
        codes = torch.randint(0, qmax + 1, (8, 32), generator=g)
        codes[:, 0], codes[:, 1] = 0, qmax
        zero = torch.randint(0, qmax + 1, (8, 1), generator=g)
        scale = (torch.rand(8, 1, generator=g) + 0.01).half().float()
        w = (codes - zero).float() * scale
        qt = quantize_tensor(w, bits, symmetric=False)
        assert torch.equal(qt.codes, codes.to(torch.uint8))
        assert torch.equal(dequantize(qt), w)


def test_zero_channel_and_bad_input() -> None:
    w = torch.zeros(3, 4)
    for symmetric in (True, False):
        qt = quantize_tensor(w, 4, symmetric)
        assert torch.equal(dequantize(qt), w)
    assert relative_error(w, w) == 0.0
    for bits in (1, 9, 4.0):
        with pytest.raises(ValueError):
            quantize_tensor(torch.ones(2, 2), bits)
    with pytest.raises(ValueError):
        quantize_tensor(torch.tensor([[1.0, float("nan")]]), 4)


# --- roles and quantize_ -----------------------------------------------------------------


def test_roles_of_plain_modules() -> None:
    assert layer_role("x", nn.Conv1d(2, 2, 1)) == "conv"
    assert layer_role("blk.attn.to_q", nn.Linear(2, 2)) == "attention"
    assert layer_role("blk.attn.add_k_proj", nn.Linear(2, 2)) == "attention"
    assert layer_role("blk.my_to_q", nn.Linear(2, 2)) == "linear"  # whole-segment match only
    assert layer_role("blk.to_out.1", nn.Linear(2, 2)) == "linear"
    assert layer_role("norm", nn.LayerNorm(2)) is None
    names = [(n, r) for n, _, r in quantizable_layers(_tiny_model())]
    assert names == [("0", "conv"), ("3", "linear")]


def test_roles_on_tiny_unet(unet) -> None:
    roles = {name: role for name, _, role in quantizable_layers(unet)}
    assert [n for n, _, _ in quantizable_layers(unet)] == [
        n for n, m in unet.named_modules() if n in roles
    ]
    attention = [n for n in roles if ".attn1." in n or ".attn2." in n]
    assert len(attention) == 4 * 2 * 4  # 4 transformer blocks x (attn1, attn2) x q/k/v/out
    for suffix in ("to_q", "to_k", "to_v", "to_out.0"):
        assert sum(n.endswith(".attn2." + suffix) for n in attention) == 4
    assert all(roles[n] == "attention" for n in attention)
    for name, module in unet.named_modules():
        if isinstance(module, nn.Conv2d):
            assert roles[name] == "conv"
    assert roles["time_embedding.linear_1"] == roles["time_embedding.linear_2"] == "linear"
    ff = [n for n in roles if ".ff." in n]
    assert ff and all(roles[n] == "linear" for n in ff)


def test_quantize_conv_only_leaves_other_layers_untouched(unet) -> None:
    model = type(unet).from_config(unet.config)
    model.load_state_dict(unet.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = quantize_(model, RTNConfig(bits={"conv": 4}))
    layers = quantizable_layers(model)
    assert [e["name"] for e in report.layers] == [n for n, _, _ in layers]
    after = model.state_dict()
    for entry, (name, module, role) in zip(report.layers, layers):
        assert entry["role"] == role and entry["params"] == module.weight.numel()
        w0, w1 = before[f"{name}.weight"], after[f"{name}.weight"]
        if module.bias is not None:
            b0, b1 = before[f"{name}.bias"], after[f"{name}.bias"]
            assert b1.dtype == b0.dtype
            assert torch.equal(b1, b0.half().float() if role == "conv" else b0)
        if role == "conv":
            assert entry["bits"] == 4 and name in report.packed
            assert torch.equal(w1, fake_quantize(w0, 4))
            assert entry["weight_err"] == pytest.approx(relative_error(w0, w1))
            assert 0.0 < entry["weight_err"] < 0.2
        else:
            assert entry["bits"] is None and entry["weight_err"] is None
            assert name not in report.packed and torch.equal(w0, w1)


def test_rtn_config_validation_and_round_trip() -> None:
    cfg = RTNConfig(bits={"conv": 4, "attention": 8}, symmetric=False)
    assert RTNConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="'mlp'.*conv, attention, linear"):
        RTNConfig(bits={"mlp": 4})
    for bad in (1, 9, 4.5, "4", True):
        with pytest.raises(ValueError, match="bits"):
            RTNConfig(bits={"linear": bad})
    with pytest.raises(ValueError):
        RTNConfig.from_dict({"bits": {}, "sym": True})


# --- packing -----------------------------------------------------------------------------


def test_pack_unpack_round_trip_in_exactly_bits_per_code() -> None:
    g = torch.Generator().manual_seed(2)
    for bits in range(1, 9):
        for numel in (0, 1, 3, 7, 8, 9, 15, 64, 101, 1001):
            codes = torch.randint(0, 2**bits, (numel,), generator=g).to(torch.uint8)
            codes[: min(numel, 2)] = torch.tensor([0, 2**bits - 1], dtype=torch.uint8)[: min(numel, 2)]
            packed = pack_codes(codes, bits)
            assert packed.dtype == torch.uint8 and packed.numel() == -(-numel * bits // 8), (bits, numel)
            assert torch.equal(unpack_codes(packed, bits, numel), codes), (bits, numel)
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, 9)  # 9 3-bit codes need 4 bytes


def test_pack_codes_is_a_low_bit_first_bit_stream() -> None:
    # 3-bit codes 1, 2, ..., 7, 0 laid end to end, each low bit first (100 010 110 001 101 011
    # 111 000), cut into bytes whose first bit is their lowest: 0b11010001, 0b01011000, 0b00011111.
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    assert pack_codes(codes, 3).tolist() == [0b11010001, 0b01011000, 0b00011111]
    assert pack_codes(torch.tensor([5], dtype=torch.uint8), 6).tolist() == [5]
    assert pack_codes(torch.tensor([1, 2, 3], dtype=torch.uint8), 2).tolist() == [0b111001]  # as version 2


def test_pack_codes_of_large_layers_spans_chunks() -> None:
    from engine.quant import packing

    g = torch.Generator().manual_seed(5)
    numel = 2 * packing._CHUNK + 13
    for bits in (3, 7):
        codes = torch.randint(0, 2**bits, (numel,), generator=g).to(torch.uint8)
        packed = pack_codes(codes, bits)
        assert packed.numel() == -(-numel * bits // 8)
        assert torch.equal(unpack_codes(packed, bits, numel), codes)


def test_quantize_rounds_biases_of_quantized_layers_only(shipped_unet) -> None:
    model = _copy(shipped_unet)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = quantize_(model, RTNConfig(bits={"conv": 4, "attention": 8}))
    after = model.state_dict()
    biased = {name for name, module, _ in quantizable_layers(model) if module.bias is not None}
    quantized_biases = {f"{name}.bias" for name in report.packed if name in biased}
    assert quantized_biases and len(quantized_biases) < len(biased)  # both kinds are present
    changed = 0
    for key, b0 in before.items():
        b1 = after[key]
        assert b1.dtype == b0.dtype == torch.float32
        if key in quantized_biases:
            assert torch.equal(b1, b0.half().float())  # the nearest float16, back in float32
            # Within float16 rounding: half an ulp, relative 2^-11 (normal) or 2^-25 (subnormal).
            bound = torch.maximum(b0.abs() * 2.0**-11, torch.full_like(b0, 2.0**-25))
            assert ((b1 - b0).abs() <= bound).all(), key
            changed += not torch.equal(b0, b1)
        elif key.removesuffix(".weight") not in report.packed:
            # Unquantized layers' biases, norms and everything else stay bit-identical.
            assert torch.equal(b1, b0), key
    assert changed  # random float32 biases are not float16 values


def test_quantize_is_all_or_nothing() -> None:
    model = _tiny_model()
    with torch.no_grad():
        model[3].bias[0] = 1e6  # overflows float16
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"3: bias.*float16"):
        quantize_(model, RTNConfig(bits={"conv": 4, "linear": 4}))
    for key, t in model.state_dict().items():
        assert torch.equal(t, before[key]), key  # the conv layer, quantized first, is untouched
    model = _tiny_model()
    with torch.no_grad():
        model[3].weight[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_(model, RTNConfig(bits={"conv": 4, "linear": 4}))
    for key, t in model.state_dict().items():
        assert torch.equal(t, before[key]), key


@pytest.mark.parametrize("symmetric", [True, False])
def test_save_load_packed_reproduces_simulated_weights(tmp_path, unet, symmetric: bool) -> None:
    for bits in (2, 3, 4, 8):
        model = _copy(unet)
        cfg = RTNConfig(bits={"conv": bits, "attention": 8, "linear": 4}, symmetric=symmetric)
        report = quantize_(model, cfg)
        path = tmp_path / f"w{bits}.safetensors"
        save_packed(path, model, report.packed)
        state = _assert_round_trip(path, model)
        fresh = type(unet).from_config(unet.config)
        fresh.load_state_dict(state, strict=True)
    state = model.state_dict()
    order = [n for n, _, _ in quantizable_layers(model)]
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()["qtui_quant"]
        info = json.loads(raw)
        keys = set(f.keys())
        dtypes = {k: f.get_tensor(k).dtype for k in keys}
    assert raw == json.dumps(info, separators=(",", ":"))  # compact
    assert info["version"] == 3
    assert [layer[0] for layer in info["layers"]] == order  # every layer, in model order
    assert info["layers"][0] == ["conv_in", 8, int(symmetric), [8, 1, 3, 3], 1]
    # One tensor per part; the quantized layers' weights and biases have no entries of their own.
    assert keys & QUANT_KEYS == QUANT_KEYS - ({"quant.zeros"} if symmetric else set())
    owned = {f"{n}.{p}" for n in order for p in ("weight", "bias")}
    assert keys - QUANT_KEYS == set(state) - owned
    assert dtypes["quant.codes"] == torch.uint8 and dtypes["quant.biases"] == torch.float16
    assert dtypes["quant.scales"] == torch.float16
    assert all(dtypes[k] == torch.float32 for k in keys - QUANT_KEYS)


def test_packed_round_trip_mixed_layers_and_integer_buffers(tmp_path) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, bias=False),
        nn.BatchNorm2d(5),
        nn.Flatten(),
        nn.Linear(5, 7),
        nn.Linear(7, 3),
    )
    model[1].num_batches_tracked += 5
    report = quantize_(model, RTNConfig(bits={"conv": 3, "linear": 8}, symmetric=False))
    # Quantize only some layers: the last Linear keeps float32 weight and bias.
    packed = {name: qt for name, qt in report.packed.items() if name != "4"}
    with torch.no_grad():
        model[4].bias.add_(1e-7)  # not a float16 value: fine, the layer is not packed
    path = tmp_path / "mixed.safetensors"
    save_packed(path, model, dict(reversed(packed.items())))  # order of the dict is irrelevant
    state = _assert_round_trip(path, model)
    assert state["1.num_batches_tracked"].dtype == torch.int64
    with safe_open(str(path), framework="pt") as f:
        layers = json.loads(f.metadata()["qtui_quant"])["layers"]
        assert f.get_tensor("quant.zeros").numel() == 5 + 7
        assert f.get_tensor("quant.biases").numel() == 7
    assert layers == [["0", 3, 0, [5, 3, 3, 3], 0], ["3", 8, 0, [7, 5], 1]]


def test_save_packed_rejects_bias_that_is_not_float16(tmp_path) -> None:
    model = _tiny_model()
    qt = quantize_tensor(model[3].weight.data, 4)  # bypasses quantize_: the bias is not rounded
    with torch.no_grad():
        model[3].weight.copy_(dequantize(qt))
    with pytest.raises(ValueError, match="3.bias is not float16-exact"):
        save_packed(tmp_path / "x.safetensors", model, {"3": qt})
    with pytest.raises(ValueError, match="not in the model"):
        save_packed(tmp_path / "x.safetensors", model, {"7": qt})


def test_load_packed_rejects_bad_files(tmp_path) -> None:
    model = _tiny_model()
    report = quantize_(model, RTNConfig(bits={"conv": 4, "linear": 4}))
    path = tmp_path / "ok.safetensors"
    save_packed(path, model, report.packed)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = json.loads(f.metadata()["qtui_quant"])

    def write(name, tensors, info):
        p = tmp_path / name
        save_file(tensors, str(p), metadata={"qtui_quant": json.dumps(info)})
        return p

    with pytest.raises(ValueError, match="version"):
        load_packed(write("v1.safetensors", tensors, {**info, "version": 1}))
    scales = tensors["quant.scales"]
    longer = dict(tensors, **{"quant.scales": torch.cat([scales, scales[:1]])})
    with pytest.raises(ValueError, match="quant.scales has 1 unused"):
        load_packed(write("long.safetensors", longer, info))
    shorter = dict(tensors, **{"quant.codes": tensors["quant.codes"][:-1].clone()})
    with pytest.raises(ValueError, match="quant.codes is too short"):
        load_packed(write("short.safetensors", shorter, info))
    bad = {**info, "layers": [["0", 4, 1, [8, 3, 3, 3]]] + info["layers"][1:]}
    with pytest.raises(ValueError, match="malformed"):
        load_packed(write("bad.safetensors", tensors, bad))
    # A dense checkpoint (no quantization metadata) loads as a plain state dict.
    save_dense(tmp_path / "dense.safetensors", model)
    dense = load_packed(tmp_path / "dense.safetensors")
    assert all(torch.equal(dense[k], v) for k, v in model.state_dict().items())


def test_packed_size_relative_to_dense(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 128), nn.GELU(), nn.Linear(128, 512))
    fp32 = save_dense(tmp_path / "fp32.safetensors", model, torch.float32)
    fp16 = save_dense(tmp_path / "fp16.safetensors", model, torch.float16)
    assert 0.49 < fp16 / fp32 < 0.51
    for bits, limit in ((4, 0.15), (8, 0.27)):
        m = nn.Sequential(nn.Linear(512, 128), nn.GELU(), nn.Linear(128, 512))
        m.load_state_dict(model.state_dict())
        report = quantize_(m, RTNConfig(bits={"linear": bits}))
        size = save_packed(tmp_path / f"w{bits}.safetensors", m, report.packed)
        assert size / fp32 < limit, (bits, size / fp32)


@pytest.mark.parametrize(("bits", "limit"), [(3, 0.105), (4, 0.14), (6, 0.20), (8, 0.26)])  # bench_quant_size
def test_shipped_unet_packed_size(tmp_path, shipped_unet, bits: int, limit: float) -> None:
    fp32 = save_dense(tmp_path / "fp32.safetensors", shipped_unet, torch.float32)
    model = _copy(shipped_unet)
    report = quantize_(model, RTNConfig(bits=dict.fromkeys(ALL_ROLES, bits)))
    assert len(report.packed) == len(quantizable_layers(model))
    path = tmp_path / f"w{bits}.safetensors"
    size = save_packed(path, model, report.packed)
    assert size / fp32 <= limit, (bits, size, fp32, size / fp32)
    _assert_round_trip(path, model)
    parts = packed_breakdown(path)
    assert sum(parts.values()) == size and parts["zeros"] == 0
    n_weights = sum(qt.codes.numel() for qt in report.packed.values())
    # bits per weight, each layer padded to a whole byte
    assert n_weights * bits <= parts["codes"] * 8 < n_weights * bits + len(report.packed) * 8


def _odd_model() -> nn.Sequential:
    """Layers whose weight counts are odd (5 x 3 x 3 x 3 = 135, 7 x 5 = 35, 3 x 7 = 21)."""
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.Flatten(), nn.Linear(5, 7), nn.Linear(7, 3, bias=False))


@pytest.mark.parametrize("symmetric", [True, False])
def test_every_width_takes_exactly_its_bits_on_disk(tmp_path, symmetric: bool) -> None:
    from engine.mixed_precision import layer_bytes
    from engine.quant import bits_per_weight, packed_nbytes

    sizes = {}
    for bits in ALL_BITS:
        model = _odd_model()
        report = quantize_(model, RTNConfig(bits={"conv": bits, "linear": bits}, symmetric=symmetric))
        path = tmp_path / f"w{bits}.safetensors"
        size = save_packed(path, model, report.packed)
        _assert_round_trip(path, model)
        parts = packed_breakdown(path)
        counts = [qt.codes.numel() for qt in report.packed.values()]
        assert parts["codes"] == sum(-(-n * bits // 8) for n in counts), bits  # dense, per layer
        channels = sum(qt.shape[0] for qt in report.packed.values())
        assert parts["scales"] == 2 * channels and parts["zeros"] == (0 if symmetric else channels)
        stored = 8 * (parts["codes"] + parts["scales"] + parts["zeros"]) / sum(counts)
        assert bits_per_weight(path) == pytest.approx(stored)
        # codes padded by less than a byte per layer, 16 bits of scale (+ 8 of zero) per channel
        assert bits <= bits_per_weight(path) < bits + (8 * len(counts) + 24 * channels) / sum(counts)
        # The torch-free size model of the Fisher budget and the exact size agree.
        modules = dict(model.named_modules())
        per_layer = sum(layer_bytes(tuple(modules[n].weight.shape), modules[n].bias is not None, bits, symmetric)
                        for n in report.packed)
        assert per_layer == parts["codes"] + parts["scales"] + parts["zeros"] + parts["biases"]
        assert packed_nbytes(model.state_dict(), report.packed) == size
        sizes[bits] = parts["codes"]
    assert all(sizes[b] < sizes[b + 1] for b in range(2, 8)), sizes  # W3 < W4, W6 < W8, ...


def _as_version_2(tensors: dict, info: dict) -> dict:
    """The same file in format version 2: codes 4 (2 bits), 2 (3, 4 bits) or 1 (5..8) per byte."""
    import math

    from engine.quant.packing import code_bytes

    codes, pos, out = tensors["quant.codes"], 0, []
    for _, bits, _, shape, *_ in info["layers"]:
        n = math.prod(shape)
        values = unpack_codes(codes[pos : pos + code_bytes(n, bits)], bits, n)
        pos += code_bytes(n, bits)
        per_byte = 4 if bits <= 2 else 2 if bits <= 4 else 1
        width = 8 // per_byte
        padded = torch.cat([values, values.new_zeros((-n) % per_byte)]).to(torch.int32).reshape(-1, per_byte)
        out.append((padded << (torch.arange(per_byte, dtype=torch.int32) * width)).sum(1).to(torch.uint8))
    return {**tensors, "quant.codes": torch.cat(out)}


def test_version_2_files_still_load(tmp_path) -> None:
    model = _odd_model()
    report = quantize_(model, RTNConfig(bits={"conv": 3, "linear": 6}, layer_bits={"3": 2}, symmetric=False))
    path = tmp_path / "v3.safetensors"
    save_packed(path, model, report.packed)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = json.loads(f.metadata()["qtui_quant"])
    old = _as_version_2(tensors, info)
    assert old["quant.codes"].numel() == (135 + 1) // 2 + 35 + (21 + 3) // 4  # 3 bits took 4, 6 took 8
    v2 = tmp_path / "v2.safetensors"
    save_file(old, str(v2), metadata={"qtui_quant": json.dumps({**info, "version": 2})})
    _assert_round_trip(v2, model)
    # version 2 codes read as version 3 (or the reverse) do not fit: the sizes differ
    save_file(old, str(tmp_path / "lie.safetensors"), metadata={"qtui_quant": json.dumps(info)})
    with pytest.raises(ValueError, match="quant.codes has"):
        load_packed(tmp_path / "lie.safetensors")


def test_bits_per_weight_of_a_unet_checkpoint(tmp_path, unet) -> None:
    from engine.quant import bits_per_weight

    model = _copy(unet)
    cfg = RTNConfig(bits={"conv": 3, "attention": 6, "linear": 4},
                    layer_bits={"conv_in": 16, "time_embedding.linear_1": 32})
    report = quantize_(model, cfg)
    path = tmp_path / "w.safetensors"
    save_packed(path, model, report.packed, report.half)
    # code bits, scales (16 bits per channel) and nothing else, from the layers themselves
    weights = sum(qt.codes.numel() for qt in report.packed.values())
    code_bits = sum(8 * -(-qt.codes.numel() * qt.bits // 8) for qt in report.packed.values())
    scale_bits = sum(16 * qt.shape[0] for qt in report.packed.values())
    assert "conv_in" not in report.packed and "time_embedding.linear_1" not in report.packed
    assert bits_per_weight(path) == pytest.approx((code_bits + scale_bits) / weights)
    assert 3 < bits_per_weight(path) < 6
    save_dense(tmp_path / "dense.safetensors", model)
    assert bits_per_weight(tmp_path / "dense.safetensors") is None


# --- mixed precision per layer (layer_bits: 2..8, 16 = float16, 32 = full precision) -------


def _mixed_config(model: nn.Module) -> RTNConfig:
    names = [n for n, _, _ in quantizable_layers(model)]
    attention = [n for n, _, r in quantizable_layers(model) if r == "attention"]
    layer_bits = {"conv_in": 16, attention[0]: 32, "time_embedding.linear_1": 3, names[-1]: 16}
    return RTNConfig(bits={"conv": 4, "attention": 8, "linear": 6}, layer_bits=layer_bits)


def test_layer_bits_override_roles_and_round_trip(tmp_path, unet) -> None:
    from engine.mixed_precision import layer_bytes

    model = _copy(unet)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _mixed_config(model)
    report = quantize_(model, cfg)
    after = model.state_dict()
    bits = {e["name"]: e["bits"] for e in report.layers}
    fp16_layers = sorted(n for n, b in cfg.layer_bits.items() if b == 16)
    full = next(n for n, b in cfg.layer_bits.items() if b == 32)
    assert sorted(report.half) == fp16_layers and not set(report.half) & set(report.packed)
    assert bits[full] is None and full not in report.packed
    assert bits["time_embedding.linear_1"] == 3 and report.packed["time_embedding.linear_1"].bits == 3
    for name in fp16_layers:
        assert bits[name] == 16
        for part in ("weight", "bias"):
            assert torch.equal(after[f"{name}.{part}"], before[f"{name}.{part}"].half().float())
    for part in ("weight", "bias"):  # the full-precision layer is untouched, bias included
        key = f"{full}.{part}"
        if key in before:
            assert torch.equal(after[key], before[key])
    # Layers not named keep their role's bits.
    roles = {n: r for n, _, r in quantizable_layers(model)}
    for name, b in bits.items():
        if name not in cfg.layer_bits:
            assert b == cfg.bits[roles[name]], name

    path = tmp_path / "mixed.safetensors"
    size = save_packed(path, model, report.packed, report.half)
    _assert_round_trip(path, model)
    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()["qtui_quant"])
        assert info["half"] == fp16_layers
        assert f.get_tensor("conv_in.weight").dtype == torch.float16
        assert f.get_tensor(f"{full}.weight").dtype == torch.float32
    # The size is known exactly without writing, and per layer as engine.mixed_precision says.
    from engine.quant import packed_nbytes

    assert packed_nbytes(model.state_dict(), report.packed, report.half) == size
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    modules = dict(model.named_modules())
    per_layer = sum(layer_bytes(tuple(modules[n].weight.shape), modules[n].bias is not None, b or 32, True)
                    for n, b in bits.items())
    owned = {f"{n}.{p}" for n in bits for p in ("weight", "bias")}
    rest = sum(t.numel() * 4 for k, t in after.items() if k not in owned)
    assert header + per_layer + rest == size


def test_layer_bits_validation_and_backward_compatible_dict(unet) -> None:
    plain = RTNConfig(bits={"conv": 4})
    assert plain.to_dict() == {"bits": {"conv": 4}, "symmetric": True}  # unchanged for plain RTN
    cfg = RTNConfig(bits={"conv": 4}, layer_bits={"conv_in": 16, "conv_out": 32, "x": 2})
    assert RTNConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad in (1, 9, 12, 64, 4.0, True):
        with pytest.raises(ValueError, match="'conv_in'"):
            RTNConfig(bits={}, layer_bits={"conv_in": bad})
    with pytest.raises(ValueError, match="does not have: nope"):
        quantize_(_copy(unet), RTNConfig(bits={"conv": 4}, layer_bits={"nope": 4}))


def test_half_layers_must_be_float16_exact_and_listed_truthfully(tmp_path) -> None:
    model = _tiny_model()
    with pytest.raises(ValueError, match="0.weight is not float16-exact"):
        save_packed(tmp_path / "x.safetensors", model, {}, half=["0"])
    report = quantize_(model, RTNConfig(bits={"linear": 4}, layer_bits={"0": 16}))
    path = tmp_path / "ok.safetensors"
    save_packed(path, model, report.packed, report.half)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = json.loads(f.metadata()["qtui_quant"])
    tensors["0.weight"] = tensors["0.weight"].float()  # claims float16 but stores float32
    save_file(tensors, str(tmp_path / "lie.safetensors"), metadata={"qtui_quant": json.dumps(info)})
    with pytest.raises(ValueError, match="listed as float16"):
        load_packed(tmp_path / "lie.safetensors")
