"""Tests for engine.quant.gptq: GPTQ against RTN and against the layer-output error it minimises."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.quant.gptq import GPTQ, rtn_grouped
from engine.quant.rtn import dequantize, quantize_tensor

IN, OUT, TOKENS = 64, 32, 512


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The machine is shared with a training job: multi-threaded small ops are much slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _layer(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT)


def _inputs(seed: int = 1) -> torch.Tensor:
    """Correlated calibration inputs X = Z @ A (tokens x in_features)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(TOKENS, IN, generator=g) @ torch.randn(IN, IN, generator=g)


def _gptq(layer: nn.Linear, x: torch.Tensor, name: str = "") -> GPTQ:
    g = GPTQ(layer, name)
    g.add_batch(x)
    return g


def _output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||X W^T - X W_hat^T||^2 in float64."""
    return ((x.double() @ (w.double() - w_hat.double()).T) ** 2).sum().item()


def _reference_dequantize(result) -> torch.Tensor:
    """(code - zero) * scale element by element, column j using group j // group_size."""
    out, cols = result.codes.shape
    w = torch.empty(out, cols)
    for j in range(cols):
        g = j // result.group_size
        w[:, j] = (result.codes[:, j].float() - result.zeros[:, g].float()) * result.scales[:, g].float()
    return w


def test_hessian_is_the_running_mean_over_all_tokens():
    layer, x = _layer(), _inputs()
    g = GPTQ(layer)
    g.add_batch(x[:100])
    g.add_batch(x[100:100])  # an empty batch changes nothing
    g.add_batch(x[100:500].reshape(4, 100, IN))  # [..., in_features]
    g.add_batch(x[500:])
    assert g.nsamples == TOKENS and g.H.shape == (IN, IN)
    reference = 2.0 / TOKENS * x.double().T @ x.double()
    torch.testing.assert_close(g.H.double(), reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [None, 16])
def test_output_error_at_most_rtn(bits, symmetric, act_order, group_size):
    layer, x = _layer(), _inputs()
    res = _gptq(layer, x).quantize(bits, symmetric, group_size, act_order, block_size=16)
    rtn = rtn_grouped(layer.weight, bits, symmetric, group_size).dequantize()
    w = layer.weight.detach()
    assert _output_error(x, w, res.weight) <= _output_error(x, w, rtn)


@pytest.mark.parametrize("act_order", [False, True])
def test_proxy_loss_is_the_quadratic_error_under_the_damped_hessian(act_order):
    layer, x = _layer(), _inputs()
    damp = 0.01
    res = _gptq(layer, x).quantize(4, group_size=16, act_order=act_order, damp=damp, block_size=16)
    H = 2.0 / TOKENS * x.double().T @ x.double()
    lam = damp * H.diagonal().mean()
    H.diagonal().add_(lam)
    delta = layer.weight.detach().double() - res.weight.double()
    expected = 0.5 * torch.einsum("oi,ij,oj->", delta, H, delta).item()
    assert res.loss == pytest.approx(expected, rel=1e-4)
    # Minus the dampening term, it is the mean output error per calibration token.
    per_token = _output_error(x, layer.weight.detach(), res.weight) / TOKENS
    damp_term = 0.5 * lam.item() * delta.square().sum().item()
    assert res.loss - damp_term == pytest.approx(per_token, rel=1e-4)


def test_per_channel_matches_rtn_module():
    w = _layer().weight.detach()
    grouped = rtn_grouped(w, 4, False, None)
    qt = quantize_tensor(w, 4, False)
    assert torch.equal(grouped.codes, qt.codes) and torch.equal(grouped.scales[:, 0], qt.scale)
    assert torch.equal(grouped.dequantize(), dequantize(qt))
    assert torch.equal(dequantize(grouped.per_channel()), dequantize(qt))


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_gives_rtn_exactly(bits, symmetric, group_size, act_order):
    layer = _layer()
    g = _gptq(layer, 3.0 * torch.eye(IN))  # H = 2/64 * 9 * I exactly: no error to propagate
    assert torch.equal(g.H, torch.eye(IN) * (2.0 * 9.0 / IN))
    res = g.quantize(bits, symmetric, group_size, act_order, block_size=16)
    rtn = rtn_grouped(layer.weight, bits, symmetric, group_size)
    assert torch.equal(res.codes, rtn.codes)
    assert torch.equal(res.weight, rtn.dequantize())


@pytest.mark.parametrize("symmetric", [True, False])
def test_act_order_with_diagonal_hessian_returns_rtn_codes_in_original_order(symmetric):
    # A diagonal Hessian with distinct entries: act-order processes the columns in a shuffled
    # order, yet nothing propagates, so the codes must be RTN's, column for column.
    layer = _layer()
    diag = torch.randperm(IN, generator=torch.Generator().manual_seed(3)).float() + 1.0
    res = _gptq(layer, torch.diag(diag)).quantize(3, symmetric, 16, act_order=True, block_size=8)
    assert torch.equal(res.codes, rtn_grouped(layer.weight, 3, symmetric, 16).codes)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [None, 8])
def test_lazy_and_column_by_column_agree(act_order, group_size):
    layer, x = _layer(), _inputs()
    g = _gptq(layer, x)
    col = g.quantize(4, group_size=group_size, act_order=act_order, lazy=False)
    for block_size in (1, 7, 16, 128):
        lazy = g.quantize(4, group_size=group_size, act_order=act_order, block_size=block_size)
        torch.testing.assert_close(lazy.weight, col.weight, rtol=0, atol=1e-6)
        assert lazy.loss == pytest.approx(col.loss, rel=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
def test_act_order_groups_codes_reproduce_the_weight(symmetric):
    layer, x = _layer(), _inputs()
    bits, group = 3, 16
    res = _gptq(layer, x).quantize(bits, symmetric, group, act_order=True, block_size=16)
    assert res.codes.dtype == torch.uint8 and res.codes.shape == (OUT, IN)
    assert res.scales.dtype == torch.float16 and res.scales.shape == (OUT, IN // group)
    assert res.zeros.dtype == torch.uint8 and res.zeros.shape == (OUT, IN // group)
    assert int(res.codes.max()) <= 2**bits - 1
    if symmetric:
        assert torch.all(res.zeros == 2 ** (bits - 1))
    assert torch.equal(_reference_dequantize(res), res.weight)
    # The grid is the RTN grid of the original weights, group by group.
    rtn = rtn_grouped(layer.weight, bits, symmetric, group)
    assert torch.equal(res.scales, rtn.scales) and torch.equal(res.zeros, rtn.zeros)


def test_dead_inputs_get_zero_weight():
    layer, x = _layer(), _inputs()
    x[:, [5, 40]] = 0.0
    res = _gptq(layer, x).quantize(4, group_size=16, act_order=True, block_size=16)
    assert torch.all(res.weight[:, [5, 40]] == 0)
    assert torch.equal(res.codes[:, 5], res.zeros[:, 0]) and torch.equal(res.codes[:, 40], res.zeros[:, 2])
    assert torch.isfinite(res.weight).all() and res.loss > 0


def test_validation_errors():
    layer, x = _layer(), _inputs()
    with pytest.raises(ValueError, match="empty calibration set"):
        GPTQ(layer).quantize(4)
    with pytest.raises(ValueError, match="in_features"):
        GPTQ(layer).add_batch(torch.randn(10, IN + 1))
    g = _gptq(layer, x)
    for bits in (1, 9, True, 4.0):
        with pytest.raises(ValueError, match="bits"):
            g.quantize(bits)
    for group_size in (10, 0, -8):
        with pytest.raises(ValueError, match="group_size"):
            g.quantize(4, group_size=group_size)
    for damp in (0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="damp"):
            g.quantize(4, damp=damp)
    with pytest.raises(TypeError):
        GPTQ(nn.Conv2d(3, 3, 1))


def test_non_positive_definite_hessian_names_the_layer():
    g = GPTQ(_layer(), name="down.0.attn1.to_q")
    q, _ = torch.linalg.qr(torch.randn(IN, IN, generator=torch.Generator().manual_seed(4)))
    eig = torch.linspace(1.0, 2.0, IN)
    eig[7] = -0.5
    g.H = (q * eig) @ q.T  # positive diagonal, one negative eigenvalue
    g.nsamples = 1
    with pytest.raises(ValueError, match=r"down\.0\.attn1\.to_q.*not positive definite.*larger damp"):
        g.quantize(4, damp=1e-6)
    g.quantize(4, damp=1.0)  # enough dampening makes it positive definite
