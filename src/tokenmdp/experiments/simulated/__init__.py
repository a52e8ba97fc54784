"""The simulated tier: sampled training of many seeds on an enumerable token MDP with a tabular softmax policy,
between the exact tier and the tiny LM. :mod:`.types` holds the MDP and the exact expected update of any group
size, :mod:`.tier` the sampled runs and the exact path, :mod:`.sweep` the grid and its summaries, :mod:`.plots` the
figures (imported on its own: it pulls in matplotlib)."""

from __future__ import annotations

from tokenmdp.experiments.simulated.sweep import DEFAULTS, clopper_pearson, run_sweep, save_sweep, summarize
from tokenmdp.experiments.simulated.tier import (COLLAPSE_FRACTION, OPTIMIZERS, START_SEED, SimRun, check_variant,
                                                 collapse_steps, exact_path, policy_curves, resolve, sampled_grad,
                                                 simulate)
from tokenmdp.experiments.simulated.types import (TypeTable, TypeUpdate, logits, response_types, sim_table,
                                                  start_params, type_update)

__all__ = [
    "COLLAPSE_FRACTION", "DEFAULTS", "OPTIMIZERS", "START_SEED", "SimRun", "TypeTable", "TypeUpdate",
    "check_variant", "clopper_pearson", "collapse_steps", "exact_path", "logits", "policy_curves", "resolve",
    "response_types", "run_sweep", "sampled_grad", "save_sweep", "sim_table", "simulate", "start_params",
    "summarize", "type_update",
]
