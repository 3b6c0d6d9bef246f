"""`quantize_(model, config)`: quantize a model's weights in place (torchao-style verb).

Weights are replaced by their simulated (quantize-then-dequantize) values, and the biases of
quantized layers are rounded to float16, so the model keeps its architecture and runs at
full-precision cost while holding exactly the values the packed checkpoint stores; the integer
codes are returned alongside so that `packing.save_packed` can write the real low-bit storage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from engine.quant.roles import ROLES, quantizable_layers
from engine.quant.rtn import QuantizedTensor, check_bits, dequantize, quantize_tensor, relative_error


@dataclass
class RTNConfig:
    """Round-to-nearest config: bits per role; roles not listed stay full precision."""

    bits: dict[str, int]
    symmetric: bool = True

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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; `RTNConfig.from_dict` inverts it."""
        return {"bits": dict(self.bits), "symmetric": self.symmetric}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RTNConfig:
        """Build a config from `to_dict()` output (e.g. read back from JSON)."""
        unknown = set(d) - {"bits", "symmetric"}
        if unknown:
            raise ValueError(f"unknown RTNConfig keys: {', '.join(sorted(unknown))}")
        return cls(bits=dict(d["bits"]), symmetric=d.get("symmetric", True))


@dataclass
class QuantReport:
    """Per-layer results of `quantize_` and the codes of every quantized layer."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    packed: dict[str, QuantizedTensor] = field(default_factory=dict)


# One layer's planned change: name, module, role, bits, codes and float16 bias (None if unchanged).
_Step = tuple[str, nn.Module, str, "int | None", "QuantizedTensor | None", "torch.Tensor | None"]


def quantize_(model: nn.Module, config: RTNConfig) -> QuantReport:
    """Quantize every layer whose role has bits in `config`, replacing weights in place.

    The weight of each quantized layer becomes its simulated value `dequantize(codes)`, and
    its bias (if any) is rounded to the nearest float16 and stored back in the module's
    dtype: the packed checkpoint keeps those biases as float16, so this rounding is what
    makes loading the checkpoint reproduce the quantized model exactly. Layers that are not
    quantized, and every other parameter or buffer (norms, embeddings, ...), are untouched.

    Every layer is quantized before any is modified, so an error (e.g. a weight with inf or
    nan values, or a bias outside the float16 range) leaves the model unchanged.

    `layers` has one entry per quantizable layer in model order, with keys name, role,
    params (weight numel), bits (None if left full precision) and weight_err (relative
    Frobenius error of the stored weight, None if left full precision).
    """
    plan: list[_Step] = []
    for name, module, role in quantizable_layers(model):
        bits = config.bits.get(role)
        qt = bias16 = None
        if bits is not None:
            qt = quantize_tensor(module.weight.data, bits, config.symmetric)
            if module.bias is not None:
                bias16 = _fp16_bias(name, module.bias.data)
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
            with torch.no_grad():
                weight.copy_(dequantize(qt, dtype=weight.dtype))
                if bias16 is not None:
                    module.bias.copy_(bias16.to(module.bias.dtype))
            entry["weight_err"] = relative_error(original, weight.data)
            report.packed[name] = qt
        report.layers.append(entry)
    return report


def _fp16_bias(name: str, bias: torch.Tensor) -> torch.Tensor:
    """`bias` rounded to the nearest float16 (a new tensor); ValueError if it overflows."""
    if not torch.isfinite(bias).all():
        raise ValueError(f"{name}: cannot quantize a layer whose bias has inf or nan values")
    b16 = bias.detach().to(torch.float16)
    # The rounded value must survive the trip back to the module's dtype (e.g. bfloat16).
    back = b16.to(bias.dtype).to(torch.float16)
    if not torch.isfinite(b16).all() or not torch.isfinite(back).all():
        raise ValueError(f"{name}: bias values exceed the float16 range")
    return b16
