"""The policy of the token MDP: any Hugging Face causal LM, per-token log-probs, a critic, the tiny base model.

Submodules are imported lazily so that ``import tokenmdp.policy`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Policy": "tokenmdp.policy.model",
    "load_policy": "tokenmdp.policy.model",
    "find_smollm2_gguf": "tokenmdp.policy.model",
    "sequence_logprobs": "tokenmdp.policy.logprobs",
    "ValueModel": "tokenmdp.policy.value_head",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tokenmdp.policy' has no attribute {name!r}")


__all__ = list(_EXPORTS)
