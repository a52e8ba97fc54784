"""The algorithm family as pure functions: tensors in, tensors and a metrics dict out (no model, no I/O).

* :mod:`~tokenmdp.algos.advantages`: GRPO, RLOO, REINFORCE baselines, GAE.
* :mod:`~tokenmdp.algos.losses`: the clipped policy loss, aggregations, KL estimators, the clipped value loss.
* :mod:`~tokenmdp.algos.dpo`, :mod:`~tokenmdp.algos.isft`: DPO / IPO, filtered iterative SFT.
* :mod:`~tokenmdp.algos.registry`: ``AlgoSpec``, the named presets, ``get_algo``, ``compute_advantages``.
"""

from __future__ import annotations

from tokenmdp.algos.advantages import gae, grpo_advantages, reinforce_advantages, rloo_advantages, whiten
from tokenmdp.algos.dpo import dpo_loss, preference_pairs
from tokenmdp.algos.isft import isft_loss
from tokenmdp.algos.losses import aggregate, kl_penalty, kl_reward, policy_loss, value_loss
from tokenmdp.algos.registry import PRESETS, AlgoSpec, compute_advantages, describe, get_algo

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
