"""Calibration statistics of one attention module's probabilities, gathered block by block.

Per module, over every call during calibration: the min and max of the values its quantizer
sees (all keys, or all but the start token's in cross-attention with `start_fp`), a seeded
sample of those values (`SAMPLES_PER_CALL` per call, positions drawn over the whole call's
matrix, until `MAX_SAMPLES`), the start token's mean probability (cross-attention) and the
mean per-prompt delta (each prompt's largest probability over its heads, queries and
non-start keys).

An attention call hands its probabilities over in row blocks (`chunks.Chunk`) between
`begin` and `end`: the statistics are those of the whole matrix. Min, max, the per-prompt
maxima and the sampled values are exactly the whole matrix's (the sample positions are drawn
for the whole call before its first block); the start token's sum is accumulated in float64,
block by block, so it equals the whole matrix's to float rounding.

Memory: at most `MAX_SAMPLES` float32 values (4 MB) on the CPU per attention module, and
per call one float per head-batch row; nothing of the size of the probability matrix.
"""

from __future__ import annotations

import torch

from engine.quant.dgq.chunks import Chunk

SAMPLES_PER_CALL = 4096
MAX_SAMPLES = 1_000_000


def row_maxima(probs: torch.Tensor, keep_start: bool) -> torch.Tensor:
    """Each head-batch row's largest probability over its queries and (without the start
    column if `keep_start`) keys: [bh, q, k] -> [bh]."""
    body = probs[..., 1:] if keep_start else probs
    return body.amax(dim=(1, 2))


def prompt_maxima(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Per-row maxima [B * heads] (diffusers' head_to_batch_dim order) -> per prompt [B]."""
    return rows.view(-1, heads).amax(dim=1)


class SoftmaxRecorder:
    """The calibration statistics of one attention module (see the module docstring)."""

    def __init__(self, keep_start_fp: bool, seed: int):
        self.keep_start_fp = keep_start_fp  # the settings' start_fp (and not min-max)
        self.generator = torch.Generator().manual_seed(seed)
        self.lo, self.hi = float("inf"), float("-inf")
        self.samples: list[torch.Tensor] = []
        self.kept = 0
        self.start_sum = self.start_n = 0.0
        self.delta_sum = self.prompts = 0.0
        self.cross = None
        self._call = None

    def begin(self, bh: int, queries: int, keys: int, heads: int, cross: bool) -> None:
        """A call of [bh, queries, keys] probabilities starts; draws its sample positions."""
        self.cross = cross
        keep = cross and self.keep_start_fp
        body_keys = keys - 1 if keep else keys
        call = {"keep": keep, "heads": heads, "maxima": torch.full((bh,), float("-inf")),
                "lo": float("inf"), "hi": float("-inf"), "start": 0.0, "sample": None}
        numel = bh * queries * body_keys
        if self.kept < MAX_SAMPLES and numel > 0:
            flat = torch.randint(0, numel, (min(SAMPLES_PER_CALL, numel),), generator=self.generator)
            row, rest = flat // (queries * body_keys), flat % (queries * body_keys)
            call["sample"] = (row, rest // body_keys, rest % body_keys, torch.empty(flat.numel()))
        self._call = call

    def update(self, probs: torch.Tensor, chunk: Chunk) -> None:
        """One block [bh1 - bh0, q1 - q0, keys] of the current call's probabilities."""
        call = self._call
        probs = probs.detach().float()
        body = probs[..., 1:] if call["keep"] else probs
        call["lo"] = min(call["lo"], body.min().item())
        call["hi"] = max(call["hi"], body.max().item())
        maxima = call["maxima"][chunk.heads]
        torch.maximum(maxima, row_maxima(probs, call["keep"]).cpu(), out=maxima)
        if self.cross:
            call["start"] += probs[..., 0].sum(dtype=torch.float64).item()
        if call["sample"] is not None:
            row, query, key, values = call["sample"]
            inside = (row >= chunk.bh0) & (row < chunk.bh1) & (query >= chunk.q0) & (query < chunk.q1)
            at = (row[inside] - chunk.bh0, query[inside] - chunk.q0, key[inside])
            values[inside] = body[tuple(i.to(body.device) for i in at)].cpu()

    def end(self, bh: int, queries: int) -> None:
        """The current call is complete: fold its statistics into the module's."""
        call, self._call = self._call, None
        self.lo, self.hi = min(self.lo, call["lo"]), max(self.hi, call["hi"])
        if call["sample"] is not None:
            values = call["sample"][3]
            self.samples.append(values)
            self.kept += values.numel()
        if self.cross:
            self.start_sum += call["start"]
            self.start_n += bh * queries
        deltas = prompt_maxima(call["maxima"], call["heads"])
        self.delta_sum += deltas.sum().item()
        self.prompts += deltas.numel()

    def values(self) -> torch.Tensor:
        return torch.cat(self.samples)

    @property
    def start_share(self) -> float | None:
        return self.start_sum / self.start_n if self.start_n else None

    @property
    def mean_prompt_delta(self) -> float | None:
        return self.delta_sum / self.prompts if self.prompts else None
