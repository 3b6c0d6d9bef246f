"""Round-to-nearest (RTN) weight quantization, one scale per output channel.

A weight of shape [out, ...] (Linear [out, in], Conv2d [out, in, kh, kw], ...) is quantized
row by row along dim 0. Codes are stored unsigned (0 .. 2^bits - 1) with a per-channel zero
point, so `w_hat = (code - zero) * scale`.

Both modes use the full grid of 2^bits codes. Asymmetric: the channel's range [min, max]
(widened to contain 0) is split into 2^bits - 1 steps. Symmetric (as GPTQ's reference
quantizer): the range [-absmax, absmax] is split the same way, scale = 2 absmax / (2^bits - 1),
with the mid code 2^(bits-1) as zero, so that 0 is exact and the signed codes run from
-2^(bits-1) to 2^(bits-1) - 1. (A grid restricted to +-(2^(bits-1) - 1), one code unused, has
a step larger by (2^bits - 1) / (2^bits - 2): x1.07 at 4 bits, x1.17 at 3, x1.5 at 2.)

The scale is rounded to float16 *before* the codes are computed, and the codes are computed
with that float16 value, so the simulated weight (`dequantize`) equals what a float16-scale
storage format reproduces, bit for bit. The float16 rounding is done upwards (never below the
exact scale), which keeps every weight inside the representable range: no element is clipped
and each element's error is at most half a step, `|w_hat - w| <= scale / 2`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_BITS = 2
MAX_BITS = 8


@dataclass
class QuantizedTensor:
    """Integer codes plus per-output-channel float16 scale and uint8 zero point; or, with
    `group_size` (a 2-D weight, as GPTQ's groups), one scale and zero per output channel and
    group of `group_size` consecutive input columns, channel-major ([out * n_groups])."""

    codes: torch.Tensor  # uint8, same shape as the weight, values in 0 .. 2^bits - 1
    scale: torch.Tensor  # float16, [out_channels] (or [out_channels * n_groups])
    zero: torch.Tensor  # uint8, like scale; 2^(bits-1) everywhere when symmetric
    bits: int
    symmetric: bool
    shape: tuple[int, ...]
    group_size: int | None = None  # None: one group per output channel

    @property
    def n_grids(self) -> int:
        """How many scales (and zeros): output channels x groups."""
        if self.group_size is None:
            return self.shape[0]
        return self.shape[0] * (self.shape[1] // self.group_size)


def check_bits(bits: object) -> int:
    """Return `bits` if it is an int in MIN_BITS..MAX_BITS, else raise ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round a float32 scale to the nearest float16 at or above it; zero becomes 1.0."""
    s16 = scale.to(torch.float16)
    low = s16.float() < scale
    if low.any():
        s16 = torch.where(low, torch.nextafter(s16, torch.full_like(s16, float("inf"))), s16)
    if not torch.isfinite(s16).all():
        raise ValueError("weights too large: the per-channel scale overflows float16")
    # An all-zero channel has scale 0: any positive scale maps it to the zero point exactly.
    return torch.where(s16 == 0, torch.ones_like(s16), s16)


def quantize_tensor(w: torch.Tensor, bits: int, symmetric: bool = True) -> QuantizedTensor:
    """Quantize `w` per output channel (dim 0) to `bits`-bit unsigned codes."""
    check_bits(bits)
    if w.dim() < 1 or w.shape[0] == 0:
        raise ValueError(f"cannot quantize a tensor of shape {tuple(w.shape)}")
    flat = w.detach().float().reshape(w.shape[0], -1)
    if not torch.isfinite(flat).all():
        raise ValueError("cannot quantize a tensor with inf or nan values")
    qmax = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        # |w| / scale <= half - 1/2: +absmax rounds to at most half - 1/2 -> clamped to
        # half - 1 (error scale / 2), -absmax to -half or -half + 1; nothing else is clipped.
        scale = _fp16_scale(2 * flat.abs().amax(dim=1) / qmax)
        signed = torch.round(flat / scale.float()[:, None]).clamp(-half, half - 1)
        codes = signed + half
        zero = torch.full_like(scale, half, dtype=torch.uint8)
    else:
        lo = flat.amin(dim=1).clamp(max=0)
        hi = flat.amax(dim=1).clamp(min=0)
        scale = _fp16_scale((hi - lo) / qmax)
        s32 = scale.float()
        zero_f = torch.round(-lo / s32).clamp(0, qmax)
        codes = (torch.round(flat / s32[:, None]) + zero_f[:, None]).clamp(0, qmax)
        zero = zero_f.to(torch.uint8)
    return QuantizedTensor(
        codes=codes.to(torch.uint8).reshape(w.shape),
        scale=scale,
        zero=zero,
        bits=bits,
        symmetric=symmetric,
        shape=tuple(w.shape),
    )


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct the weight: `(codes - zero) * scale`, per output channel (and group)."""
    out = qt.n_grids  # a grouped weight is [out * n_groups, group_size] rows of one grid each
    centered = qt.codes.reshape(out, -1).float() - qt.zero.float()[:, None]
    return (centered * qt.scale.float()[:, None]).reshape(qt.shape).to(dtype)


def fake_quantize(w: torch.Tensor, bits: int, symmetric: bool = True) -> torch.Tensor:
    """Quantize then dequantize `w` (float32 result): the simulated quantized weight."""
    return dequantize(quantize_tensor(w, bits, symmetric))


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Relative Frobenius error ||w_hat - w|| / ||w|| (0.0 when w is all zeros)."""
    w32 = w.detach().float()
    norm = torch.linalg.vector_norm(w32).item()
    if norm == 0.0:
        return 0.0
    return torch.linalg.vector_norm(w_hat.detach().float() - w32).item() / norm
