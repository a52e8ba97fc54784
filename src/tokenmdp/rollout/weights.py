"""The weights a decoder applies, read off a model's projections: a plain linear layer's own, or a peft LoRA layer's
base weight with its active adapters, merged or apart.

The `fast` engine's own decoder (:mod:`tokenmdp.rollout.kv_decoder`) reads the current weights at every generate:
merged for its float32 products, apart for its int8 ones (the frozen base quantised once, the adapters in float32:
:func:`tokenmdp.rollout.fused.int8_projection`).
"""

from __future__ import annotations

import torch
from torch import nn


def weight_of(proj: nn.Module) -> torch.Tensor:
    """The weight a projection applies: its own, or for a peft LoRA layer the base weight plus the active
    adapters' ``(alpha / r) B A`` (nothing added while the adapters are disabled or merged)."""
    if not hasattr(proj, "lora_A"):
        return proj.weight
    w = proj.base_layer.weight
    if proj.disable_adapters or proj.merged:
        return w
    for name in proj.active_adapters:
        if name in proj.lora_A:
            w = w + proj.get_delta_weight(name).to(w.dtype)
    return w


def bias_of(proj: nn.Module) -> torch.Tensor | None:
    """The bias a projection adds (a peft LoRA layer's is its base layer's; its adapters have none)."""
    return proj.base_layer.bias if hasattr(proj, "lora_A") else proj.bias


def cat_biases(biases: list[torch.Tensor | None], weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The bias of projections fused into one (their weights stacked): each one's, zeros where a projection has
    none; None when none has one."""
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, weights)])


def int8_part(proj: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple]]:
    """A projection for :func:`tokenmdp.rollout.fused.int8_projection`: a peft LoRA layer's base weight and its
    active adapters' ``(A, B, scaling)`` (DoRA and other variants: the merged weight, no adapters), else its own."""
    lora = hasattr(proj, "lora_A") and not (proj.disable_adapters or proj.merged)
    names = [n for n in proj.active_adapters if n in proj.lora_A] if lora else []
    plain = all(isinstance(proj.lora_A[n], nn.Linear) and not proj.use_dora.get(n, False) for n in names)
    if not lora or not plain:
        return weight_of(proj), bias_of(proj), []
    adapters = [(proj.lora_A[n].weight, proj.lora_B[n].weight, float(proj.scaling[n])) for n in names]
    return proj.base_layer.weight, bias_of(proj), adapters


__all__ = ["bias_of", "cat_biases", "int8_part", "weight_of"]
