"""Method `minmax`: the baseline of `dgq` at the same bits. RTN weights; every quantized layer's
input and every attention module's softmax output quantized uniformly over its calibrated
min and max, one grid per tensor: no groups, no attention tricks (Q-Diffusion's activation
quantizers without its reconstruction)."""

from __future__ import annotations

from engine.methods.base import MethodSpec
from engine.methods.dgq import prepare_activations, quantize_activations
from engine.methods.dgq_keys import check_keys_against_model, describe_keys, validate_keys

SPEC = MethodSpec(
    name="minmax",
    validate=lambda keys: validate_keys("minmax", keys),
    describe=lambda params: describe_keys("minmax", params),
    quantize=lambda ctx: quantize_activations(ctx, minmax=True),
    check_model=check_keys_against_model,
    prepare_load=prepare_activations(minmax=True),
)
