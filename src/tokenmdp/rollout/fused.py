"""The `fast` engine's fused decode step (``decode_attention.cpp``), built with the machine's C++ compiler on
first use and cached by torch (``~/.cache/torch_extensions``; about 30 s once per machine and source).

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
built (no compiler, no ``ninja``; a warning says why).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

_STATE: dict[str, Any] = {}
#: this machine's vector instructions; OpenMP for ``at::parallel_for`` over rows; reassociated sums (the dot
#: products and the softmax's total vectorise), with infinities kept (the prompt's padding is a -inf bias)
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only"]


def load() -> Any:
    """The compiled extension (see the .cpp file): ``decode_attention(q, kp, vp, bias, kg, vg, group, len) ->
    out`` and ``rotary_decode_attention(q, k, v, cos, sin, scale, kp, vp, bias, kg, vg, group, len) -> out``
    (the new token's rotary, scaling and cache writes first); None where it cannot be built here."""
    if "fn" not in _STATE:
        _STATE["fn"] = _build()
    return _STATE["fn"]


def _build() -> Any:
    try:
        from torch.utils.cpp_extension import load as build  # here: only a run that asks for the kernel pays it

        ext = build(name="tokenmdp_decode_attention", sources=[str(Path(__file__).with_name("decode_attention.cpp"))],
                    extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler or ninja: the operator path, which is correct, only slower
        warnings.warn(f"tokenmdp: the fused decode attention could not be built ({type(exc).__name__}: "
                      f"{str(exc)[:300]}); the fast engine uses torch operators instead", stacklevel=3)
        return None
    return ext


__all__ = ["load"]
