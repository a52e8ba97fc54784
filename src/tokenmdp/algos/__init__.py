"""The algorithm family as pure functions: tensors in, tensors and a metrics dict out (no model, no I/O).

* :mod:`~tokenmdp.algos.core`: advantage estimators (GRPO, RLOO, REINFORCE, GAE), the clipped policy and value
  losses, aggregations, KL estimators, truncated importance weights, and ``compute_advantages`` (a spec's choices
  turned into advantages).
* :mod:`~tokenmdp.algos.dpo`, :mod:`~tokenmdp.algos.isft`: DPO / IPO, filtered iterative SFT.
* :mod:`~tokenmdp.algos.presets`: ``AlgoSpec`` (one typed choice per axis), the named presets, ``get_algo``.
"""

from __future__ import annotations

from tokenmdp.algos.core import (
    aggregate,
    compute_advantages,
    gae,
    grpo_advantages,
    kl_penalty,
    kl_reward,
    policy_loss,
    reinforce_advantages,
    rloo_advantages,
    value_loss,
    whiten,
)
from tokenmdp.algos.dpo import dpo_loss, preference_pairs
from tokenmdp.algos.isft import isft_loss
from tokenmdp.algos.presets import PRESETS, AlgoSpec, describe, get_algo

__all__ = [
    "AlgoSpec",
    "PRESETS",
    "aggregate",
    "compute_advantages",
    "describe",
    "dpo_loss",
    "gae",
    "get_algo",
    "grpo_advantages",
    "isft_loss",
    "kl_penalty",
    "kl_reward",
    "policy_loss",
    "preference_pairs",
    "reinforce_advantages",
    "rloo_advantages",
    "value_loss",
    "whiten",
]
