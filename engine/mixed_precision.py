"""Per-layer precision plans, torch-free: which group a layer belongs to, what a layer costs in
bytes at each precision in the packed checkpoint, and the checks of a `fisher` variant that need
only the model's layer names and shapes.

Precisions are 2..8 (integer codes), 16 (float16) and 32 (full precision). The byte costs are
those of `engine.quant.packing` (format version 3): codes as a dense bit stream, b bits per
weight (ceil(n * b / 8) bytes for a layer of n weights), a float16 scale per output channel, a uint8 zero point per channel for asymmetric layers, and the bias in
float16 for quantized and float16 layers, in float32 for full-precision ones.

The checks run in the config loader on the shapes read from the model's safetensors header
(`engine.models.layer_shapes`), before any run exists. That header does not say which tensors
belong to Conv/Linear modules, so the checks use two sets: every weight of two or more
dimensions (a superset of the quantizable layers) and the weights that are certainly
Conv/Linear (three or four dimensions, or two with a bias). Each check is sound: it rejects
only configurations that the exact check in the worker would reject too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FP16, FP32 = 16, 32
EVERY_OTHER_LAYER = "*"


class PlanError(ValueError):
    """A precision plan that cannot work for this model: `key` names the offending config key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


@dataclass(frozen=True)
class LayerShape:
    name: str  # module name, e.g. "down_blocks.0.resnets.0.conv1"
    shape: tuple[int, ...]  # weight shape, output channels first
    has_bias: bool
    certain: bool = True  # certainly a Conv/Linear layer (False: maybe an embedding)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelTensors:
    """What a safetensors header says about a denoiser: candidate layers, the float32 bytes of
    every other tensor, the float32 bytes of everything, and the header bytes of its files."""

    layers: list[LayerShape]
    other_fp32_bytes: int
    total_fp32_bytes: int
    header_bytes: int


def code_bytes(numel: int, bits: int) -> int:
    """Bytes of one layer's `bits`-bit codes: `engine.quant.packing.code_bytes`, torch-free."""
    return math.ceil(numel * bits / 8)


def layer_bytes(shape: tuple[int, ...], has_bias: bool, bits: int, symmetric: bool = True) -> int:
    """Bytes one layer's weight and bias take in the packed checkpoint at `bits`."""
    numel, channels = math.prod(shape), shape[0]
    if bits == FP32:
        return 4 * numel + (4 * channels if has_bias else 0)
    if bits == FP16:
        return 2 * numel + (2 * channels if has_bias else 0)
    codes = code_bytes(numel, bits)
    return codes + 2 * channels + (0 if symmetric else channels) + (2 * channels if has_bias else 0)


def matches(name: str, prefix: str) -> bool:
    """Whether a layer name falls under a prefix: the name itself, a dotted parent, or '*'."""
    return prefix == EVERY_OTHER_LAYER or name == prefix or name.startswith(prefix + ".")


def group_of(name: str, groups: list[list[str]]) -> int | None:
    """Index of the first group with a prefix matching `name`, or None."""
    for i, prefixes in enumerate(groups):
        if any(matches(name, p) for p in prefixes):
            return i
    return None


def check_groups(groups: list[list[str]], layers: list[LayerShape]) -> None:
    """Every group names at least one layer; every certain layer belongs to a group."""
    for i, prefixes in enumerate(groups):
        if EVERY_OTHER_LAYER not in prefixes and not any(
            matches(layer.name, p) for layer in layers for p in prefixes
        ):
            raise PlanError("groups", f"group {i + 1} {prefixes} matches no layer of the model")
    orphans = [layer.name for layer in layers if layer.certain and group_of(layer.name, groups) is None]
    if orphans:
        shown = ", ".join(orphans[:3]) + (f" and {len(orphans) - 3} more" if len(orphans) > 3 else "")
        raise PlanError("groups", f"layers in no group: {shown}; end with a group [\"*\"] for every other layer")


def smallest_bytes(layers: list[LayerShape], candidates: list[int], symmetric: bool) -> int:
    """Bytes of the layers when each takes its cheapest candidate precision."""
    return sum(min(layer_bytes(l.shape, l.has_bias, b, symmetric) for b in candidates) for l in layers)


def budget_message(budget: float, candidates: list[int], needed: float) -> str:
    return (f"no assignment of {candidates} bits fits {budget:.1%} of the FP32 size: "
            f"the smallest needs {needed:.1%}")


def check_fisher_model(params: dict, model: ModelTensors) -> None:
    """The model-dependent checks of a validated `fisher` variant (see the module docstring)."""
    strategy = params["strategy"]
    if strategy == "groups":
        check_groups(params["groups"], model.layers)
    if strategy == "budget":
        # Lower bound of the packed size (every candidate layer at its cheapest precision, no
        # header) against an upper bound of the FP32 size (tensors plus the model file headers).
        least = smallest_bytes(model.layers, params["candidates"], params["symmetric"]) + model.other_fp32_bytes
        most_fp32 = model.total_fp32_bytes + model.header_bytes
        if least > params["budget"] * most_fp32:
            raise PlanError("budget", budget_message(params["budget"], params["candidates"], least / most_fp32))
