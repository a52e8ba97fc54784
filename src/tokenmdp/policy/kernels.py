"""The project's C++ kernels, built with the machine's compiler on first use.

``torch.utils.cpp_extension`` compiles a source once per machine and source text and caches the library
(``~/.cache/torch_extensions``; 20-40 s the first time). Two extensions use it: the fused decode step of the
``fast`` engine (:mod:`tokenmdp.rollout.fused`) and the fused layer parts of the update's passes
(:mod:`tokenmdp.policy.fused_layers`); both include ``fast_exp.h`` from this folder.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

#: this machine's vector instructions; OpenMP for ``at::parallel_for`` over rows; reassociated sums (the dot
#: products and the softmax's total vectorise), with infinities kept (the prompt's padding is a -inf bias)
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only"]

_BUILT: dict[str, Any] = {}


def build(name: str, source: Path, fallback: str) -> Any:
    """The compiled extension ``name`` from ``source`` (built once per process), or None where it cannot be built
    here (no compiler, no ``ninja``): one warning then says why and that ``fallback`` runs instead."""
    if name not in _BUILT:
        try:
            from torch.utils.cpp_extension import load  # here: only a run that asks for a kernel pays the import

            _BUILT[name] = load(name=name, sources=[str(source)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                                extra_include_paths=[str(Path(__file__).parent)], verbose=False)
        except Exception as exc:  # the operator path is correct, only slower
            warnings.warn(f"tokenmdp: {name} could not be built ({type(exc).__name__}: {str(exc)[:300]}); "
                          f"{fallback}", stacklevel=3)
            _BUILT[name] = None
    return _BUILT[name]


__all__ = ["CFLAGS", "build"]
