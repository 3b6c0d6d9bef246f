"""Blocks of rows of an attention call, so that its probability matrix is never whole.

An attention call in diffusers' head-to-batch layout has probabilities [BH, Q, K] (BH = batch
x heads, Q queries, K keys). Each row (one head of one prompt, one query) is a softmax of its
own, so the matrix can be computed, quantized and multiplied with the values a block of rows
at a time. `chunk_plan` cuts [BH, Q] into blocks of at most `max_elements` probabilities
(at least one row each: a bound below K still gives one row per block):
- everything at once when it fits;
- else all BH at once and as many queries as fit;
- else as many queries of one head-batch row as fit, and as many head-batch rows as fit
  with them (one head-batch row when the queries do not all fit).

The blocks cover every row exactly once, in order: head-batch rows outer, queries inner;
spans along an axis are as even as the bound allows.
With the default bound (2^26 elements: 256 MiB in float32) the probabilities of Stable
Diffusion 1.5's largest self-attention at 512 x 512, batch 8 with guidance (BH = 16 x 8 = 128,
Q = K = 4096: 2^31 elements, 8 GiB in float32) are 32 blocks of 128 queries.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_ELEMENTS = 2**26


@dataclass(frozen=True)
class Chunk:
    """Rows [bh0, bh1) x queries [q0, q1) of an attention call."""

    bh0: int
    bh1: int
    q0: int
    q1: int

    @property
    def heads(self) -> slice:
        return slice(self.bh0, self.bh1)

    @property
    def queries(self) -> slice:
        return slice(self.q0, self.q1)

    def elements(self, keys: int) -> int:
        return (self.bh1 - self.bh0) * (self.q1 - self.q0) * keys


def _spans(n: int, most: int) -> list[tuple[int, int]]:
    """[0, n) cut into the fewest spans of at most `most`, of sizes differing by at most one
    (no small remainder: a block of a single query is a matrix-vector product, which BLAS
    computes in another order than the rows of a matrix product)."""
    count = -(-n // most)
    return [(i * n // count, (i + 1) * n // count) for i in range(count)]


def chunk_plan(bh: int, queries: int, keys: int, max_elements: int = MAX_ELEMENTS) -> list[Chunk]:
    """The row blocks of a [bh, queries, keys] probability matrix, each of at most
    `max_elements` probabilities (or one row, if a row alone is larger)."""
    if min(bh, queries, keys) < 1 or max_elements < 1:
        raise ValueError(f"attention of {bh} x {queries} x {keys} probabilities in blocks of {max_elements}: "
                         "every size must be at least 1")
    rows = max(1, max_elements // keys)  # rows (bh, q) per block
    if rows >= bh * queries:
        return [Chunk(0, bh, 0, queries)]
    if rows >= bh:
        return [Chunk(0, bh, q0, q1) for q0, q1 in _spans(queries, rows // bh)]
    q_step = min(queries, rows)
    bh_step = max(1, rows // q_step) if q_step == queries else 1
    return [Chunk(b0, b1, q0, q1) for b0, b1 in _spans(bh, bh_step) for q0, q1 in _spans(queries, q_step)]
