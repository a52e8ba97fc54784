"""The update's teacher-forced passes through a Llama-family backbone with fused layer parts (``optim.fused_layers``).

A decoder layer's matrix products run at the machine's matmul peak; what else a layer does is a chain of small
torch operators, each with its autograd node: the RMSNorm (about six operators), the rotary embedding of the
queries and keys (slices, a concatenation, a negation, two products and a sum each), the SwiGLU (an activation and
a product). :class:`FusedBackbone` is the project's own forward of such a backbone that calls the model's own
modules for the embedding, the projections (so LoRA layers, their dropout and their gradients are as usual) and
the rotary tables, and runs those three parts as one C++ kernel each, forward and backward
(``layer_kernels.cpp``):

    RMSNorm   y = w * x r,  r = (mean(x^2) + eps)^(-1/2);   dx = r (g w) - x r^3 mean(g w x),  dw = sum g x r
    rotary    y = x cos + rotate_half(x) sin;               dx = g cos - rotate_half(g) sin (the inverse rotation)
    SwiGLU    y = silu(a) b;                                da = g b s (1 + a (1 - s)),  db = g a s,  s = sigmoid(a)

The attention is torch's ``scaled_dot_product_attention`` with the padding and causal mask that transformers
builds (a padding query attends to itself only: finite and never read). Written with torch operators in place of
the three kernels, this forward equals the transformers one bit for bit; with them it differs by float rounding
(tested within 1e-5 on the log-probs and 1e-5 relative on every gradient, ``tests/test_fused_layers.py``).

It takes the transformers backbone's call (``input_ids``, ``attention_mask``, ``position_ids``, a KV cache) and
returns ``last_hidden_state``, so the padded pass and the shared prompt's passes use it unchanged. Off by default
(it moves a seeded run by float rounding, and the kernels need a C++ compiler at first use); float32 on the CPU
only: anything else (a GPU, half precision, gradient checkpointing) runs the transformers backbone.
"""

from __future__ import annotations

import inspect
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmdp.policy.kernels import build

SUPPORTED = {"llama", "qwen2", "qwen3", "mistral"}

#: models whose update passes go through a FusedBackbone (:func:`enable`); looked up by ``split_causal_lm``
_ENABLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def llama_family(model: nn.Module) -> bool:
    """Whether ``model`` is a Llama-family decoder without sliding-window attention or sequence-dependent rotary
    frequencies (Llama, Qwen2, Qwen3, Mistral without a window, SmolLM2 ...): what the project's own forward
    passes (this module's and the ``fast`` engine's) implement."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED:
        return False
    if getattr(cfg, "use_sliding_window", False) or "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
        return False
    if cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None):
        return False
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) in ("dynamic", "longrope"):
        return False  # rotary frequencies that depend on the current sequence length
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
        return False
    layer = base.layers[0]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    return all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and all(
        hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")
    )


def kernels() -> Any:
    """The compiled ``layer_kernels.cpp``, or None where it cannot be built here (a warning says why)."""
    return build("tokenmdp_layer_kernels", Path(__file__).with_name("layer_kernels.cpp"),
                 "optim.fused_layers runs the transformers layers instead")


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x = x.contiguous()
        y, r = kernels().rms_norm_forward(x, weight.contiguous(), eps)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, r = ctx.saved_tensors
        dx, dw = kernels().rms_norm_backward(grad.contiguous(), x, weight.contiguous(), r)
        return dx, dw, None


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return kernels().rotary(x.contiguous(), cos, sin, False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return kernels().rotary(grad.contiguous(), cos, sin, True), None, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return kernels().swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return tuple(kernels().swiglu_backward(grad.contiguous(), gate, up))


def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """The model's RMSNorm module ``norm`` applied to ``x`` by the fused kernel."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    return _RMSNorm.apply(x, norm.weight, float(eps))


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x (B, L, heads, D)`` rotated by the tables ``cos, sin (B, L, D)`` (rotate-half convention)."""
    return _Rotary.apply(x, cos.contiguous(), sin.contiguous())


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``."""
    return _SwiGLU.apply(gate, up)


class FusedBackbone:
    """A transformers Llama-family backbone's forward with the fused layer parts (the module docstring). Not a
    module: it holds no parameters of its own, only the backbone whose modules it calls."""

    def __init__(self, backbone: nn.Module):
        self.hf = backbone
        self.config = backbone.config
        params = inspect.signature(backbone.forward).parameters
        self.cache_name = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.x: cache
        cfg = backbone.config
        self.heads, self.kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None)
        self.kv_heads = self.kv_heads or self.heads

    def modules(self):
        return self.hf.modules()

    def __call__(self, **kwargs):
        return self.forward(**kwargs)

    def _fused(self) -> bool:
        weight = self.hf.embed_tokens.weight
        return (weight.device.type == "cpu" and weight.dtype == torch.float32 and kernels() is not None
                and not torch.is_autocast_enabled("cpu")
                and not any(getattr(m, "gradient_checkpointing", False) is True for m in self.hf.layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, use_cache: bool | None = None, cache: Any = None,
                **kwargs) -> Any:
        """``last_hidden_state (B, L, H)`` of ``input_ids`` after the ``cache``'s columns, if any (each layer's
        keys and values are appended to it, as transformers does); ``attention_mask`` covers the cache's columns
        and the new ones. Anything but float32 on the CPU goes to the transformers backbone."""
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        if kwargs or not self._fused():
            return self.hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=use_cache, **{self.cache_name: cache}, **kwargs)
        embeds = self.hf.embed_tokens(input_ids)
        b, n = input_ids.shape
        past = 0 if cache is None else cache.get_seq_length()
        if attention_mask is None:
            attention_mask = torch.ones(b, past + n, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = torch.arange(past, past + n, device=input_ids.device).expand(b, n)
        columns = torch.arange(past + n, device=input_ids.device)
        rows = torch.arange(past, past + n, device=input_ids.device)
        allowed = (columns[None, :] <= rows[:, None])[None] & attention_mask.bool()[:, None, :]
        allowed = (allowed | (columns[None, :] == rows[:, None])[None]).unsqueeze(1)  # a padding query sees itself
        cos, sin = self.hf.rotary_emb(embeds, position_ids)
        x = embeds
        for index, layer in enumerate(self.hf.layers):
            x = x + self._attention(layer.self_attn, rms_norm(x, layer.input_layernorm), cos, sin, allowed, cache,
                                    index)
            mlp = layer.mlp
            h = rms_norm(x, layer.post_attention_layernorm)
            x = x + mlp.down_proj(swiglu(mlp.gate_proj(h), mlp.up_proj(h)))
        return SimpleNamespace(last_hidden_state=rms_norm(x, self.hf.norm), past_key_values=cache)

    def _attention(self, attn: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   allowed: torch.Tensor, cache: Any, index: int) -> torch.Tensor:
        b, n, _ = h.shape
        d = attn.head_dim
        q = attn.q_proj(h).view(b, n, self.heads, d)
        k = attn.k_proj(h).view(b, n, self.kv_heads, d)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3: RMSNorm of each head before the rotary
            q, k = rms_norm(q, attn.q_norm), rms_norm(k, attn.k_norm)
        q = rotary(q, cos, sin).transpose(1, 2)
        k = rotary(k, cos, sin).transpose(1, 2)
        v = attn.v_proj(h).view(b, n, self.kv_heads, d).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, index)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=attn.scaling,
                                             enable_gqa=self.heads != self.kv_heads)
        return attn.o_proj(out.transpose(1, 2).reshape(b, n, self.heads * d))


def enable(model: nn.Module) -> str | None:
    """Route ``model``'s scoring passes through a :class:`FusedBackbone` (``split_causal_lm`` hands it out as the
    backbone). Returns None when done, else why not (not a Llama-family decoder; no compiler)."""
    if not llama_family(model):
        return f"{type(model).__name__} is not a Llama-family decoder without sliding-window attention"
    if kernels() is None:
        return "the layer kernels could not be built here (a C++ compiler and ninja are needed)"
    _ENABLED[model] = FusedBackbone(model.model)
    return None


def disable(model: nn.Module) -> None:
    """Undo :func:`enable`."""
    _ENABLED.pop(model, None)


def fused_backbone(model: nn.Module) -> FusedBackbone | None:
    """The :class:`FusedBackbone` of ``model`` when :func:`enable` routed it, else None."""
    return _ENABLED.get(model)


__all__ = ["FusedBackbone", "disable", "enable", "fused_backbone", "kernels", "llama_family", "rms_norm", "rotary",
           "swiglu"]
