"""`quantize_(model, config)`: quantize a model's weights in place (torchao-style verb).

Weights are replaced by their simulated (quantize-then-dequantize) values, so the model keeps
its architecture and runs at full-precision cost; the integer codes are returned alongside so
that `packing.save_packed` can write the real low-bit storage.
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


def quantize_(model: nn.Module, config: RTNConfig) -> QuantReport:
    """Quantize every layer whose role has bits in `config`, replacing weights in place.

    `layers` has one entry per quantizable layer in model order, with keys name, role,
    params (weight numel), bits (None if left full precision) and weight_err (relative
    Frobenius error of the stored weight, None if left full precision). Biases are untouched.
    """
    report = QuantReport()
    for name, module, role in quantizable_layers(model):
        bits = config.bits.get(role)
        weight = module.weight
        entry: dict[str, Any] = {
            "name": name,
            "role": role,
            "params": weight.numel(),
            "bits": bits,
            "weight_err": None,
        }
        if bits is not None:
            qt = quantize_tensor(weight.data, bits, config.symmetric)
            original = weight.data.float().clone()
            with torch.no_grad():
                weight.copy_(dequantize(qt, dtype=weight.dtype))
            entry["weight_err"] = relative_error(original, weight.data)
            report.packed[name] = qt
        report.layers.append(entry)
    return report
