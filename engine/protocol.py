"""A run's protocol: everything that makes two runs' numbers comparable.

Two runs have the same protocol when they sampled the same model with the same prompts, noise,
sampler, steps, guidance, dtype and sample count, and were scored with the same feature model
and reference. Quantization (method, params) and bookkeeping (description, batch size, the
number of bootstrap resamples) are not part of it: they are what a comparison varies or how an
interval is computed, not what makes samples comparable.

    protocol_fields(config)   the dict that is hashed (also what `differences` reports)
    protocol_hash(config)     12 hex digits of its SHA-256 (alias `protocol_key`, used by qtui)
    family_hash(config)       the same without the seed: runs that repeat one protocol over
                              several seeds (`seeds = [0, 1, 2]`) share their family

Keys a config does not have yet (sampler, dtype, prompts, reference, ...) are hashed only when
present and not None, so the hash of an old config stays what it was. Torch-free.
"""

from __future__ import annotations

import hashlib
import json

# Top-level config keys that belong to the protocol when present (model refs by their id;
# model_options: dtype, T5, scheduler, height and width).
TOP_KEYS = ("model", "feature_model", "model_options", "reference", "clip", "prompts", "dtype", "sampler")
# Sampling keys that do not change the samples (batching only changes the order of work).
SAMPLING_IGNORED = ("batch_size",)
# Evaluation keys that do not change the per-sample scores (only how intervals are computed).
EVAL_IGNORED = ("bootstrap",)
HASH_LENGTH = 12


def _as_dict(config) -> dict:
    return json.loads(config) if isinstance(config, (str, bytes)) else dict(config or {})


def _ref(value):
    """A model reference by its id (paths differ between machines), files of the shipped models
    relative to their folder (so a moved checkout keeps its protocols); other values as they are."""
    if isinstance(value, dict) and "id" in value:
        return value["id"]
    if isinstance(value, dict):
        return {k: _ref(v) for k, v in value.items()}
    if isinstance(value, str):
        from engine.models.registry import SHIPPED_DIR

        return value.replace(str(SHIPPED_DIR), "models")
    return value


def protocol_fields(config, include_seed: bool = True) -> dict:
    """The protocol of a run config (a dict or its JSON text) as a flat dict."""
    config = _as_dict(config)
    out = {}
    for key in TOP_KEYS:
        if config.get(key) is not None:
            out[key] = _ref(config[key])
    for key, value in sorted((config.get("sampling") or {}).items()):
        if key in SAMPLING_IGNORED or value is None or (key == "seed" and not include_seed):
            continue
        out[key if key in ("samples", "steps", "guidance", "seed") else f"sampling.{key}"] = value
    for key, value in sorted((config.get("eval") or {}).items()):
        if key not in EVAL_IGNORED and value is not None:
            out[f"eval.{key}"] = _ref(value)
    if "guidance" in out:
        out["guidance"] = float(out["guidance"])  # 2 and 2.0 are one protocol
    return out


def _digest(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:HASH_LENGTH]


def protocol_hash(config) -> str:
    return _digest(protocol_fields(config))


protocol_key = protocol_hash


def family_hash(config) -> str:
    return _digest(protocol_fields(config, include_seed=False))


def differences(a, b) -> dict[str, tuple]:
    """{key: (value in a, value in b)} for every protocol key where two configs differ."""
    fa, fb = protocol_fields(a), protocol_fields(b)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}
