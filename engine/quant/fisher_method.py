"""Method `fisher`: per-layer precision chosen from Fisher information (the LAQFI study).

`plan_fisher` turns a variant's keys (see engine.fisher_keys) into an `RTNConfig` with one
precision per layer, plus what to store: per layer the Fisher value, the Fisher-weighted error
at every precision, the measured sensitivity and the chosen bits; per run the Spearman
correlation between estimated and measured sensitivity. The pipeline then quantizes, packs,
reloads and verifies as for every method.

Order of work: the checks that need the model (layer groups, whether the size budget can be
met at all, exactly) come first, before any statistic is computed; the statistics come from
`FisherCache` (engine.quant.fisher_cache), computed once per model and calibration set: the
calibration set (for real pipelines, latents the model generates with the experiment's steps
and guidance, stage "calibration"), the Fisher information (stage "fisher", memory bounded as
engine.quant.fisher_sums says), and unless `measure_sensitivity = false` the measured
sensitivity (stage "sensitivity": two calibration passes per quantizable layer, 565 passes for
SD 1.5's 282 layers), each with progress.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.calibration import CalibrationSet, calibration_for, generation_for
from engine.fisher_keys import low_precision
from engine.mixed_precision import FP16, FP32, LayerShape, PlanError, budget_message, check_groups, group_of, layer_bytes
from engine.models.loader import TextToImageModel
from engine.quant import allocation
from engine.quant.apply import RTNConfig
from engine.quant.fisher import FisherStats, Sensitivity, compute_fisher_stats, measured_sensitivity, spearman
from engine.quant.fisher_cache import FisherCache
from engine.quant.packing import packed_nbytes
from engine.quant.roles import quantizable_layers
from engine.quant.rtn import quantize_tensor

Progress = Callable[..., None]  # (stage, done, total, message="")


@dataclass
class FisherPlan:
    config: RTNConfig  # layer_bits for every quantizable layer
    layer_info: dict[str, dict]  # name -> fisher, sensitivity, extra (per-layer columns)
    metrics: dict[str, float | None]
    max_bytes: int | None = None  # the budget in bytes, when there is one
    bits: dict[str, int] = field(default_factory=dict)

    def annotate(self, layers: list[dict]) -> list[dict]:
        """The `quantize_` report's layer rows with this plan's per-layer statistics added."""
        rows = []
        for layer in layers:
            info = self.layer_info[layer["name"]]
            rows.append({**layer, "fisher": info["fisher"], "sensitivity": info["sensitivity"],
                         "extra": json.dumps(info["extra"], sort_keys=True)})
        return rows


def plan_fisher(model: TextToImageModel, params: dict, fp32_bytes: int, cache_dir: Path,
                progress: Progress | None = None, prompts: list[str] | None = None,
                sampling=None) -> FisherPlan:
    """The per-layer precisions of a `fisher` variant and what to store about them. `prompts`
    and `sampling` (a SamplingConfig: steps, guidance, negative prompt): the experiment's, for
    models whose calibration data is generated from prompts (without `sampling`, the model's
    default generation)."""
    progress = progress or (lambda *a, **k: None)
    denoiser = model.denoiser
    layers = quantizable_layers(denoiser)
    names = [name for name, _, _ in layers]
    shapes = [LayerShape(name, tuple(m.weight.shape), m.bias is not None) for name, m, _ in layers]
    symmetric, strategy = params["symmetric"], params["strategy"]
    sizer = PackedSize(denoiser, symmetric)
    # 1. What the model alone decides: refused before any statistic is computed.
    if strategy == "groups":
        check_groups(params["groups"], shapes)
    limit = None
    if strategy == "budget":
        limit = math.floor(params["budget"] * fp32_bytes)
        least = sizer.size({name: min(params["candidates"]) for name in names})
        if least > limit:
            raise PlanError("budget", budget_message(params["budget"], params["candidates"], least / fp32_bytes))
    # 2. Statistics, computed once per model and calibration set.
    keys = params["calibration"]
    generation = generation_for(keys, sampling) if sampling is not None else {}
    drawn = {"samples": keys["samples"], "seed": keys["seed"]}
    cache = FisherCache(Path(cache_dir), model, model.calibration_key(drawn, prompts, **generation))
    calibration = functools.cache(lambda: _calibration(model, drawn, prompts, generation, progress))
    stats, cached = cache.fisher(lambda: _fisher_stats(denoiser, calibration(), progress))
    low = low_precision(params)
    measured, sens_seconds = None, 0.0
    if params["measure_sensitivity"]:
        measured, sens_seconds = cache.sensitivity(
            low, symmetric, lambda: _sensitivity(denoiser, calibration(), low, symmetric, progress))
    # 3. The strategy.
    if strategy == "budget":
        bits = _fit_budget(stats, shapes, params["candidates"], symmetric, limit, sizer)
    else:
        bits = _two_level(params, stats, names, low)
    metrics = _metrics(params, stats, measured, shapes, bits, low)
    metrics.update(fisher_from_cache=float(cached), sensitivity_s=sens_seconds)
    layer_bits = dict(zip(names, bits))
    return FisherPlan(config=RTNConfig(bits={}, symmetric=symmetric, layer_bits=layer_bits),
                      layer_info=_layer_info(params, stats, measured, names, low), metrics=metrics,
                      max_bytes=limit, bits=layer_bits)


def _scores(params: dict, stats: FisherStats, low: int) -> np.ndarray:
    """What the two-level strategies rank: each layer's Fisher value, or its estimated
    sensitivity (the Fisher-weighted error at `low`)."""
    return stats.fisher if params["score"] == "fisher" else stats.error(low, params["symmetric"])


def _two_level(params: dict, stats: FisherStats, names: list[str], low: int) -> list[int]:
    scores, high, strategy = list(_scores(params, stats, low)), params["high"], params["strategy"]
    if strategy == "global":
        return allocation.by_threshold(scores, params["threshold"], high, low)
    if strategy == "groups":
        groups = [group_of(name, params["groups"]) for name in names]
        return allocation.by_groups(scores, groups, params["group_thresholds"], high, low)
    if strategy == "ratio":
        return allocation.by_ratio(scores, params["ratio"], high, low)
    return allocation.by_mean_std(scores, params["k"], high, low)


def _layer_info(params: dict, stats: FisherStats, measured: Sensitivity | None, names: list[str],
                low: int) -> dict[str, dict]:
    """Per layer: the `fisher` and `sensitivity` columns and the `extra` JSON. `fisher_err` (per
    precision) and `rel_est_sensitivity` (at `low`) are Fisher-weighted errors: relative
    quantities, proportional to the loss increase they estimate, not on the scale of the
    measured `sensitivity` (see `engine.quant.fisher`)."""
    symmetric, strategy = params["symmetric"], params["strategy"]
    estimate = stats.error(low, symmetric)
    info = {}
    for i, name in enumerate(names):
        extra = {"fisher_err": {str(b): float(stats.error(b, symmetric)[i]) for b in _ALL_PRECISIONS},
                 "rel_est_sensitivity": float(estimate[i])}
        if strategy != "budget":
            extra["score"] = float(_scores(params, stats, low)[i])
        if strategy == "groups":
            extra["group"] = group_of(name, params["groups"])
        if measured is not None:
            extra["curvature"] = float(measured.curvature[i])
        info[name] = {"fisher": float(stats.fisher[i]),
                      "sensitivity": float(measured.increase[i]) if measured is not None else None,
                      "extra": extra}
    return info


def _metrics(params: dict, stats: FisherStats, measured: Sensitivity | None, shapes: list[LayerShape],
             bits: list[int], low: int) -> dict[str, float | None]:
    symmetric = params["symmetric"]
    estimate = stats.error(low, symmetric)
    correlations = dict.fromkeys(("fisher_spearman", "fisher_curv_spearman", "fisher_raw_spearman"))
    if measured is not None:
        correlations = {
            "fisher_spearman": _finite(spearman(estimate, measured.increase)),  # estimate vs measured
            "fisher_curv_spearman": _finite(spearman(estimate, measured.curvature)),  # first order cancelled
            "fisher_raw_spearman": _finite(spearman(stats.fisher, measured.increase)),  # layer Fisher value
        }
    sizes = np.array([float(np.prod(s.shape)) for s in shapes])
    above = np.array(bits) != low  # `low` is also the budget's smallest candidate
    return {
        **correlations,
        "high_fraction": float(sizes[above].sum() / sizes.sum()),
        "high_layers": float(above.sum()),
        # relative, not a loss: proportional to the estimated increase (see engine.quant.fisher)
        "rel_est_loss_increase": float(sum(stats.error(b, symmetric)[i] for i, b in enumerate(bits))),
        "calib_loss": stats.loss,
        "fisher_s": stats.seconds,
    }


_ALL_PRECISIONS = tuple(range(2, 9)) + (FP16, FP32)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _calibration(model: TextToImageModel, drawn: dict, prompts: list[str] | None, generation: dict,
                 progress: Progress) -> CalibrationSet:
    message = f"calibration set of {drawn['samples']} samples"
    if generation:
        message += f" ({generation['steps']} steps, guidance {generation['guidance']:g})"
    return calibration_for(model, **drawn, prompts=prompts,
                           on_progress=lambda done, total: progress("calibration", done, total, message),
                           **generation)


def _fisher_stats(denoiser: torch.nn.Module, calib: CalibrationSet, progress: Progress) -> FisherStats:
    return compute_fisher_stats(denoiser, calib,
                                on_progress=lambda done, total, message: progress("fisher", done, total, message))


def _sensitivity(denoiser: torch.nn.Module, calib: CalibrationSet, bits: int, symmetric: bool,
                 progress: Progress) -> Sensitivity:
    return measured_sensitivity(denoiser, calib, bits, symmetric,
                                on_progress=lambda done, total: progress(
                                    "sensitivity", done, total, f"one layer at a time, {total} layers x 2 passes"))


def _fit_budget(stats: FisherStats, shapes: list[LayerShape], candidates: list[int], symmetric: bool,
                limit: int, sizer: "PackedSize") -> list[int]:
    """The least-error assignment whose packed checkpoint, measured exactly, is within `limit`.

    The knapsack works on the layers' own bytes; what the file adds (other tensors, header) is
    taken from the cheapest assignment and every answer is checked by its exact size, the
    capacity shrinking by any excess (the header varies by a few bytes with the assignment)."""
    errors = [{b: float(stats.error(b, symmetric)[i]) for b in candidates} for i in range(len(shapes))]
    costs = [{b: layer_bytes(s.shape, s.has_bias, b, symmetric) for b in candidates} for s in shapes]
    cheapest = [min(candidates)] * len(shapes)
    names = [s.name for s in shapes]
    capacity = limit - (sizer.size(dict(zip(names, cheapest))) - allocation.total_cost(costs, cheapest))
    for _ in range(8):
        try:
            bits = allocation.by_budget(errors, costs, capacity)
        except ValueError:  # the excess ate the slack: only the cheapest assignment is left
            break
        size = sizer.size(dict(zip(names, bits)))
        if size <= limit:
            return bits
        capacity -= size - limit
    return cheapest  # checked in plan_fisher: it fits


class PackedSize:
    """Exact size of the packed checkpoint of `denoiser` for given per-layer precisions,
    computed the way `quantize_` + `save_packed` would write it, without changing the model."""

    def __init__(self, denoiser: torch.nn.Module, symmetric: bool):
        self.layers = quantizable_layers(denoiser)
        self.state = dict(denoiser.state_dict())
        self.symmetric = symmetric
        self._codes: dict[tuple[str, int], object] = {}

    def size(self, bits: dict[str, int]) -> int:
        state, packed, half = dict(self.state), {}, []
        for name, module, _ in self.layers:
            b = bits[name]
            if b == FP32:
                continue
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.detach().half().to(module.bias.dtype)
            if b == FP16:
                state[f"{name}.weight"] = module.weight.detach().half().to(module.weight.dtype)
                half.append(name)
            else:
                if (name, b) not in self._codes:
                    self._codes[(name, b)] = quantize_tensor(module.weight.detach(), b, self.symmetric)
                packed[name] = self._codes[(name, b)]
        return packed_nbytes(state, packed, half)
