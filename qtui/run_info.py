"""What a run's stored config says about it, in the few words a table shows: the variant's
description, its bits per role, its sample count and its protocol key.

Configs are parsed once per distinct config text: reruns and runs of one sweep share them, so
ten thousand runs cost a few hundred parses. Runs in the poller's thread.
"""

from __future__ import annotations

import json

from qtui.protocol import protocol_key

Derived = tuple[str, str, "int | None", str]  # description, quant, samples, protocol
_cache: dict[str, Derived] = {}
CACHE_LIMIT = 20_000


def quant_label(config: dict) -> str:
    method = config.get("method")
    if not isinstance(method, str):
        return ""
    try:
        from engine.methods import METHODS, describe_run  # torch-free; imported in the poller thread

        if method not in METHODS:
            return method
        return describe_run(config)
    except Exception:  # a method this engine does not know, or malformed params
        return method


def derive(config_text: str | None) -> Derived:
    if not config_text:
        return ("", "", None, "")
    found = _cache.get(config_text)
    if found is not None:
        return found
    try:
        config = json.loads(config_text)
    except ValueError:
        config = {}
    if not isinstance(config, dict):
        config = {}
    samples = (config.get("sampling") or {}).get("samples")
    found = (
        str(config.get("description") or ""),
        quant_label(config),
        samples if isinstance(samples, int) else None,
        protocol_key(config),
    )
    if len(_cache) > CACHE_LIMIT:
        _cache.clear()
    _cache[config_text] = found
    return found
