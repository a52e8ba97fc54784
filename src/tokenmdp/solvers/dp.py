"""Dynamic programming on a :class:`~tokenmdp.mdp.tabular.TabularMDP` (numpy only).

* :func:`evaluate_policy` — exact: ``V_N = (I - gamma P_pi[N, N])^-1 R_pi[N]`` on the non-terminal states ``N``,
  with ``P_pi[s, s'] = sum_a pi(a|s) P[s, a, s']`` and ``R_pi[s] = sum_a pi(a|s) R[s, a]``.
* :func:`iterative_evaluation` — repeated Bellman expectation backups until ``max |V_k+1 - V_k| < tol``.
* :func:`value_iteration` — ``V_k+1(s) = max_a Q_k(s, a)``, ``Q_k = R + gamma P (m * V_k)``.
* :func:`policy_iteration` — exact evaluation then greedy improvement until the policy is stable.

Checked numbers (tests/test_solvers.py): the 4x4 gridworld under the random policy, gamma 1, gives Sutton &
Barto's figure 4.1 values ``0, -14, -20, -22, -14, -18, -20, -20, ...``; on the default chain ``V*(1) = 0.729``.
"""

from __future__ import annotations

import numpy as np

from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.tabular import TabularMDP
from tokenmdp.solvers.common import SolverResult, greedy_policy, q_from_v, uniform_policy


def check_policy(mdp: TabularMDP, policy: np.ndarray) -> np.ndarray:
    """Validate a stochastic policy (S, A): non-negative rows summing to 1 within 1e-8."""
    pi = np.asarray(policy, dtype=np.float64)
    if pi.shape != (mdp.n_states, mdp.n_actions):
        raise TokenMDPError(f"policy must have shape (S, A) = ({mdp.n_states}, {mdp.n_actions}); got {pi.shape}")
    if not np.isfinite(pi).all() or (pi < 0).any():
        raise TokenMDPError("policy must have finite, non-negative probabilities")
    sums = pi.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > 1e-8)
    if bad.size:
        raise TokenMDPError(f"policy row {int(bad[0])} sums to {sums[bad[0]]:.10g}, not 1")
    return pi


def policy_matrices(mdp: TabularMDP, policy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``P_pi`` (S, S) and ``R_pi`` (S,): the Markov chain and expected reward of following ``policy``."""
    return np.einsum("sa,sat->st", policy, mdp.P), (policy * mdp.R).sum(axis=1)


def _check_proper(mdp: TabularMDP, P_pi: np.ndarray) -> None:
    """With gamma = 1 every state must reach a terminal state under the policy, else V is unbounded."""
    can_end = mdp.terminal.copy()
    while True:
        grown = can_end | (P_pi[:, can_end].sum(axis=1) > 0)
        if (grown == can_end).all():
            break
        can_end = grown
    stuck = np.flatnonzero(~can_end)
    if stuck.size:
        names = ", ".join(mdp.state_names[s] for s in stuck[:5])
        raise TokenMDPError(
            f"with gamma = 1 the policy never reaches a terminal state from {stuck.size} state(s) ({names}); "
            "use gamma < 1 or a policy that ends episodes"
        )


def evaluate_policy(mdp: TabularMDP, policy: np.ndarray | None = None) -> SolverResult:
    """Exact policy evaluation by one linear solve (default policy: equiprobable random).

    ``(I - gamma P_pi[N, N]) V_N = R_pi[N]``, ``V = 0`` on terminal states; ``Q`` by one backup of ``V``.
    """
    pi = uniform_policy(mdp) if policy is None else check_policy(mdp, policy)
    P_pi, R_pi = policy_matrices(mdp, pi)
    if mdp.gamma == 1.0:
        _check_proper(mdp, P_pi)
    N = mdp.nonterminal
    A = np.eye(int(N.sum())) - mdp.gamma * P_pi[np.ix_(N, N)]
    V = np.zeros(mdp.n_states)
    V[N] = np.linalg.solve(A, R_pi[N])
    return SolverResult("eval", V, q_from_v(mdp, V), pi, iterations=1, info={"solver": "linear solve"})


def iterative_evaluation(
    mdp: TabularMDP,
    policy: np.ndarray | None = None,
    *,
    tol: float = 1e-10,
    max_iter: int = 100_000,
    in_place: bool = False,
) -> SolverResult:
    """Iterative policy evaluation: ``V_k+1 = R_pi + gamma P_pi (m * V_k)`` until ``max |dV| < tol``.

    ``in_place=True`` sweeps the states one by one using the newest values (Sutton & Barto's in-place
    version, fewer sweeps); otherwise the sweep is synchronous. ``converged`` is False if ``max_iter`` is hit.
    """
    pi = uniform_policy(mdp) if policy is None else check_policy(mdp, policy)
    P_pi, R_pi = policy_matrices(mdp, pi)
    P_pi = P_pi * mdp.nonterminal[None, :]
    V = np.zeros(mdp.n_states)
    deltas: list[float] = []
    live = np.flatnonzero(mdp.nonterminal)
    for k in range(1, max_iter + 1):  # noqa: B007 - k, the iteration count, is read after the loop
        if in_place:
            old = V.copy()
            for s in live:
                V[s] = R_pi[s] + mdp.gamma * P_pi[s] @ V
        else:
            old, V = V, R_pi + mdp.gamma * P_pi @ V
            V[mdp.terminal] = 0.0
        delta = float(np.abs(V - old).max())
        deltas.append(delta)
        if delta < tol:
            break
    converged = deltas[-1] < tol
    return SolverResult("iterative-eval", V, q_from_v(mdp, V), pi, iterations=k, converged=converged,
                        history={"delta": deltas}, info={"tol": tol, "in_place": in_place})


def value_iteration(mdp: TabularMDP, *, tol: float = 1e-10, max_iter: int = 100_000) -> SolverResult:
    """Value iteration from ``V_0 = 0``: ``V_k+1 = max_a [R + gamma P (m * V_k)]`` until ``max |dV| < tol``.

    Returns the greedy (one-hot) policy of the final ``Q``.
    """
    V = np.zeros(mdp.n_states)
    deltas: list[float] = []
    for k in range(1, max_iter + 1):  # noqa: B007 - k, the iteration count, is read after the loop
        Q = q_from_v(mdp, V)
        V_new = Q.max(axis=1)
        delta = float(np.abs(V_new - V).max())
        V = V_new
        deltas.append(delta)
        if delta < tol:
            break
    Q = q_from_v(mdp, V)
    return SolverResult("vi", V, Q, greedy_policy(Q, mdp), iterations=k, converged=deltas[-1] < tol,
                        history={"delta": deltas}, info={"tol": tol})


def policy_iteration(
    mdp: TabularMDP, policy: np.ndarray | None = None, *, max_iter: int = 1000, tol: float = 1e-9
) -> SolverResult:
    """Policy iteration: exact evaluation, then greedy improvement, until the policy no longer changes.

    Starts from ``policy`` (default equiprobable random). An action is kept when it is within ``tol`` of the
    best one, so ties cannot make the loop cycle. ``iterations`` counts evaluations.
    """
    pi = uniform_policy(mdp) if policy is None else check_policy(mdp, policy)
    changes: list[float] = []
    for k in range(1, max_iter + 1):
        res = evaluate_policy(mdp, pi)
        Q = res.Q
        current = pi.argmax(axis=1)
        best = Q.argmax(axis=1)
        rows = np.arange(mdp.n_states)
        keep = (pi[rows, current] == 1.0) & (Q[rows, current] >= Q[rows, best] - tol)
        new_pi = greedy_policy(Q, mdp)
        new_pi[keep] = pi[keep]
        new_pi[mdp.terminal] = 1.0 / mdp.n_actions
        n_changed = int((np.abs(new_pi - pi).sum(axis=1) > 0)[mdp.nonterminal].sum())
        changes.append(float(n_changed))
        if n_changed == 0:
            return SolverResult("pi", res.V, Q, pi, iterations=k, history={"changed": changes})
        pi = new_pi
    res = evaluate_policy(mdp, pi)
    return SolverResult("pi", res.V, res.Q, pi, iterations=max_iter, converged=False,
                        history={"changed": changes})
