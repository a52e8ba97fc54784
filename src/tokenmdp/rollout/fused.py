"""The `fast` engine's two speed switches: the fused decode step, and int8 copies of the linear layers.

The fused decode step (``decode_attention.cpp``) is built with the machine's C++ compiler on first use and cached
by torch (``~/.cache/torch_extensions``; about 30 s once per machine and source; :mod:`tokenmdp.policy.kernels`).

Why: at a decode step every row attends to its group's prompt and its own generated keys, a few dozen to a few
hundred columns of width 32-64. As torch operators that is a batch of thousands of matrix-vector products plus
the concatenation, softmax and split of their scores (37% of the tiny model's rollout for 8% of its FLOPs,
``benchmarks/RESULTS.md``), and around it a dozen small operators a layer (rotary, scaling, cache writes, the
SwiGLU's activation and product). The kernel does the new token's rotary, scaling and cache writes, then reads
each key and value once per row (AVX2 where the machine has it, the next rows' caches prefetched), keeps the scores
in a small buffer and writes only the output; ``silu_mul`` does the SwiGLU in one pass. It differs from the
operator path by float rounding (summation order, fused multiply-adds, its own exponential): tested within 1e-5
in ``tests/test_rollout.py``.

Off by default (``FastEngine(fused_attention=True)``, ``rollout.engine_options={fused_attention: true}``): it
moves every seeded rollout by float rounding. ``load()`` returns the compiled module, or None where it cannot be
built (no compiler, no ``ninja``; a warning says why). The step's caches of generated keys and values may be
float16 (``kv_cache_dtype: float16``), widened exactly as they are read: every step reads each live row's whole
cache, from memory once the caches outgrow the CPU's own, and half the bytes read faster (1.1x on the tiny
model's rollouts, ``benchmarks/RESULTS.md``).

:func:`int8_linear` (``rollout.engine_options={quantize: int8}``) runs a linear layer on fbgemm's int8 kernels;
:func:`int8_projection` builds the int8 sampler's projections from it, a LoRA layer's frozen base quantised once
and its adapters added in float32.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tokenmdp.policy.kernels import build
from tokenmdp.rollout.weights import cat_biases


def load() -> Any:
    """The compiled extension (see the .cpp file): ``decode_attention(q, kp, vp, bias, kg, vg, group, len,
    slot=None) -> out`` and ``rotary_decode_attention(q, k, v, cos, sin, scale, kp, vp, bias, kg, vg, group, len,
    slot=None) -> out`` (the new token's rotary, scaling and cache writes first; ``slot``: each live row's row in
    caches that keep finished rows), ``silu_mul(gate_up) -> silu(gate) * up``; None where
    it cannot be built here."""
    return build("tokenmdp_decode_attention", Path(__file__).with_name("decode_attention.cpp"),
                 "the fast engine uses torch operators instead")


def int8_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x W^T + b`` with ``W`` rounded to int8 (one scale per output row, ``max |w| / 127``) and ``x``
    quantised at each call (fbgemm's dynamic int8 linear; activations to 7 bits, as fbgemm needs on AVX2). At the
    decode shapes of SmolLM2-135M on this CPU it runs 3-7x a float32 matmul, with errors of about 2% of the
    largest output: a sampler of its own, whose log-probs are not the policy's (see ``FastEngine``'s
    ``quantize``)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
    with warnings.catch_warnings():  # torch marks quantized tensors deprecated; fbgemm's kernels take no other
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor, torch.quantize_per_channel.*")
        qw = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.detach().float())

    def apply(x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]).contiguous(), packed, True)
        return out.view(*x.shape[:-1], out.shape[-1])

    return apply


#: int8 copies of weights, by the id of the first weight (its entry goes with it), with the weights' identity and
#: version: kept across generates while the weights are unchanged (a LoRA run's base weights never change)
_INT8: dict[int, tuple[weakref.ref, tuple, Callable]] = {}


def int8_projection(parts: Sequence[tuple[torch.Tensor, torch.Tensor | None, Sequence[tuple]]]
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x [W_1; ...; W_k]^T + [b_1; ...; b_k]`` plus each part's LoRA deltas: ``parts`` are ``(weight, bias,
    adapters)`` with ``adapters`` a list of ``(A, B, scaling)`` (peft's ``lora_A``/``lora_B`` weights). The weights
    run as one :func:`int8_linear` (reused while they are the same tensors at the same version), the deltas in
    float32, ``(x A^T) B^T scaling``, as peft applies them: a LoRA run's frozen base is quantised once, and its
    adapters, which change every step, are never rounded. The function's ``base`` is the int8 product."""
    weights = [w for w, _, _ in parts]
    stamp = tuple((id(t), t.data_ptr(), t._version) for w, b, _ in parts for t in (w, b) if t is not None)
    key = id(weights[0])
    hit = _INT8.get(key)
    if hit is not None and hit[0]() is weights[0] and hit[1] == stamp:
        base = hit[2]
    else:
        base = int8_linear(torch.cat(weights) if len(weights) > 1 else weights[0],
                           cat_biases([b for _, b, _ in parts], weights))
        _INT8[key] = (weakref.ref(weights[0], lambda _, key=key: _INT8.pop(key, None)), stamp, base)
    adapters = [(i, a, b, s) for i, (_, _, ads) in enumerate(parts) for a, b, s in ads]
    if not adapters:
        return base
    rows = [0]
    for w in weights:
        rows.append(rows[-1] + w.shape[0])
    a_all = torch.cat([a.detach().float() for _, a, _, _ in adapters])  # (sum of ranks, in)
    b_all = a_all.new_zeros(rows[-1], a_all.shape[0])  # block-diagonal: each adapter's B into its part's rows
    col = 0
    for i, a, b, s in adapters:
        b_all[rows[i]:rows[i + 1], col:col + a.shape[0]] = b.detach().float() * s
        col += a.shape[0]

    def apply(x: torch.Tensor) -> torch.Tensor:
        out = base(x)
        flat = out.view(-1, out.shape[-1])
        flat.addmm_(F.linear(x.reshape(-1, x.shape[-1]), a_all), b_all.t())
        return out

    apply.base = base  # type: ignore[attr-defined]
    return apply


__all__ = ["int8_linear", "int8_projection", "load"]
