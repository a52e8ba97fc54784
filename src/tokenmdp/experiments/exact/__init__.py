"""The exact tier: every algorithm's expected update on a token MDP small enough to enumerate, without sampling.
:mod:`.groups` holds the MDP and its groups, :mod:`.updates` the presets' exact updates, :mod:`.tier` the runs and
dynamics (:func:`run_exact`, :func:`save_exact`), :mod:`.env` the two-LLM case (:func:`run_exact_env`) and
:mod:`.plots` the figures (imported on its own: it pulls in matplotlib)."""

from __future__ import annotations

from tokenmdp.experiments.exact.env import run_exact_env
from tokenmdp.experiments.exact.groups import (ANSWER, EOS, MAX_GROUPS, Groups, Point, count_groups,
                                               enumerate_groups, exact_mdp, final_answer_verifier, make_point,
                                               state_values)
from tokenmdp.experiments.exact.tier import (DEFAULTS, IDENTITY_PRESETS, SKIPPED, dynamics, evaluate_table,
                                             policy_stats, run_exact, run_threads, save_exact)
from tokenmdp.experiments.exact.updates import (GroupBatch, Normalisers, Variant, expected_update,
                                                row_coefficients, theta_free, variants)

__all__ = [
    "ANSWER", "DEFAULTS", "EOS", "IDENTITY_PRESETS", "MAX_GROUPS", "SKIPPED", "GroupBatch", "Groups", "Normalisers",
    "Point", "Variant", "count_groups", "dynamics", "enumerate_groups", "evaluate_table", "exact_mdp",
    "expected_update", "final_answer_verifier", "make_point", "policy_stats", "row_coefficients", "run_exact",
    "run_exact_env", "run_threads", "save_exact", "state_values", "theta_free", "variants",
]
