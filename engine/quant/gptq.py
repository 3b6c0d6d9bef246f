"""GPTQ (Frantar et al., 2022): error-compensating weight quantization of a Linear layer.

For a layer y = x W^T, GPTQ minimises the layer-output error over calibration inputs,
sum_tokens ||x W^T - x W_hat^T||^2, one input column at a time. The objective only depends on
the input Hessian H = 2/n sum_tokens x x^T, which `GPTQ.add_batch` accumulates as a running
average (O(in^2) memory, raw activations are never kept). `GPTQ.quantize` then sweeps the
columns: each column is rounded to its grid and its rounding error, scaled by the upper Cholesky
factor U of H^-1 (H^-1 = U^T U), is spread over the columns not yet quantized.

The grid is fixed before the sweep: one scale and zero point per output channel and group of
`group_size` consecutive input columns, in the ORIGINAL column order, computed from the weights
with exactly the formulas of `engine.quant.rtn` (float16 scale rounded upwards; the columns of
dead inputs, zero in every calibration token, are set to zero first). So the result
is stored in the same format as RTN (uint8 codes, float16 scales, uint8 zeros), and act-order
(columns processed by decreasing diag(H)) needs no reordering at inference: the codes are
returned in the original column order and `(code - zero) * scale` with each column's own group
parameters gives the quantized weight, bit for bit.

Columns are processed in blocks of `block_size`: inside a block the error of each column is
applied to the rest of the block only, and the rest of the matrix is updated once per block
with a matrix product (the paper's "lazy batch" updates). `lazy=False` applies every column's
error to all remaining columns at once (column by column); both give the same result up to
float rounding.

The proxy loss returned is sum over columns of err^2 / (2 U_ii^2), which equals
1/2 tr((W - W_hat) H' (W - W_hat)^T) for the dampened Hessian H': with H = 2/n X^T X and no
dampening this is the mean over calibration tokens of ||x W^T - x W_hat^T||^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from engine.quant.rtn import QuantizedTensor, check_bits, quantize_tensor


@dataclass
class GroupedQuant:
    """uint8 codes [out, in] with float16 scales and uint8 zeros per (output channel, group)."""

    codes: torch.Tensor  # uint8 [out, in], values in 0 .. 2^bits - 1, original column order
    scales: torch.Tensor  # float16 [out, n_groups]
    zeros: torch.Tensor  # uint8 [out, n_groups]; 2^(bits-1) everywhere when symmetric
    bits: int
    symmetric: bool
    group_size: int  # input columns per group (in_features for one group per output channel)

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    def dequantize(self) -> torch.Tensor:
        """The quantized weight (float32): `(code - zero) * scale` with each column's group."""
        return dequantize_grouped(self.codes, self.scales, self.zeros, self.group_size)

    def per_channel(self) -> QuantizedTensor:
        """The same quantization as an RTN-format `QuantizedTensor` (one group per channel only)."""
        if self.n_groups != 1:
            raise ValueError(f"{self.n_groups} groups per channel do not fit a per-channel QuantizedTensor")
        return QuantizedTensor(
            codes=self.codes, scale=self.scales[:, 0].clone(), zero=self.zeros[:, 0].clone(),
            bits=self.bits, symmetric=self.symmetric, shape=tuple(self.codes.shape),
        )


@dataclass
class GPTQResult(GroupedQuant):
    """GPTQ's quantization of one layer: the stored format plus the simulated weight and loss."""

    weight: torch.Tensor  # float32 [out, in], equal to self.dequantize()
    loss: float  # proxy loss, see the module docstring


def dequantize_grouped(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       group_size: int) -> torch.Tensor:
    """`(codes - zero) * scale` in float32, column j using group j // group_size."""
    scale = scales.float().repeat_interleave(group_size, dim=1)
    zero = zeros.float().repeat_interleave(group_size, dim=1)
    return (codes.float() - zero) * scale


def _group_size(group_size: object, in_features: int) -> int:
    if group_size is None:
        return in_features
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    return group_size


def rtn_grouped(weight: torch.Tensor, bits: int, symmetric: bool = True,
                group_size: int | None = None) -> GroupedQuant:
    """Round-to-nearest with one grid per (output channel, group of `group_size` columns).

    Uses `rtn.quantize_tensor` on the weight viewed as [out * n_groups, group_size], so the grid
    rule is RTN's exactly; with `group_size=None` it is RTN per output channel.
    """
    check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    out, cols = weight.shape
    size = _group_size(group_size, cols)
    qt = quantize_tensor(weight.detach().reshape(out * (cols // size), size), bits, symmetric)
    return GroupedQuant(
        codes=qt.codes.reshape(out, cols), scales=qt.scale.reshape(out, -1),
        zeros=qt.zero.reshape(out, -1), bits=bits, symmetric=symmetric, group_size=size,
    )


class GPTQ:
    """Collects the input Hessian of one nn.Linear, then quantizes its weight with GPTQ."""

    def __init__(self, layer: nn.Linear, name: str = "") -> None:
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"GPTQ handles nn.Linear layers, got {type(layer).__name__}")
        self.layer = layer
        self.name = name or "layer"
        self.in_features = layer.in_features
        w = layer.weight
        self.H = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=w.device)
        self.nsamples = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Add calibration inputs of shape [..., in_features] (each row one token) to H."""
        if inputs.dim() < 1 or inputs.shape[-1] != self.in_features:
            raise ValueError(f"{self.name}: inputs of shape {tuple(inputs.shape)} do not end in "
                             f"in_features={self.in_features}")
        x = inputs.detach().reshape(-1, self.in_features).to(self.H.device, torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        total = self.nsamples + m
        # H <- n/(n+m) H + 2/(n+m) x^T x: the running mean of 2 x x^T over all tokens so far.
        self.H.addmm_(x.T, x, beta=self.nsamples / total, alpha=2.0 / total)
        self.nsamples = total

    def _inverse_factor(self, H: torch.Tensor, damp: float) -> torch.Tensor:
        """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, computed in float64
        (each float64 matrix is dropped once the next is made: two alive at a time)."""
        H = H.double()
        H.diagonal().add_(damp * H.diagonal().mean())
        hint = f"; try a larger damp than {damp}"
        L, info = torch.linalg.cholesky_ex(H)
        del H
        if info.item() != 0:
            raise ValueError(f"GPTQ: the Hessian of {self.name} is not positive definite even "
                             f"after dampening{hint}")
        inverse = torch.cholesky_inverse(L)
        del L
        U, info = torch.linalg.cholesky_ex(inverse, upper=True)
        del inverse
        if info.item() != 0:
            raise ValueError(f"GPTQ: the inverse Hessian of {self.name} is numerically not "
                             f"positive definite{hint}")
        return U.float()

    @torch.no_grad()
    def quantize(self, bits: int, symmetric: bool = True, group_size: int | None = None,
                 act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                 lazy: bool = True) -> GPTQResult:
        """Quantize the layer's weight (the layer itself is not modified) and return the result."""
        check_bits(bits)
        size = _group_size(group_size, self.in_features)
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not (0 < damp < math.inf):
            raise ValueError(f"damp must be a finite number > 0, got {damp!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if self.nsamples == 0:
            raise ValueError(f"GPTQ: empty calibration set for {self.name}: call add_batch first")
        if not torch.isfinite(self.H).all():
            raise ValueError(f"GPTQ: the Hessian of {self.name} has inf or nan entries")

        W = self.layer.weight.detach().float().clone()
        H = self.H.clone()
        # Inputs that are always zero: the weight never matters; zero it and make H invertible.
        dead = H.diagonal() == 0
        H.diagonal()[dead] = 1.0
        W[:, dead] = 0.0
        grid = rtn_grouped(W, bits, symmetric, size)
        cols = self.in_features
        order = torch.arange(cols, device=W.device)
        if act_order:
            order = torch.argsort(H.diagonal(), descending=True, stable=True)
            H = H[order][:, order]
        U = self._inverse_factor(H, damp)
        del H  # only U is needed from here

        # Work on the transpose: column j of W is row j of Wt, contiguous. Per-column grid
        # parameters follow each column to its place in the processing order.
        group = order // size
        Wt = W.T[order].contiguous()
        scale = grid.scales.float().T[group].contiguous()
        zero = grid.zeros.float().T[group].contiguous()
        codes = torch.empty_like(Wt)
        qmax = 2**bits - 1
        block = block_size if lazy else cols
        loss = 0.0
        for i1 in range(0, cols, block):
            i2 = min(i1 + block, cols)
            Wb, Ub = Wt[i1:i2], U[i1:i2, i1:i2]
            err = torch.empty_like(Wb)
            for i in range(i2 - i1):
                w, s, z = Wb[i], scale[i1 + i], zero[i1 + i]
                c = torch.round(w / s).add_(z).clamp_(0, qmax)
                codes[i1 + i] = c
                err[i] = (w - (c - z) * s) / Ub[i, i]
                # Rank-1 update as a k=1 matrix product: much faster than addr_ on CPU.
                Wb[i + 1:].addmm_(Ub[i, i + 1:, None], err[i, None], alpha=-1.0)
            Wt[i2:].addmm_(U[i1:i2, i2:].T, err, alpha=-1.0)
            loss += 0.5 * err.double().square().sum().item()

        in_order = torch.empty_like(codes)
        in_order[order] = codes  # back to the original column order
        result_codes = in_order.T.contiguous().to(torch.uint8)
        return GPTQResult(
            codes=result_codes, scales=grid.scales, zeros=grid.zeros, bits=bits,
            symmetric=symmetric, group_size=size, loss=loss,
            weight=dequantize_grouped(result_codes, grid.scales, grid.zeros, size),
        )
