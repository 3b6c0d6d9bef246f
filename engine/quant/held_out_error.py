"""Each quantized Linear's relative output error on held-out inputs, computed directly.

During a held-out sampling pass of the FULL-PRECISION model (the quantized weights are
installed only afterwards), a forward pre-hook on each measured Linear takes the layer's input
rows x (its full-precision input: every layer before it is full precision too), its weight W
and, for each candidate quantized weight W_q (the method's, and RTN's for a GPTQ run), adds
    err += ||q(x) W_q^T - x W^T||^2        ref += ||x W^T||^2
with q the layer's activation quantizer (the identity without one); the bias is the same on both
sides and left out. `relative()` is sqrt(err / ref) per layer and candidate.

Memory is one layer's: the candidate weights are made inside the hook (from the packed codes,
or from W for RTN's grid) and dropped when the call returns; products are taken in chunks of
rows (float32, each chunk's squares summed in float64), so the temporaries are bounded by
`CHUNK_ELEMENTS` floats whatever the batch. Nothing per token is kept.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Quantizer = Callable[[torch.Tensor], torch.Tensor]
WeightOf = Callable[[torch.Tensor], torch.Tensor]  # full-precision weight (float32) -> quantized weight
CHUNK_ELEMENTS = 1 << 22  # rows x output features per product (16 MB in float32)


class HeldOutErrors:
    """Forward pre-hooks accumulating, per named Linear and candidate, the squared output error
    of the candidate weight and the squared full-precision output."""

    def __init__(self, layers: dict[str, nn.Linear], candidates: dict[str, dict[str, WeightOf]],
                 quantizers: dict[str, Quantizer]):
        self.candidates, self.quantizers = candidates, quantizers
        self.err = {name: {label: 0.0 for label in candidates[name]} for name in layers}
        self.ref = {name: 0.0 for name in layers}
        self.tokens = {name: 0 for name in layers}
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in layers.items()]

    def _hook(self, name: str):
        @torch.no_grad()
        def hook(module, args):
            x = args[0].detach().reshape(-1, module.in_features).float()
            w = module.weight.detach().float()
            weights = {label: make(w) for label, make in self.candidates[name].items()}
            q = self.quantizers.get(name)
            rows = max(1, CHUNK_ELEMENTS // w.shape[0])
            for start in range(0, x.shape[0], rows):
                xs = x[start : start + rows]
                y = xs @ w.T
                xq = q(xs) if q is not None else xs
                self.ref[name] += y.square().sum(dtype=torch.float64).item()
                for label, w_q in weights.items():
                    self.err[name][label] += (xq @ w_q.T - y).square().sum(dtype=torch.float64).item()
            self.tokens[name] += x.shape[0]
        return hook

    def relative(self, name: str) -> dict[str, float]:
        """||q(X) W_q^T - X W^T|| / ||X W^T|| over the held-out rows, per candidate (0.0 for a
        layer whose full-precision output is all zero)."""
        ref = self.ref[name]
        return {label: (err / ref) ** 0.5 if ref > 0 else 0.0 for label, err in self.err[name].items()}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
