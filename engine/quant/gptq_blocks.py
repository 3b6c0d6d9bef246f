"""Block-by-block GPTQ of a transformer denoiser, holding one block's state at a time.

Given the inputs of the first transformer block on the calibration prompts (every call,
`engine.quant.calibration_hessians.BlockInputs`), for k = 0 .. L-1:
1. Hessians: GPTQ collectors on block k's target Linears (forward pre-hooks); block k, still
   full precision, is run on its inputs, which are the outputs of blocks 0..k-1 AFTER their
   quantization (weights and activations), as in GPTQ's reference.
2. Each layer is quantized by GPTQ; its collector (Hessian) is dropped at once, only the
   stored form (`QuantizedTensor`: uint8 codes, float16 scales, uint8 zeros) and the relative
   weight error are kept.
3. A copy of block k gets the quantized weights, float16 biases and activation quantizers; it
   is run on the inputs, call by call, each call's inputs replaced by its outputs: block k+1's
   inputs. The copy is dropped.
The denoiser itself is never modified: the caller installs the quantized weights once every
layer is done (so an error anywhere leaves the model as it was). Alive at once: the block
inputs (one set), one block's Hessians (sum of in_features^2 floats over its layers), one copy
of one block, and the stored codes of the blocks done. Each block runs twice; re-running the
model up to block k for each k would cost L^2 / 2 block evaluations instead.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from engine.quant.gptq import GPTQ, GroupedQuant
from engine.quant.rtn import QuantizedTensor, relative_error

Progress = Callable[..., None]
InstallAct = Callable[[nn.Module, str], None]  # (a Linear of the quantized copy, the target's name)
GPTQ_KEYS = ("bits", "symmetric", "group_size", "act_order", "damp", "block_size")


@dataclass
class LayerQuant:
    packed: QuantizedTensor  # what the checkpoint stores
    weight_err: float  # ||W_q - W|| / ||W||
    tokens: int  # calibration rows of its Hessian


def packed_form(quant: GroupedQuant) -> QuantizedTensor:
    """The packed-checkpoint form of a GPTQ / grouped-RTN result (the codes are shared)."""
    if quant.n_groups == 1:
        return quant.per_channel()
    return QuantizedTensor(codes=quant.codes, scale=quant.scales.reshape(-1).clone(),
                           zero=quant.zeros.reshape(-1).clone(), bits=quant.bits, symmetric=quant.symmetric,
                           shape=tuple(quant.codes.shape), group_size=quant.group_size)


def fp16_bias(name: str, bias: torch.Tensor) -> torch.Tensor:
    """The bias as the packed checkpoint stores it (float16 values, in the bias's dtype)."""
    b16 = bias.detach().to(torch.float16)
    if not torch.isfinite(b16).all():
        raise ValueError(f"{name}: bias values exceed the float16 range")
    return b16.to(bias.dtype)


@torch.no_grad()
def set_quantized(name: str, module: nn.Module, weight: torch.Tensor) -> None:
    """Give `module` the quantized weight and the float16-rounded bias."""
    module.weight.copy_(weight.to(module.weight.dtype))
    if module.bias is not None:
        module.bias.copy_(fp16_bias(name, module.bias))


def next_inputs(args: tuple, kwargs: dict, output) -> tuple[tuple, dict]:
    """A joint-attention block returns (encoder_hidden_states, hidden_states): the next
    block's inputs, with the same temb."""
    if args or not isinstance(output, tuple) or len(output) != 2:
        raise ValueError("block-by-block GPTQ expects blocks called with keywords that return "
                         "(encoder_hidden_states, hidden_states), as diffusers' MMDiT blocks do")
    encoder, hidden = output
    return args, {**kwargs, "hidden_states": hidden, "encoder_hidden_states": encoder}


def _collect_hessians(block: nn.Module, layers: dict[str, nn.Linear], calls: list) -> dict[str, GPTQ]:
    gptqs = {name: GPTQ(module, name) for name, module in layers.items()}
    hooks = [module.register_forward_pre_hook(lambda m, a, g=gptqs[name]: g.add_batch(a[0]))
             for name, module in layers.items()]
    try:
        for args, kwargs in calls:
            block(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return gptqs


@torch.no_grad()
def gptq_block_by_block(blocks: nn.ModuleList, targets: list, calls: list[tuple[tuple, dict]], params: dict,
                        install_act: InstallAct, progress: Progress | None = None) -> dict[str, LayerQuant]:
    """GPTQ of every target (`.name`, `.module`, `.bits`, `.block`), block after block, each
    block calibrated on the outputs of the quantized blocks before it. `calls` (the first
    block's inputs) is consumed: on return it holds the last block's inputs."""
    args = {k: params[k] for k in GPTQ_KEYS}
    out: dict[str, LayerQuant] = {}
    for k, block in enumerate(blocks):
        prefix = f"transformer_blocks.{k}."
        mine = [t for t in targets if t.block == k]
        gptqs = _collect_hessians(block, {t.name: t.module for t in mine}, calls)
        last = k + 1 == len(blocks)
        quantized = None if last else copy.deepcopy(block)
        for t in mine:
            g = gptqs.pop(t.name)
            result = g.quantize(**{**args, "bits": t.bits})
            out[t.name] = LayerQuant(packed_form(result), relative_error(t.module.weight, result.weight), g.nsamples)
            del g  # its Hessian
            if quantized is not None:
                module = quantized.get_submodule(t.name.removeprefix(prefix))
                set_quantized(t.name, module, result.weight)
                install_act(module, t.name)
            del result
        if quantized is not None:
            for i, (a, kw) in enumerate(calls):
                calls[i] = next_inputs(a, kw, quantized(*a, **kw))
            del quantized
        if progress:
            progress("quantize", k + 1, len(blocks), f"GPTQ block {k + 1}/{len(blocks)}")
    return out
