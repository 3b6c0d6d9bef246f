"""Tests for engine.quant: RTN error bounds, roles, quantize_, packing and on-disk sizes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
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

ALL_BITS = range(2, 9)


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
            # Signed codes never reach -2^(bits-1): the range is symmetric around zero.
            assert int(qt.codes.min()) >= 1


def test_symmetric_quantization_is_idempotent() -> None:
    w = _weights("gaussian", (16, 64))
    w[3] = 0.0  # an all-zero channel
    w[5] *= 1e-6  # a channel whose scale is a float16 subnormal
    for bits in ALL_BITS:
        w_hat = fake_quantize(w, bits)
        assert torch.equal(fake_quantize(w_hat, bits), w_hat)


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
            assert torch.equal(before[f"{name}.bias"], after[f"{name}.bias"])
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


def test_pack_unpack_round_trip() -> None:
    g = torch.Generator().manual_seed(2)
    for bits in ALL_BITS:
        for numel in (1, 7, 64, 101):
            codes = torch.randint(0, 2**bits, (numel,), generator=g).to(torch.uint8)
            packed = pack_codes(codes, bits)
            per_byte = 4 if bits <= 2 else 2 if bits <= 4 else 1
            assert packed.dtype == torch.uint8 and packed.numel() == -(-numel // per_byte)
            assert torch.equal(unpack_codes(packed, bits, numel), codes)
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([4], dtype=torch.uint8), 2)


@pytest.mark.parametrize("symmetric", [True, False])
def test_save_load_packed_reproduces_simulated_weights(tmp_path, unet, symmetric: bool) -> None:
    for bits in (2, 3, 4, 8):
        model = type(unet).from_config(unet.config)
        model.load_state_dict(unet.state_dict())
        cfg = RTNConfig(bits={"conv": bits, "attention": 8, "linear": 4}, symmetric=symmetric)
        report = quantize_(model, cfg)
        path = tmp_path / f"w{bits}.safetensors"
        save_packed(path, model, report.packed)
        state = load_packed(path)
        expected = model.state_dict()
        assert state.keys() == expected.keys()
        for key, t in expected.items():
            assert state[key].dtype == torch.float32 and torch.equal(state[key], t), key
        fresh = type(unet).from_config(unet.config)
        fresh.load_state_dict(state, strict=True)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["qtui_quant"])["layers"]
        has_zero = any(k.endswith(".weight.zero") for k in f.keys())
    assert meta["conv_in"] == {"bits": 8, "symmetric": symmetric, "shape": [8, 1, 3, 3]}
    assert has_zero == (not symmetric)


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
