"""Quantizers of attention probabilities (softmax outputs, values in [0, 1]).

log2 (DGQ):  code = clamp(round(-log2(x / delta)), 0, 2^bits - 1),  x_hat = delta * 2^-code.
    Levels are delta, delta/2, delta/4, ...: the many small probabilities keep their order of
    magnitude, which a uniform grid rounds to zero. x = 0 gets the smallest level; values
    above delta are clipped to delta.
uniform:     code = clamp(round(x / s + z), 0, 2^bits - 1),  x_hat = (code - z) * s, over
    [lo, hi] (s = (hi - lo) / (2^bits - 1), z = round(-lo / s)): the min-max baseline's grid
    (lo, hi the calibrated min and max), and DGQ's "no log quantizer" ablation (lo = 0,
    hi = delta).

`delta` may be a scalar or broadcast against x (one value per prompt, [B, 1, 1, 1]).
`choose_delta` picks delta among a few high percentiles of calibration values by the least
squared error of the quantizer itself.
"""

from __future__ import annotations

import torch

PERCENTILES = (0.999, 0.9999, 0.99999, 1.0)


def _safe(delta: torch.Tensor) -> torch.Tensor:
    return torch.where(delta > 0, delta, torch.ones_like(delta))


def log2_codes(x: torch.Tensor, delta: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.round(-torch.log2(x / _safe(delta))).clamp_(0, 2**bits - 1)


# round(log2 y) for a normal float32 y = 2^E (1 + f) is E + [f > sqrt(2) - 1]. With the
# mantissa bits M = f 2^23 (an integer; (sqrt(2) - 1) 2^23 is not), that is M >= 3474676:
# adding 2^23 - 3474676 to the bit pattern carries into the exponent exactly then, and
# clearing the mantissa leaves 2^round(log2 y). Cheaper than log2 and exp2 (bench/bench_dgq.py).
_CARRY = 2**23 - 3474676
_EXPONENT_MASK = -(2**23)  # 0xFF800000 as int32: sign and exponent bits


def nearest_power_of_two(y: torch.Tensor) -> torch.Tensor:
    """2^round(log2 y) for a float32 y >= 0 (0 stays 0), computed on the bit pattern; in place."""
    bits = y.view(torch.int32)
    bits.add_(_CARRY).bitwise_and_(_EXPONENT_MASK)
    return y


def log2_fake_quant(x: torch.Tensor, delta: torch.Tensor, bits: int) -> torch.Tensor:
    """delta * 2^-clamp(round(-log2(x / delta)), 0, 2^bits - 1), as `log2_codes` (x >= 0)."""
    delta = _safe(delta).float()
    y = nearest_power_of_two(x.to(torch.float32, copy=True).div_(delta))  # one float32 copy of x, also from half
    smallest = 2.0 ** -(2**bits - 1)  # the last level (0 in float32 for 8 bits: 2^-255 underflows)
    return y.clamp_(smallest, 1.0).mul_(delta).to(x.dtype)


def log2_dequantize(codes: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return torch.exp2(-codes) * delta


def uniform_fake_quant(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2**bits - 1
    width = hi - lo
    s = torch.where(width > 0, width / qmax, torch.ones_like(width)).to(x.dtype)
    z = torch.round(-lo.to(x.dtype) / s)
    return torch.addcmul(z, x, 1 / s).round_().clamp_(0, qmax).sub_(z).mul_(s)


def fake_quant(x: torch.Tensor, delta: torch.Tensor, bits: int, log: bool) -> torch.Tensor:
    """DGQ's attention quantizer: log2 below delta, or (log = False) uniform over [0, delta]."""
    if log:
        return log2_fake_quant(x, delta, bits)
    return uniform_fake_quant(x, torch.zeros_like(delta), delta, bits)


def choose_delta(values: torch.Tensor, bits: int, log: bool, percentiles=PERCENTILES) -> float:
    """The delta among the given percentiles of `values` with the least squared error."""
    flat = values.detach().float().reshape(-1)
    if flat.numel() == 0:
        raise ValueError("no calibration values to choose delta from")
    best, best_err = None, float("inf")
    candidates = torch.quantile(flat.double(), torch.tensor(percentiles, dtype=torch.float64)).float()
    for delta in candidates:
        err = (fake_quant(flat, delta, bits, log) - flat).pow(2).sum().item()
        if err < best_err:
            best, best_err = float(delta), err
    return best
