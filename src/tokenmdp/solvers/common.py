"""What every tabular solver returns, and the Bellman pieces they share.

Notation (docs/math.md section 1): ``R[s, a] = sum_s' P[s, a, s'] r[s, a, s']``; ``m[s'] = 0`` on terminal states and
1 elsewhere (the mask that stops value at the end of an episode). Shapes: ``V (S,)``, ``Q (S, A)``,
``policy (S, A)`` with rows summing to 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokenmdp.mdp.tabular import TabularMDP


@dataclass
class SolverResult:
    """The output of a tabular solver.

    ``V`` (S,), ``Q`` (S, A) and ``policy`` (S, A) are numpy arrays; ``iterations`` counts sweeps (evaluation,
    value iteration), improvement steps (policy iteration) or episodes (TD, REINFORCE); ``history`` holds
    per-iteration curves (``delta``, ``return``, ``length``); ``info`` the hyperparameters used.
    """

    method: str
    V: np.ndarray
    Q: np.ndarray
    policy: np.ndarray
    iterations: int
    converged: bool = True
    history: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def greedy_actions(self) -> np.ndarray:
        """(S,) the greedy action ``argmax_a Q(s, a)`` of each state (first one on ties)."""
        return self.Q.argmax(axis=1)

    @property
    def greedy(self) -> np.ndarray:
        """(S, A) the deterministic greedy policy of ``Q`` (equals ``policy`` for VI, PI and TD control)."""
        return greedy_policy(self.Q)

    def to_dict(self, mdp: TabularMDP | None = None) -> dict[str, Any]:
        """A JSON-ready dict; with ``mdp``, also the greedy action names and the greedy path from the start."""
        out: dict[str, Any] = {
            "method": self.method,
            "iterations": self.iterations,
            "converged": self.converged,
            "info": self.info,
            "V": self.V,
            "Q": self.Q,
            "policy": self.policy,
            "greedy": self.greedy_actions,
        }
        if mdp is not None:
            from tokenmdp.solvers.show import greedy_path

            out["greedy_names"] = [
                None if mdp.terminal[s] else mdp.action_names[a] for s, a in enumerate(self.greedy_actions)
            ]
            path = greedy_path(mdp, self.greedy)
            out["path"] = {"states": path.states, "steps": path.steps, "reason": path.reason}
        return out

    def tables(self, mdp: TabularMDP, *, limit: int = 50) -> list:
        """Rich tables: ``V`` (as the grid for grid worlds) and ``Q`` with the greedy action per state."""
        from tokenmdp.solvers.show import q_table, value_table

        return [
            value_table(mdp, self.V, title=f"V ({self.method})", limit=limit),
            q_table(mdp, self.Q, self.policy, limit=limit),
        ]

    def __str__(self) -> str:
        from tokenmdp.solvers.show import result_text

        return result_text(self)


def q_from_v(mdp: TabularMDP, V: np.ndarray) -> np.ndarray:
    """One Bellman backup ``Q[s, a] = R[s, a] + gamma * sum_s' P[s, a, s'] m[s'] V[s']``, 0 on terminal states.

    Shapes: ``V`` (S,) -> ``Q`` (S, A). Chain (n = 6, gamma 0.9) with ``V = [0, 0, 0, 0, 0, 0]``: ``Q[1] =
    [0.1, 0]`` (left enters the small prize), ``Q[4] = [0, 1]``.
    """
    Q = mdp.R + mdp.gamma * mdp.P @ (V * mdp.nonterminal)
    Q[mdp.terminal] = 0.0
    return Q


def greedy_policy(Q: np.ndarray, mdp: TabularMDP | None = None) -> np.ndarray:
    """A deterministic (one-hot) policy taking the first maximising action of ``Q`` (S, A) in each state;
    uniform on terminal states, where no action matters."""
    S, A = Q.shape
    pi = np.zeros((S, A))
    pi[np.arange(S), Q.argmax(axis=1)] = 1.0
    if mdp is not None:
        pi[mdp.terminal] = 1.0 / A
    return pi


def uniform_policy(mdp: TabularMDP) -> np.ndarray:
    """The equiprobable random policy, (S, A) filled with ``1 / A``."""
    return np.full((mdp.n_states, mdp.n_actions), 1.0 / mdp.n_actions)


def epsilon_greedy(Q_row: np.ndarray, epsilon: float) -> np.ndarray:
    """Action probabilities of epsilon-greedy on one row ``Q_row`` (A,): ``epsilon / A`` everywhere plus
    ``1 - epsilon`` shared equally by the maximising actions. ``Q_row = [1, 3, 3]``, ``epsilon = 0.3``:
    ``[0.1, 0.45, 0.45]``."""
    A = Q_row.shape[0]
    best = Q_row == Q_row.max()
    return epsilon / A + (1.0 - epsilon) * best / best.sum()
