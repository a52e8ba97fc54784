"""Incremental decoders for the `fast` engine: one prefill, then one token per row and step over a KV cache.

Both decoders share one interface: ``prefill(prompt_ids, prompt_mask, n, max_new) -> logits (B, V)`` for the
``B = len(prompts) * n`` rows (row ``i * n + j`` is sample ``j`` of prompt ``i``), ``step(tokens, pos, t) ->
logits`` for the ``t``-th generated token of every live row, and ``select(keep)`` to drop finished rows (only
where ``can_select``).

:class:`KVDecoder` is the project's own forward pass of a Llama-family decoder (Llama, Qwen2, Qwen3, Mistral
without sliding window, SmolLM2 ...) on the model's own weights. Up to a billion parameters, query/key/value are
fused into one matrix and gate/up into another, re-fused at every ``generate`` so that they hold the current
weights (larger models use their projections as they are, to spare the copy). It uses the group structure of RL
rollouts the way prefix caching does: the prompt of a group is prefilled *once* (not ``n`` times) and its keys and
values are stored once, ``(len(prompts), H_kv, P, D)`` per layer; the generated tokens have their own preallocated
cache ``(B, H_kv, max_new, D)``, written in place. At a decode step the attention of row ``r`` of group ``g`` is
one softmax over ``[prompt keys of g | generated keys of r]``:

    s = [q K_g^T, q K_r^T] * scale  (padding of the prompt masked),   out = softmax(s) [V_g; V_r],

where the prompt part is a real matrix product per group (the ``n`` queries of a group times its shared keys) and
the generated part a batched product per row. Rotary tables come from the model's own rotary module. Numerically
this is the transformers forward; the tests compare the log-probs with a teacher-forced pass within 1e-4.

Two switches, off by default because each changes the samples: ``fused_attention`` runs the new token's rotary,
cache writes and the decode attention above as one compiled call, and the SwiGLU as another
(:mod:`tokenmdp.rollout.fused`; float rounding), the RMSNorms by the update's kernel
(:mod:`tokenmdp.policy.fused_layers`), and ``quantize="int8"`` runs the linear layers as int8 copies of
the weights (:func:`tokenmdp.rollout.fused.int8_projection`; a slightly different policy: a LoRA model's base
weights in int8, quantised once while they do not change, its adapters in float32). With the fused step,
``kv_cache_dtype="float16"`` stores the generated keys and values in float16: the step reads every live row's
cache at every token, and half the bytes make it faster where memory is the limit (the same step over rounded
caches, tested).

:class:`HFDecoder` runs any other causal LM through its transformers forward and cache, one token per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmdp.errors import TokenMDPError
from tokenmdp.policy import fused_layers
from tokenmdp.policy.shared_prompt import cache_kwarg
from tokenmdp.rollout import fused
from tokenmdp.rollout.fused import int8_projection
from tokenmdp.rollout.weights import bias_of, cat_biases, int8_part, weight_of

SUPPORTED = fused_layers.SUPPORTED


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class _Layer:
    w_qkv: torch.Tensor | None  # (Hq*D + 2*Hkv*D, H), None when not fused
    b_qkv: torch.Tensor | None
    w_gate_up: torch.Tensor | None  # (2*I, H), None when not fused
    attn: nn.Module
    mlp: nn.Module
    o_proj: nn.Module
    ln1: tuple[torch.Tensor, float]
    ln2: tuple[torch.Tensor, float]
    down: nn.Module
    act: Any
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    scaling: float
    q8: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None  # int8 qkv, o, gate_up, down (quantize)


def kv_cache_dtype_of(name: str, fused_attention: bool) -> torch.dtype | None:
    """The generated keys' and values' storage type for ``kv_cache_dtype`` (None: the model's own). "float16"
    halves the bytes the fused decode step reads at every step; only that kernel reads it."""
    if name == "auto":
        return None
    if name != "float16":
        raise TokenMDPError(f"kv_cache_dtype must be 'auto' (the model's type) or 'float16', got {name!r}")
    if not fused_attention:
        raise TokenMDPError("kv_cache_dtype='float16' needs fused_attention=True (only the fused decode step reads a "
                            "float16 cache)")
    return torch.float16


def kv_decoder_supported(model: nn.Module) -> bool:
    """Whether :class:`KVDecoder` can run ``model`` (a Llama-family decoder without sliding-window attention:
    :func:`tokenmdp.policy.fused_layers.llama_family`)."""
    return fused_layers.llama_family(model)


def _norm_parts(norm: nn.Module) -> tuple[torch.Tensor, float]:
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    return norm.weight, float(eps)


def _fuse(layer: nn.Module, head_dim: int, fuse: bool, quantize: bool = False) -> _Layer:
    """The pieces of one decoder layer; with ``fuse``, q/k/v and gate/up weights concatenated (a copy); with
    ``quantize``, int8 copies of the four matmuls' weights instead (q/k/v and gate/up fused too)."""
    a, m = layer.self_attn, layer.mlp
    projs = (a.q_proj, a.k_proj, a.v_proj)
    w_qkv = b_qkv = w_gate_up = None
    if fuse and not quantize:
        ws = [weight_of(p) for p in projs]
        w_qkv = torch.cat(ws)
        w_gate_up = torch.cat([weight_of(m.gate_proj), weight_of(m.up_proj)])
        b_qkv = cat_biases([bias_of(p) for p in projs], ws)
    q8 = None
    if quantize:  # int8 base weights (kept while unchanged), LoRA deltas in float32; no float copies
        q8 = {"qkv": int8_projection([int8_part(p) for p in projs]), "o": int8_projection([int8_part(a.o_proj)]),
              "gate_up": int8_projection([int8_part(m.gate_proj), int8_part(m.up_proj)]),
              "down": int8_projection([int8_part(m.down_proj)])}
    return _Layer(
        q8=q8,
        w_qkv=w_qkv,
        b_qkv=b_qkv,
        w_gate_up=w_gate_up,
        attn=a,
        mlp=m,
        o_proj=a.o_proj,
        ln1=_norm_parts(layer.input_layernorm),
        ln2=_norm_parts(layer.post_attention_layernorm),
        down=m.down_proj,
        act=m.act_fn,
        q_norm=getattr(a, "q_norm", None),
        k_norm=getattr(a, "k_norm", None),
        scaling=float(getattr(a, "scaling", None) or head_dim**-0.5),
    )


#: Models up to this many parameters get fused projection weights (a copy of ~2/3 of the weights per generate).
FUSE_MAX_PARAMS = 1_000_000_000


class KVDecoder:
    """Own incremental forward of a Llama-family decoder with a shared prompt cache (see the module docstring)."""

    can_select = True

    def __init__(self, model: nn.Module, *, fuse: bool | None = None, fused_attention: bool = False,
                 quantize: str | None = None, kv_cache_dtype: str = "auto"):
        cfg = model.config
        base = model.model
        if quantize not in (None, "int8"):
            raise TokenMDPError(f"quantize must be None or 'int8', got {quantize!r}")
        self.kv_dtype = kv_cache_dtype_of(kv_cache_dtype, fused_attention)
        if quantize:
            fuse = True  # the int8 copies fuse q/k/v and gate/up
        elif fuse is None:
            fuse = sum(p.numel() for p in model.parameters()) <= FUSE_MAX_PARAMS
        self.embed = base.embed_tokens
        self.final_norm = _norm_parts(base.norm)
        self.rotary = base.rotary_emb
        self.head = model.get_output_embeddings()
        self.hq = cfg.num_attention_heads
        self.hk = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if quantize and self.embed.weight.device.type != "cpu":
            raise TokenMDPError(f"quantize='int8' runs fbgemm's CPU kernels; the model is on "
                                f"{self.embed.weight.device}")
        self.layers = [_fuse(layer, self.d, fuse, bool(quantize)) for layer in base.layers]
        self.head_fn = int8_projection([int8_part(self.head)]) if quantize else self.head
        # the fused decode step (tokenmdp.rollout.fused), on request; None: torch operators
        self.silu = getattr(cfg, "hidden_act", None) in ("silu", "swish")  # the kernel's SwiGLU applies
        self.fused = None
        if fused_attention:
            weight = self.embed.weight
            if weight.device.type != "cpu" or weight.dtype != torch.float32:
                raise TokenMDPError(f"fused_attention needs float32 weights on the CPU, got {weight.dtype} on "
                                    f"{weight.device}")
            self.fused = fused.load()
            if self.fused is None:
                raise TokenMDPError("fused_attention=True, but the fused decode attention could not be built here "
                                    "(see the warning above); leave it off to use torch operators")
        # with it, the RMSNorms by the update's kernel (tokenmdp.policy.fused_layers), else torch's
        self.norm_kernel = fused_layers.kernels() if self.fused is not None else None

    def _norm(self, x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
        if self.norm_kernel is not None:
            return self.norm_kernel.rms_norm_forward(x.contiguous(), norm[0].detach(), norm[1])[0]
        return F.rms_norm(x, (x.shape[-1],), norm[0], norm[1])

    # shared pieces ------------------------------------------------------------------------------------------
    def _qkv(self, x: torch.Tensor, layer: _Layer, pos: torch.Tensor | None):
        """Rotated q (B, S, Hq, D), k and v (B, S, Hkv, D) of hidden states x (B, S, H) at positions pos (B, S);
        unrotated where ``pos`` is None (the fused kernel rotates them)."""
        b, s, _ = x.shape
        if layer.q8 is not None:
            qkv = layer.q8["qkv"](x)
        elif layer.w_qkv is not None:
            qkv = F.linear(x, layer.w_qkv, layer.b_qkv)
        else:
            qkv = torch.cat([layer.attn.q_proj(x), layer.attn.k_proj(x), layer.attn.v_proj(x)], dim=-1)
        qk, v = qkv.split([(self.hq + self.hk) * self.d, self.hk * self.d], dim=-1)
        qk, v = qk.view(b, s, self.hq + self.hk, self.d), v.view(b, s, self.hk, self.d)
        if layer.q_norm is not None:
            qk = torch.cat([layer.q_norm(qk[:, :, : self.hq]), layer.k_norm(qk[:, :, self.hq :])], dim=2)
        if pos is not None:
            cos, sin = self.cos[pos].unsqueeze(2), self.sin[pos].unsqueeze(2)
            qk = qk * cos + _rotate_half(qk) * sin  # rotary on queries and keys at once
        return qk[:, :, : self.hq], qk[:, :, self.hq :], v

    def _block(self, x: torch.Tensor, layer: _Layer, attend) -> torch.Tensor:
        h = self._norm(x, layer.ln1)
        q8 = layer.q8
        x = x + (q8["o"] if q8 else layer.o_proj)(attend(h))
        h = self._norm(x, layer.ln2)
        if q8 is not None or layer.w_gate_up is not None:
            gate_up = q8["gate_up"](h) if q8 is not None else F.linear(h, layer.w_gate_up)
            if self.fused is not None and self.silu:  # SwiGLU in one pass
                inner = self.fused.silu_mul(gate_up)
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                inner = layer.act(gate) * up
        else:
            inner = layer.act(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h)
        return x + (q8["down"] if q8 else layer.down)(inner)

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        return self.head_fn(self._norm(last, self.final_norm))

    # prefill ------------------------------------------------------------------------------------------------
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, n: int, max_new: int) -> torch.Tensor:
        """Run the distinct left-padded prompts (G, P) once; return next-token logits (G * n, V)."""
        g, p = ids.shape
        w = self.embed.weight
        self.n, self.g, self.p = n, g, p
        self.rows = torch.arange(g * n, device=ids.device)  # original row of each live row
        self.group = self.rows // n  # the prompt of each live row
        cos, sin = self.rotary(w[:1].unsqueeze(0), torch.arange(p + max_new, device=w.device).unsqueeze(0))
        self.cos, self.sin = cos[0], sin[0]
        self.prompt_bias = torch.zeros(g, p, dtype=w.dtype, device=w.device).masked_fill(~mask.bool(), float("-inf"))
        gen_shape = (g * n, self.hk, max_new, self.d)
        kv_dtype = self.kv_dtype or w.dtype
        self.kg = [torch.empty(gen_shape, dtype=kv_dtype, device=w.device) for _ in self.layers]
        self.vg = [torch.empty(gen_shape, dtype=kv_dtype, device=w.device) for _ in self.layers]
        self.kp, self.vp = [], []
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        attn = torch.ones(p, p, dtype=torch.bool, device=ids.device).tril().unsqueeze(0) & mask.bool().unsqueeze(1)
        attn = (attn | torch.eye(p, dtype=torch.bool, device=ids.device)).unsqueeze(1)  # pad rows see themselves

        def attend(h: torch.Tensor, layer: _Layer) -> torch.Tensor:
            q, k, v = self._qkv(h, layer, pos)
            k, v = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
            self.kp.append(k)
            self.vp.append(v)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=attn, scale=layer.scaling,
                                                 enable_gqa=self.hq != self.hk)
            return out.transpose(1, 2).reshape(g, p, self.hq * self.d)

        x = self.embed(ids)
        for layer in self.layers:
            x = self._block(x, layer, lambda h, layer=layer: attend(h, layer))
        return self._logits(x[:, -1]).repeat_interleave(n, dim=0)

    # decode -------------------------------------------------------------------------------------------------
    def _to_groups(self, t: torch.Tensor, full: bool) -> torch.Tensor:
        """Per-live-row (R, Hkv, rep, X) -> per-group (G, Hkv, n * rep, X), dead rows zero."""
        if not full:
            buf = t.new_zeros((self.g * self.n,) + tuple(t.shape[1:]))
            t = buf.index_copy(0, self.rows, t)
        g, n = self.g, self.n
        return t.view(g, n, self.hk, -1, t.shape[-1]).transpose(1, 2).reshape(g, self.hk, -1, t.shape[-1])

    def _from_groups(self, t: torch.Tensor, full: bool) -> torch.Tensor:
        """Per-group (G, Hkv, n * rep, X) -> per-live-row (R, Hkv, rep, X)."""
        g, n = self.g, self.n
        t = t.view(g, self.hk, n, -1, t.shape[-1]).transpose(1, 2).reshape(g * n, self.hk, -1, t.shape[-1])
        return t if full else t.index_select(0, self.rows)

    def _decode_attention(self, h: torch.Tensor, layer: _Layer, li: int, pos: torch.Tensor, t: int):
        r = h.shape[0]
        if self.fused is not None:  # rotary, scaling, cache writes and attention in one call
            q, k, v = self._qkv(h, layer, None)
            cos, sin = self.rope_rows
            out = self.fused.rotary_decode_attention(q[:, 0], k[:, 0], v[:, 0], cos, sin, layer.scaling,
                                                     self.kp[li], self.vp[li], self.prompt_bias, self.kg[li],
                                                     self.vg[li], self.group, t + 1, self.rows)
            return out.view(r, 1, self.hq * self.d)
        q, k, v = self._qkv(h, layer, pos)  # (R, 1, H, D)
        self.kg[li][:, :, t] = k[:, 0]
        self.vg[li][:, :, t] = v[:, 0]
        q = q.view(r, self.hk, self.hq // self.hk, self.d) * layer.scaling
        full = r == self.g * self.n
        s_prompt = self._to_groups(q, full) @ self.kp[li].transpose(-1, -2)  # (G, Hkv, n*rep, P)
        s_prompt = self._from_groups(s_prompt + self.prompt_bias[:, None, None, :], full)
        kg, vg = self.kg[li][:, :, : t + 1], self.vg[li][:, :, : t + 1]
        s_gen = q @ kg.transpose(-1, -2)  # (R, Hkv, rep, t+1)
        probs = torch.softmax(torch.cat([s_prompt, s_gen], dim=-1), dim=-1)
        p_prompt, p_gen = probs.split([self.p, t + 1], dim=-1)
        out = self._from_groups(self._to_groups(p_prompt, full) @ self.vp[li], full) + p_gen @ vg
        return out.reshape(r, 1, self.hq * self.d)

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, t: int) -> torch.Tensor:
        """Feed the ``t``-th generated token (R,) of each live row at positions ``pos`` (R,); logits (R, V)."""
        x = self.embed(tokens.unsqueeze(1))
        if self.fused is not None:  # the rotary rows of this step, shared by the layers
            self.rope_rows = self.cos.index_select(0, pos), self.sin.index_select(0, pos)
        pos = pos.unsqueeze(1)
        for li, layer in enumerate(self.layers):
            x = self._block(x, layer, lambda h, li=li, layer=layer: self._decode_attention(h, layer, li, pos, t))
        return self._logits(x[:, -1])

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the live rows ``keep`` (indices into the current live rows). The fused step leaves finished
        rows in the caches and reads each live row's at its original row (``rows``: no copy of the caches); the
        operator path copies the live rows' caches."""
        self.rows = self.rows.index_select(0, keep)
        self.group = self.rows // self.n
        if self.fused is not None:
            return
        self.kg = [k.index_select(0, keep) for k in self.kg]
        self.vg = [v.index_select(0, keep) for v in self.vg]


def _cache_of(out) -> Any:
    """The KV cache a transformers forward returned (``cache`` in 5.x, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class HFDecoder:
    """The generic path: the model's own transformers forward and cache, one token per step (no ``select``)."""

    can_select = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.past: Any = None
        self.attn: torch.Tensor | None = None
        # transformers 5.x names the cache `cache` (in and out); `past_key_values` is deprecated, removed in 5.40
        self.kwarg = cache_kwarg(model) or "past_key_values"

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, n: int, max_new: int) -> torch.Tensor:
        from transformers import DynamicCache

        ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        self.attn = mask.long()
        out = self.model(input_ids=ids, attention_mask=self.attn, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                         use_cache=True, logits_to_keep=1, **{self.kwarg: DynamicCache(config=self.model.config)})
        self.past = _cache_of(out)
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, t: int) -> torch.Tensor:
        self.attn = torch.cat([self.attn, self.attn.new_ones(self.attn.shape[0], 1)], dim=1)
        out = self.model(input_ids=tokens.unsqueeze(1), attention_mask=self.attn, position_ids=pos.unsqueeze(1),
                         use_cache=True, logits_to_keep=1, **{self.kwarg: self.past})
        self.past = _cache_of(out)
        return out.logits[:, -1]

    def select(self, keep: torch.Tensor) -> None:  # pragma: no cover - guarded by can_select
        raise NotImplementedError


def make_decoder(model: nn.Module, kind: str = "auto", *, fuse: bool | None = None,
                 fused_attention: bool = False, quantize: str | None = None,
                 kv_cache_dtype: str = "auto") -> KVDecoder | HFDecoder:
    """``KVDecoder`` when the architecture is supported (or ``kind="kv"``), else ``HFDecoder``.

    ``fuse``: concatenate the q/k/v and gate/up weights (default: for models up to ``FUSE_MAX_PARAMS``).
    ``fused_attention``: the compiled decode step (:mod:`tokenmdp.rollout.fused`; float32 on the CPU).
    ``quantize="int8"``: int8 copies of the linear layers (:func:`tokenmdp.rollout.fused.int8_projection`).
    ``kv_cache_dtype="float16"``: the generated keys and values stored in float16 (with ``fused_attention``).
    """
    if kind == "hf" or (kind == "auto" and not kv_decoder_supported(model)):
        asked = [name for name, on in (("fused_attention=True", fused_attention), (f"quantize={quantize!r}", quantize),
                                       (f"kv_cache_dtype={kv_cache_dtype!r}", kv_cache_dtype != "auto")) if on]
        if asked:
            raise TokenMDPError(f"{asked[0]} needs the own decoder (a Llama-family model, decoder 'kv' or 'auto'); "
                                f"{type(model).__name__} with decoder {kind!r} runs the transformers forward")
        return HFDecoder(model)
    return KVDecoder(model, fuse=fuse, fused_attention=fused_attention, quantize=quantize,
                     kv_cache_dtype=kv_cache_dtype)


__all__ = ["KVDecoder", "HFDecoder", "make_decoder", "kv_cache_dtype_of", "kv_decoder_supported", "SUPPORTED"]
