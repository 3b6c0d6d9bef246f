"""A run's stored config (JSON) written back as TOML, the language of experiments.toml.

Tables come after the keys of their parent, nested tables as dotted headers, lists inline.
TOML has no null: a missing value is written as a comment so that nothing is hidden.
"""

from __future__ import annotations

import json
import math
import re

BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def key(name: str) -> str:
    return name if BARE_KEY.match(name) else json.dumps(name)


def value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        inner = ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items() if x is not None)
        return "{ " + inner + " }" if inner else "{}"
    return json.dumps(str(v))


def to_toml(data: dict, prefix: tuple[str, ...] = ()) -> str:
    lines: list[str] = []
    tables = []
    for name, v in data.items():
        if isinstance(v, dict) and v and all(not isinstance(x, dict) or x for x in v.values()):
            tables.append((name, v))
        elif v is None:
            lines.append(f"# {key(name)} is not set")
        else:
            lines.append(f"{key(name)} = {value(v)}")
    for name, v in tables:
        header = ".".join(key(p) for p in (*prefix, name))
        body = to_toml(v, (*prefix, name))
        if lines:
            lines.append("")
        lines.append(f"[{header}]")
        if body:
            lines.append(body)
    return "\n".join(lines)
