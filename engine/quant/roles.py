"""Which layers are quantizable, and the role each one plays ("conv", "attention", "linear").

Roles let a config give different bit widths to different kinds of layer. Attention means the
query/key/value/output projections of a diffusers `Attention` block (self and cross attention,
and the joint-attention "add_*" projections); every other Linear is "linear".
"""

from __future__ import annotations

from torch import nn

ROLES = ("conv", "attention", "linear")

ATTENTION_SUFFIXES = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)


def _is_attention_name(name: str) -> bool:
    """True if the dotted module name ends with a whole attention-projection suffix."""
    return any(name == s or name.endswith("." + s) for s in ATTENTION_SUFFIXES)


def layer_role(name: str, module: nn.Module) -> str | None:
    """The role of `module` (named `name` in its model), or None if it is not quantizable."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "conv"
    if isinstance(module, nn.Linear):
        return "attention" if _is_attention_name(name) else "linear"
    return None


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, role) for every module that has a role, in `named_modules()` order."""
    layers = []
    for name, module in model.named_modules():
        role = layer_role(name, module)
        if role is not None:
            layers.append((name, module, role))
    return layers
