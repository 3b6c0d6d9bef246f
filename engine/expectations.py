"""Expected outcomes of an experiment, checked against paired differences.

    expect = ["B < A on fid", "C > D on fid"]

"X < Y on M" states metric(X) < metric(Y): a comparison of the metric's values, whatever the
metric's direction ("B < A on fid" says B has the lower FID; "B > A on clip_score" says B has
the higher CLIP score). It is checked with the paired 95% interval of M(X) - M(Y) on the same
samples: supported when the interval lies entirely on the stated side of 0, contradicted when
it lies entirely on the other side, otherwise inconclusive. With several seeds each seed is
checked on its own; the expectation is supported (or contradicted) when every seed says so,
otherwise inconclusive, and the per-seed outcomes are shown. Only strict "<" and ">" exist: a
"<=" (not worse) claim cannot be tested without a margin.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PAIRED_METRICS = ("fid", "clip_score", "prompt_acc")
SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_RUN = "supported", "contradicted", "inconclusive", "not run yet"
_RE = re.compile(r"^\s*(?P<left>[A-Za-z0-9][A-Za-z0-9_.-]*)\s*(?P<op><=|>=|==|!=|<|>|=)\s*"
                 r"(?P<right>[A-Za-z0-9][A-Za-z0-9_.-]*)\s+on\s+(?P<metric>[A-Za-z_][A-Za-z0-9_]*)\s*$")


class BadExpectation(ValueError):
    pass


@dataclass(frozen=True)
class Expectation:
    left: str
    op: str  # "<" or ">"
    right: str
    metric: str

    @property
    def text(self) -> str:
        return f"{self.left} {self.op} {self.right} on {self.metric}"

    def outcome(self, low: float, high: float) -> str:
        """From the 95% interval of metric(left) - metric(right)."""
        below, above = high < 0.0, low > 0.0
        if not (below or above):
            return INCONCLUSIVE
        return SUPPORTED if below == (self.op == "<") else CONTRADICTED


def parse_expectation(text, variants) -> Expectation:
    """One expectation; BadExpectation says what is wrong with it."""
    if not isinstance(text, str):
        raise BadExpectation(f"expectations are strings like \"B < A on fid\", got {text!r}")
    m = _RE.match(text)
    if not m:
        raise BadExpectation(f"cannot read {text!r}; write \"VARIANT < VARIANT on METRIC\" (or >)")
    left, op, right, metric = m.group("left", "op", "right", "metric")
    if op not in ("<", ">"):
        raise BadExpectation(f"{text!r}: only '<' and '>' can be tested (a {op!r} claim needs a margin)")
    for name in (left, right):
        if name not in variants:
            raise BadExpectation(f"{text!r}: no variant {name!r}; variants: {', '.join(variants)}")
    if left == right:
        raise BadExpectation(f"{text!r} compares a variant with itself")
    if metric not in PAIRED_METRICS:
        raise BadExpectation(f"{text!r}: no paired metric {metric!r}; metrics: {', '.join(PAIRED_METRICS)}")
    return Expectation(left, op, right, metric)


def combine(outcomes: list[str]) -> str:
    """One outcome from the per-seed outcomes."""
    if not outcomes:
        return NOT_RUN
    if all(o == SUPPORTED for o in outcomes):
        return SUPPORTED
    if all(o == CONTRADICTED for o in outcomes):
        return CONTRADICTED
    return INCONCLUSIVE
