"""Incremental decoders for the `fast` engine: one prefill, then one token per step over a key-value cache.

Two implementations of the same small interface (``prefill``, ``step``, ``select``):

* :class:`KVDecoder`, the project's own forward pass of a Llama-family decoder (Llama, Qwen2, Qwen3, Mistral,
  SmolLM2 ...), reusing the model's weights: query/key/value projections fused into one matrix and gate/up into
  another (re-fused at every ``generate`` call, so they always hold the current weights), a preallocated cache of
  shape ``(B, H_kv, P + max_new_tokens, D)`` per layer written in place, rotary tables computed once by the
  model's own rotary module, ``scaled_dot_product_attention`` over the filled part of the cache, and
  ``select(rows)`` to drop finished rows from the batch. Numerically it is the transformers forward (the tests
  compare log-probs with a teacher-forced pass within 1e-4).
* :class:`HFDecoder`, any other causal LM: the transformers forward with its own cache, called step by step
  (no ``select``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = {"llama", "qwen2", "qwen3", "mistral"}


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class _Layer:
    w_qkv: torch.Tensor  # (Hq*D + 2*Hkv*D, H)
    b_qkv: torch.Tensor | None
    o_proj: nn.Module
    ln1: tuple[torch.Tensor, float]
    ln2: tuple[torch.Tensor, float]
    w_gate_up: torch.Tensor  # (2*I, H)
    down: nn.Module
    act: Any
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    scaling: float


def kv_decoder_supported(model: nn.Module) -> bool:
    """Whether :class:`KVDecoder` can run ``model`` (a Llama-family decoder without sliding-window attention)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED:
        return False
    if getattr(cfg, "use_sliding_window", False) or "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
        return False
    if cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None):
        return False
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
        return False
    layer = base.layers[0]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    return all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and all(
        hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")
    )


def _norm_parts(norm: nn.Module) -> tuple[torch.Tensor, float]:
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    return norm.weight, float(eps)


class KVDecoder:
    """Own incremental forward of a Llama-family decoder (see the module docstring)."""

    def __init__(self, model: nn.Module):
        cfg = model.config
        base = model.model
        self.model = model
        self.embed = base.embed_tokens
        self.final_norm = _norm_parts(base.norm)
        self.rotary = base.rotary_emb
        self.head = model.get_output_embeddings()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layers = [self._fuse(layer, self.head_dim) for layer in base.layers]
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    @staticmethod
    def _fuse(layer: nn.Module, head_dim: int) -> _Layer:
        a, m = layer.self_attn, layer.mlp
        biases = [p.bias for p in (a.q_proj, a.k_proj, a.v_proj)]
        b_qkv = None
        if any(b is not None for b in biases):
            b_qkv = torch.cat([b if b is not None else p.weight.new_zeros(p.weight.shape[0])
                               for b, p in zip(biases, (a.q_proj, a.k_proj, a.v_proj))])
        return _Layer(
            w_qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
            b_qkv=b_qkv,
            o_proj=a.o_proj,
            ln1=_norm_parts(layer.input_layernorm),
            ln2=_norm_parts(layer.post_attention_layernorm),
            w_gate_up=torch.cat([m.gate_proj.weight, m.up_proj.weight]),
            down=m.down_proj,
            act=m.act_fn,
            q_norm=getattr(a, "q_norm", None),
            k_norm=getattr(a, "k_norm", None),
            scaling=float(getattr(a, "scaling", None) or head_dim**-0.5),
        )

    # cache --------------------------------------------------------------------------------------------------
    def allocate(self, batch: int, length: int) -> None:
        """Preallocate the key-value cache for ``batch`` rows of up to ``length`` tokens."""
        w = self.embed.weight
        shape = (batch, self.n_kv, length, self.head_dim)
        self.k = [torch.empty(shape, dtype=w.dtype, device=w.device) for _ in self.layers]
        self.v = [torch.empty(shape, dtype=w.dtype, device=w.device) for _ in self.layers]
        pos = torch.arange(length, device=w.device).unsqueeze(0)
        cos, sin = self.rotary(w[:1].unsqueeze(0), pos)
        self.cos, self.sin = cos[0], sin[0]  # (length, D)

    def select(self, rows: torch.Tensor) -> bool:
        """Keep only ``rows`` of the batch (drop finished sequences)."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        return True

    # forward ------------------------------------------------------------------------------------------------
    def _attention(self, x: torch.Tensor, layer: _Layer, li: int, pos: torch.Tensor, start: int,
                   mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        hq, hk, d = self.n_heads, self.n_kv, self.head_dim
        qkv = F.linear(x, layer.w_qkv, layer.b_qkv)
        q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
        q, k, v = q.view(b, s, hq, d), k.view(b, s, hk, d), v.view(b, s, hk, d)
        if layer.q_norm is not None:
            q, k = layer.q_norm(q), layer.k_norm(k)
        cos, sin = self.cos[pos].unsqueeze(2), self.sin[pos].unsqueeze(2)  # (B, S, 1, D)
        q = (q * cos + _rotate_half(q) * sin).transpose(1, 2)
        k = (k * cos + _rotate_half(k) * sin).transpose(1, 2)
        end = start + s
        self.k[li][:, :, start:end] = k
        self.v[li][:, :, start:end] = v.transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, self.k[li][:, :, :end], self.v[li][:, :, :end], attn_mask=mask, scale=layer.scaling,
            enable_gqa=hq != hk,
        )
        return layer.o_proj(out.transpose(1, 2).reshape(b, s, hq * d))

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, start: int, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states of the last column (B, H) after writing columns ``start: start + S`` of the cache."""
        x = self.embed(ids)
        for li, layer in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), layer.ln1[0], layer.ln1[1])
            x = x + self._attention(h, layer, li, pos, start, mask)
            h = F.rms_norm(x, (x.shape[-1],), layer.ln2[0], layer.ln2[1])
            gate, up = F.linear(h, layer.w_gate_up).chunk(2, dim=-1)
            x = x + layer.down(layer.act(gate) * up)
        last = x[:, -1]
        return F.rms_norm(last, (last.shape[-1],), self.final_norm[0], self.final_norm[1])

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, length: int) -> torch.Tensor:
        """Run the left-padded prompts (B, P) and return the next-token logits (B, V)."""
        b, p = ids.shape
        self.allocate(b, length)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        causal = torch.ones(p, p, dtype=torch.bool, device=ids.device).tril()
        attn = causal.unsqueeze(0) & mask.bool().unsqueeze(1)  # (B, P, P): key valid and not in the future
        attn |= torch.eye(p, dtype=torch.bool, device=ids.device)  # pad queries see themselves (no NaN rows)
        return self.head(self._forward(ids, pos, 0, attn.unsqueeze(1)))

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, column: int, key_valid: torch.Tensor) -> torch.Tensor:
        """Feed one token per row at cache column ``column``; ``key_valid`` (B, column + 1). Returns logits (B, V)."""
        mask = key_valid[:, None, None, :]
        return self.head(self._forward(tokens.unsqueeze(1), pos.unsqueeze(1), column, mask))


class HFDecoder:
    """The generic path: the model's own forward and cache, one token per step."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.past: Any = None
        self.attn: torch.Tensor | None = None

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, length: int) -> torch.Tensor:
        from transformers import DynamicCache

        self.past = DynamicCache(config=self.model.config)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        self.attn = mask
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self.past,
                         use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, column: int, key_valid: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=tokens.unsqueeze(1), attention_mask=key_valid.long(), position_ids=pos.unsqueeze(1),
                         past_key_values=self.past, use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        return out.logits[:, -1]

    def select(self, rows: torch.Tensor) -> bool:
        return False


def make_decoder(model: nn.Module, kind: str = "auto") -> KVDecoder | HFDecoder:
    """``KVDecoder`` when the architecture is supported (or ``kind="kv"``), else ``HFDecoder``."""
    if kind == "hf" or (kind == "auto" and not kv_decoder_supported(model)):
        return HFDecoder(model)
    return KVDecoder(model)


__all__ = ["KVDecoder", "HFDecoder", "make_decoder", "kv_decoder_supported", "SUPPORTED"]
