"""Tabular solvers (numpy only): dynamic programming, TD control and REINFORCE.

Every solver takes a :class:`~tokenmdp.mdp.tabular.TabularMDP` and returns a :class:`SolverResult` with ``V``
(S,), ``Q`` (S, A) and ``policy`` (S, A). :func:`solve` dispatches by the method names the CLI uses.
"""

from __future__ import annotations

from typing import Any

from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.tabular import TabularMDP
from tokenmdp.solvers.common import SolverResult, greedy_policy, q_from_v, uniform_policy
from tokenmdp.solvers.dp import evaluate_policy, iterative_evaluation, policy_iteration, value_iteration
from tokenmdp.solvers.policy_gradient import exact_policy_gradient, reinforce, softmax_policy
from tokenmdp.solvers.show import Path, greedy_path, path_picture, policy_picture
from tokenmdp.solvers.td import expected_sarsa, q_learning, sarsa, td_control

DP_METHODS = ("vi", "pi", "eval", "iterative-eval")
SAMPLE_METHODS = ("q-learning", "sarsa", "expected-sarsa", "reinforce")
METHODS = DP_METHODS + SAMPLE_METHODS


def solve(
    mdp: TabularMDP,
    method: str,
    *,
    episodes: int | None = None,
    alpha: float | None = None,
    epsilon: float = 0.1,
    seed: int = 0,
    max_steps: int | None = None,
    progress: Any = None,
) -> SolverResult:
    """Run ``method`` (one of :data:`METHODS`) on ``mdp``.

    ``eval`` and ``iterative-eval`` evaluate the equiprobable random policy. Sample-based methods use
    ``episodes`` (default 500 for TD, 1000 for REINFORCE), ``alpha`` (default 0.5), ``seed``, ``max_steps``;
    TD methods also ``epsilon``.
    """
    if method == "vi":
        return value_iteration(mdp)
    if method == "pi":
        return policy_iteration(mdp)
    if method == "eval":
        return evaluate_policy(mdp)
    if method == "iterative-eval":
        return iterative_evaluation(mdp)
    kw: dict[str, Any] = {"seed": seed, "progress": progress, "alpha": 0.5 if alpha is None else alpha}
    if method in ("q-learning", "sarsa", "expected-sarsa"):
        return td_control(mdp, method, episodes=episodes or 500, epsilon=epsilon,
                          max_steps=max_steps or 10_000, **kw)
    if method == "reinforce":
        return reinforce(mdp, episodes=episodes or 1000, max_steps=max_steps or 1000, **kw)
    raise TokenMDPError(f"unknown method '{method}'; known: {', '.join(METHODS)}")


__all__ = [
    "METHODS", "Path", "SolverResult", "evaluate_policy", "exact_policy_gradient", "expected_sarsa",
    "greedy_path", "greedy_policy", "iterative_evaluation", "path_picture", "policy_iteration",
    "policy_picture", "q_from_v", "q_learning", "reinforce", "sarsa", "softmax_policy", "solve",
    "td_control", "uniform_policy", "value_iteration",
]
