"""Activation groups: each quantized layer's input gets K (scale, zero point) pairs, one per
group of indices along the axis (channels or positions) where its outliers sit.

Calibration records, for every layer input, the running min and max of each channel (over the
batch and all positions) and of each position (over the batch and all channels). The spread of
an axis is D = (max of maxes - min of maxes) + (max of mins - min of mins): large when a few
indices reach far beyond the others. The axis with the larger D is grouped (only axes with at
least K indices are candidates); its indices are clustered into K groups by K-means on their
(min, max) pairs, and each group is quantized uniformly (asymmetric, `bits` bits) over the
range [min of its mins, max of its maxes]. K = 1 is per-tensor min-max.

Which tensor, which axis:
- Linear input [B, N, C] (tokens) or [B, C]: channels are the last dim, positions dim 1 (a 2-D
  input, such as the timestep embedding, has channels only).
- Conv2d input [B, C, H, W]: channels dim 1, positions the H x W input pixels. The published
  code groups the *unfolded* input (rows c x kh x kw, columns output pixels), which makes every
  convolution an unfold and a matrix product at inference. Here the groups apply to the input
  tensor itself, so the convolution stays a convolution: a channel group is exactly the
  unfolded rows of its channels (each unfolded row holds one input channel's values); a
  position group is per input pixel rather than per output patch (a patch mixes the scales of
  the pixels it covers).

The quantizer's state is four buffers of the layer (`dgq_axis`, `dgq_group`, `dgq_scale`,
`dgq_zero`), so it travels in the run's checkpoint and is loaded back with the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

AXES = {"channel": 0, "position": 1, "tensor": 2}
AXIS_NAMES = {v: k for k, v in AXES.items()}
BUFFERS = ("dgq_axis", "dgq_group", "dgq_scale", "dgq_zero")
_HOOK = "_qtui_dgq_group_hook"


def _reduce_dims(x: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """The dims to reduce for per-channel and per-position statistics (None: no positions)."""
    if x.dim() == 4:  # conv input [B, C, H, W]: channels dim 1, positions H x W
        return (0, 2, 3), (0, 1)
    if x.dim() == 3:  # tokens [B, N, C]
        return (0, 1), (0, 2)
    return tuple(range(x.dim() - 1)), None


class IndexStats:
    """Running per-channel and per-position min/max of one layer's inputs."""

    def __init__(self) -> None:
        self.ch_min = self.ch_max = self.pos_min = self.pos_max = None
        self.positions_vary = False
        self.calls = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        channel_dims, position_dims = _reduce_dims(x)
        cmin, cmax = x.amin(channel_dims).float(), x.amax(channel_dims).float()
        self.ch_min = cmin if self.ch_min is None else torch.minimum(self.ch_min, cmin)
        self.ch_max = cmax if self.ch_max is None else torch.maximum(self.ch_max, cmax)
        if position_dims is not None and not self.positions_vary:
            pmin, pmax = x.amin(position_dims).float().reshape(-1), x.amax(position_dims).float().reshape(-1)
            if self.pos_min is not None and self.pos_min.shape != pmin.shape:
                self.positions_vary, self.pos_min, self.pos_max = True, None, None
            else:
                self.pos_min = pmin if self.pos_min is None else torch.minimum(self.pos_min, pmin)
                self.pos_max = pmax if self.pos_max is None else torch.maximum(self.pos_max, pmax)
        self.calls += 1

    def axis_stats(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """axis name -> (mins, maxes) per index, for the axes that were recorded."""
        out = {"channel": (self.ch_min.cpu(), self.ch_max.cpu())}
        if self.pos_min is not None:
            out["position"] = (self.pos_min.cpu(), self.pos_max.cpu())
        return out


def spread(mins: torch.Tensor, maxs: torch.Tensor) -> float:
    """D = (max of maxes - min of maxes) + (max of mins - min of mins)."""
    return float(maxs.max() - maxs.min() + mins.max() - mins.min())


def choose_axis(stats: dict[str, tuple[torch.Tensor, torch.Tensor]], k: int, name: str = "layer") -> str:
    """The axis to group: 'tensor' for K = 1, else the axis with at least K indices and the
    larger spread (channels on a tie). ValueError if no axis has K indices."""
    if k == 1:
        return "tensor"
    candidates = {axis: spread(*mm) for axis, mm in stats.items() if mm[0].numel() >= k}
    if not candidates:
        sizes = ", ".join(f"{mm[0].numel()} {axis}s" for axis, mm in stats.items())
        raise ValueError(f"{name}: {k} groups exceed every axis of its input ({sizes}); use fewer groups")
    return max(candidates, key=lambda axis: (candidates[axis], axis == "channel"))


def kmeans_groups(mins: torch.Tensor, maxs: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Group labels 0..n-1 (n <= k) of the indices, by K-means on their (min, max) pairs;
    groups are numbered by increasing range. With at most k distinct pairs, each distinct pair
    is its own group."""
    points = torch.stack([mins.double(), maxs.double()], dim=1)
    distinct, inverse = torch.unique(points, dim=0, return_inverse=True)
    if len(distinct) <= k:
        labels = inverse
    else:
        from sklearn.cluster import KMeans

        fit = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(points.numpy())
        labels = torch.as_tensor(fit.labels_, dtype=torch.int64)
    used = torch.unique(labels)
    width = torch.stack([(maxs[labels == g].max() - mins[labels == g].min()) for g in used]).double()
    order = used[torch.argsort(width, stable=True)]
    relabel = torch.empty(int(labels.max()) + 1, dtype=torch.int64)
    relabel[order] = torch.arange(len(order))
    return relabel[labels]


def group_ranges(mins: torch.Tensor, maxs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) per group: the min of its indices' mins and the max of their maxes."""
    n = int(labels.max()) + 1
    lo = torch.full((n,), float("inf")).scatter_reduce(0, labels, mins.float(), "amin")
    hi = torch.full((n,), float("-inf")).scatter_reduce(0, labels, maxs.float(), "amax")
    return lo, hi


def scale_and_zero(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric uniform grids over [lo, hi]: scale (hi - lo) / (2^bits - 1), integer zero
    point round(-lo / scale). A constant group (hi = lo) gets scale |lo| so it is exact."""
    qmax = 2**bits - 1
    width = hi - lo
    scale = torch.where(width > 0, width / qmax, lo.abs().clamp(min=1e-8))
    return scale.float(), torch.round(-lo / scale).float()


@dataclass
class GroupPlan:
    """One layer's calibrated input quantizer."""

    axis: str  # channel | position | tensor
    labels: torch.Tensor  # group of each index along the axis ([1] for tensor)
    scale: torch.Tensor  # float32 [groups]
    zero: torch.Tensor  # float32 [groups]
    spreads: dict[str, float]  # D of each recorded axis

    @property
    def groups(self) -> int:
        return self.scale.numel()


def plan_groups(stats: IndexStats, k: int, bits: int, name: str = "layer", seed: int = 0) -> GroupPlan:
    if stats.calls == 0:
        raise ValueError(f"{name}: never ran during calibration (empty calibration set)")
    per_axis = stats.axis_stats()
    axis = choose_axis(per_axis, k, name)
    mins, maxs = per_axis["channel" if axis == "tensor" else axis]
    if axis == "tensor":
        labels = torch.zeros(1, dtype=torch.int64)
        mins, maxs = mins.min().reshape(1), maxs.max().reshape(1)
    else:
        labels = kmeans_groups(mins, maxs, k, seed)
    lo, hi = group_ranges(mins, maxs, labels)
    scale, zero = scale_and_zero(lo, hi, bits)
    return GroupPlan(axis, labels, scale, zero, {a: spread(*mm) for a, mm in per_axis.items()})


def _broadcast(values: torch.Tensor, x: torch.Tensor, axis: int, name: str) -> torch.Tensor:
    if axis == AXES["tensor"]:
        return values
    if axis == AXES["channel"]:
        dim, shape = (1, (1, -1, 1, 1)) if x.dim() == 4 else (x.dim() - 1, (*[1] * (x.dim() - 1), -1))
        length = x.shape[dim]
    else:
        if x.dim() == 4:
            length, shape = x.shape[2] * x.shape[3], (1, 1, x.shape[2], x.shape[3])
        else:
            length, shape = x.shape[1], (1, -1, *[1] * (x.dim() - 2))
    if values.numel() != length:
        raise RuntimeError(f"{name}: its input quantizer was calibrated for {values.numel()} "
                           f"{AXIS_NAMES[axis]}s, this input has {length}")
    return values.reshape(shape)


def fake_quant_groups(x: torch.Tensor, axis: int, group: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      bits: int, name: str = "layer") -> torch.Tensor:
    """x -> (clamp(round(x / s + z), 0, 2^bits - 1) - z) * s with s, z of each index's group.
    x / s is computed as x * (1 / s) (fused with + z: one pass, as every pass here is in place;
    bench/bench_dgq.py)."""
    s = _broadcast(scale[group].to(x.dtype), x, axis, name)
    z = _broadcast(zero[group].to(x.dtype), x, axis, name)
    return torch.addcmul(z, x, 1 / s).round_().clamp_(0, 2**bits - 1).sub_(z).mul_(s)


class GroupQuant:
    """Forward pre-hook of one layer: quantizes its input from the layer's dgq buffers."""

    def __init__(self, name: str, bits: int):
        self.name, self.bits = name, bits

    def __call__(self, module: nn.Module, args: tuple):
        x = fake_quant_groups(args[0], int(module.dgq_axis), module.dgq_group, module.dgq_scale,
                              module.dgq_zero, self.bits, self.name)
        return (x, *args[1:])


def add_group_quant(module: nn.Module, name: str, plan: GroupPlan, bits: int) -> GroupQuant:
    if getattr(module, _HOOK, None) is not None:
        raise ValueError(f"{name} already quantizes its input")
    device = next(module.parameters()).device
    module.register_buffer("dgq_axis", torch.tensor(AXES[plan.axis], dtype=torch.int64, device=device))
    module.register_buffer("dgq_group", plan.labels.to(device, torch.int32))  # int32: half of int64 on disk
    module.register_buffer("dgq_scale", plan.scale.to(device))
    module.register_buffer("dgq_zero", plan.zero.to(device))
    hook = GroupQuant(name, bits)
    setattr(module, _HOOK, (hook, module.register_forward_pre_hook(hook)))
    return hook


def remove_group_quant(module: nn.Module) -> None:
    entry = getattr(module, _HOOK, None)
    if entry is not None:
        entry[1].remove()
        setattr(module, _HOOK, None)
    for key in BUFFERS:
        module._buffers.pop(key, None)
