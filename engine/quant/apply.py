"""`quantize_(model, config)`: quantize a model's weights in place (torchao-style verb).

Weights are replaced by their simulated (quantize-then-dequantize) values, and the biases of
quantized layers are rounded to float16, so the model keeps its architecture and runs at
full-precision cost while holding exactly the values the packed checkpoint stores; the integer
codes are returned alongside so that `packing.save_packed` can write the real low-bit storage.

Mixed precision per layer: `RTNConfig.layer_bits` maps layer names to 2..8 (integer codes),
16 (weight and bias rounded to float16 and stored as float16) or 32 (left full precision),
overriding the bits of the layer's role.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from engine.quant.roles import ROLES, quantizable_layers
from engine.quant.rtn import QuantizedTensor, check_bits, dequantize, quantize_tensor, relative_error

FP16_BITS, FP32_BITS = 16, 32  # per-layer "bits" meaning float16 storage / full precision


@dataclass
class RTNConfig:
    """Round-to-nearest config: bits per role; roles not listed stay full precision.

    `layer_bits` (optional) gives named layers their own precision, overriding their role:
    2..8 bits, 16 (float16) or 32 (full precision)."""

    bits: dict[str, int]
    symmetric: bool = True
    layer_bits: dict[str, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.bits, dict):
            raise ValueError(f"bits must be a dict role -> int, got {type(self.bits).__name__}")
        for role, b in self.bits.items():
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r}; valid roles are {', '.join(ROLES)}")
            try:
                check_bits(b)
            except ValueError as e:
                raise ValueError(f"role {role!r}: {e}") from None
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be a bool, got {self.symmetric!r}")
        if self.layer_bits is not None:
            if not isinstance(self.layer_bits, dict):
                raise ValueError(f"layer_bits must be a dict name -> int, got {type(self.layer_bits).__name__}")
            for name, b in self.layer_bits.items():
                if not isinstance(name, str):
                    raise ValueError(f"layer_bits keys must be layer names, got {name!r}")
                if b in (FP16_BITS, FP32_BITS) and type(b) is int:
                    continue
                try:
                    check_bits(b)
                except ValueError as e:
                    raise ValueError(f"layer {name!r}: {e}, or 16 (float16) or 32 (full precision)") from None

    def bits_for(self, name: str, role: str) -> int | None:
        """The precision of one layer: 2..8, 16, or None (full precision)."""
        bits = self.bits.get(role)
        if self.layer_bits is not None and name in self.layer_bits:
            bits = self.layer_bits[name]
        return None if bits == FP32_BITS else bits

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; `RTNConfig.from_dict` inverts it."""
        out: dict[str, Any] = {"bits": dict(self.bits), "symmetric": self.symmetric}
        if self.layer_bits is not None:
            out["layer_bits"] = dict(self.layer_bits)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RTNConfig:
        """Build a config from `to_dict()` output (e.g. read back from JSON)."""
        unknown = set(d) - {"bits", "symmetric", "layer_bits"}
        if unknown:
            raise ValueError(f"unknown RTNConfig keys: {', '.join(sorted(unknown))}")
        layer_bits = d.get("layer_bits")
        return cls(bits=dict(d["bits"]), symmetric=d.get("symmetric", True),
                   layer_bits=dict(layer_bits) if layer_bits is not None else None)


@dataclass
class QuantReport:
    """Per-layer results of `quantize_`, the codes of every quantized layer and the names of
    the layers stored as float16."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    packed: dict[str, QuantizedTensor] = field(default_factory=dict)
    half: list[str] = field(default_factory=list)


# One layer's planned change: name, module, role, bits, codes (or the float16 weight for 16
# bits) and float16 bias (None if unchanged).
_Step = tuple[str, nn.Module, str, "int | None", "QuantizedTensor | torch.Tensor | None", "torch.Tensor | None"]


def quantize_(model: nn.Module, config: RTNConfig) -> QuantReport:
    """Quantize every layer whose role has bits in `config`, replacing weights in place.

    The weight of each quantized layer becomes its simulated value `dequantize(codes)`, and
    its bias (if any) is rounded to the nearest float16 and stored back in the module's
    dtype: the packed checkpoint keeps those biases as float16, so this rounding is what
    makes loading the checkpoint reproduce the quantized model exactly. Layers that are not
    quantized, and every other parameter or buffer (norms, embeddings, ...), are untouched.

    Every layer is quantized before any is modified, so an error (e.g. a weight with inf or
    nan values, or a bias outside the float16 range) leaves the model unchanged.

    A layer given 16 bits by `config.layer_bits` has its weight and bias rounded to float16
    (stored back in the module's dtype) and is listed in `report.half`.

    `layers` has one entry per quantizable layer in model order, with keys name, role,
    params (weight numel), bits (None if left full precision) and weight_err (relative
    Frobenius error of the stored weight, None if left full precision).
    """
    layers = quantizable_layers(model)
    if config.layer_bits:
        unknown = sorted(set(config.layer_bits) - {name for name, _, _ in layers})
        if unknown:
            raise ValueError(f"layer_bits names layers the model does not have: {', '.join(unknown[:5])}")
    plan: list[_Step] = []
    for name, module, role in layers:
        bits = config.bits_for(name, role)
        qt = bias16 = None
        if bits == FP16_BITS:
            qt = _fp16(name, "weight", module.weight.data)
        elif bits is not None:
            qt = quantize_tensor(module.weight.data, bits, config.symmetric)
        if bits is not None and module.bias is not None:
            bias16 = _fp16(name, "bias", module.bias.data)
        plan.append((name, module, role, bits, qt, bias16))

    report = QuantReport()
    for name, module, role, bits, qt, bias16 in plan:
        weight = module.weight
        entry: dict[str, Any] = {
            "name": name,
            "role": role,
            "params": weight.numel(),
            "bits": bits,
            "weight_err": None,
        }
        if qt is not None:
            original = weight.data.float().clone()
            stored = qt.to(weight.dtype) if bits == FP16_BITS else dequantize(qt, dtype=weight.dtype)
            with torch.no_grad():
                weight.copy_(stored)
                if bias16 is not None:
                    module.bias.copy_(bias16.to(module.bias.dtype))
            entry["weight_err"] = relative_error(original, weight.data)
            if bits == FP16_BITS:
                report.half.append(name)
            else:
                report.packed[name] = qt
        report.layers.append(entry)
    return report


def _fp16(name: str, what: str, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` rounded to the nearest float16 (a new tensor); ValueError if it overflows."""
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name}: cannot quantize a layer whose {what} has inf or nan values")
    t16 = tensor.detach().to(torch.float16)
    # The rounded value must survive the trip back to the module's dtype (e.g. bfloat16).
    back = t16.to(tensor.dtype).to(torch.float16)
    if not torch.isfinite(t16).all() or not torch.isfinite(back).all():
        raise ValueError(f"{name}: {what} values exceed the float16 range")
    return t16
