"""Tabular REINFORCE with a softmax policy, and the exact policy gradient it estimates (numpy only).

Policy ``pi(a|s) = softmax(theta[s])_a`` with ``theta`` (S, A). The score is ``d log pi(a|s) / d theta[s, .] =
onehot(a) - pi(.|s)`` (zero for other states). One episode ``s_0, a_0, r_1, ..., s_T`` gives

    g = sum_t gamma^t (G_t - b(s_t)) (onehot(a_t) - pi(.|s_t))   added into row s_t,
    G_t = sum_k gamma^k r_{t+k+1},

an unbiased estimate of the exact gradient (for any baseline ``b`` that does not depend on ``a_t``)

    dJ/dtheta[s, a] = d(s) pi(a|s) (Q(s, a) - V(s)),   d(s) = sum_t gamma^t Pr(s_t = s),

with ``J = sum_s start(s) V(s)``. :func:`exact_policy_gradient` computes the right side by one linear solve;
tests check the Monte Carlo mean against it.

Hand-checked (tests): ``theta = 0`` with two actions, one step ``s=0, a=1, r=1``, gamma 1, no baseline:
``g[0] = 1 * ([0, 1] - [0.5, 0.5]) = [-0.5, 0.5]``.
"""

from __future__ import annotations

import numpy as np

from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.tabular import TabularMDP
from tokenmdp.solvers.common import SolverResult
from tokenmdp.solvers.dp import evaluate_policy, policy_matrices
from tokenmdp.solvers.td import Sampler


def softmax_policy(theta: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``theta`` (S, A) -> (S, A); ``[[0, log 3]] -> [[0.25, 0.75]]``."""
    z = theta - theta.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """``G_t = r_{t+1} + gamma G_{t+1}`` (T,) -> (T,); ``[0, 0, 1]``, gamma 0.9 -> ``[0.81, 0.9, 1]``."""
    G = np.zeros(len(rewards))
    acc = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        acc = rewards[t] + gamma * acc
        G[t] = acc
    return G


def reinforce_gradient(
    theta: np.ndarray,
    states: np.ndarray,
    actions: np.ndarray,
    rewards: np.ndarray,
    gamma: float,
    baseline: np.ndarray | None = None,
) -> np.ndarray:
    """The one-episode REINFORCE estimate ``g`` (S, A) of ``dJ/dtheta`` (see the module docstring).

    ``states``, ``actions``, ``rewards`` are (T,): ``rewards[t]`` follows ``actions[t]`` taken in ``states[t]``.
    ``baseline`` (S,) is subtracted from ``G_t``.
    """
    pi = softmax_policy(theta)
    G = discounted_returns(np.asarray(rewards, dtype=np.float64), gamma)
    if baseline is not None:
        G = G - baseline[states]
    weights = gamma ** np.arange(len(states)) * G
    score = -pi[states]
    score[np.arange(len(states)), actions] += 1.0
    grad = np.zeros_like(theta, dtype=np.float64)
    np.add.at(grad, states, weights[:, None] * score)
    return grad


def exact_policy_gradient(mdp: TabularMDP, theta: np.ndarray) -> tuple[float, np.ndarray]:
    """Exact ``J(theta)`` and ``dJ/dtheta[s, a] = d(s) pi(a|s) (Q(s, a) - V(s))`` (S, A) for the softmax policy.

    ``d = start_N (I - gamma P_pi[N, N])^-1`` on the non-terminal states N (0 on terminal ones).
    """
    pi = softmax_policy(theta)
    res = evaluate_policy(mdp, pi)
    P_pi, _ = policy_matrices(mdp, pi)
    N = mdp.nonterminal
    d = np.zeros(mdp.n_states)
    d[N] = np.linalg.solve((np.eye(int(N.sum())) - mdp.gamma * P_pi[np.ix_(N, N)]).T, mdp.start[N])
    grad = d[:, None] * pi * (res.Q - res.V[:, None])
    return float(mdp.start @ res.V), grad


def sample_episode(
    env: Sampler, pi: np.ndarray, rng: np.random.Generator, max_steps: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One episode under ``pi`` (S, A): arrays of states, actions and rewards, each (T,)."""
    cdf = np.cumsum(pi, axis=1)
    states, actions, rewards = [], [], []
    s = env.reset()
    for _ in range(max_steps):
        a = min(int(np.searchsorted(cdf[s], rng.random(), side="right")), pi.shape[1] - 1)
        s2, r = env.step(s, a)
        states.append(s)
        actions.append(a)
        rewards.append(r)
        if env.mdp.terminal[s2]:
            break
        s = s2
    return np.array(states, dtype=np.int64), np.array(actions, dtype=np.int64), np.array(rewards)


def reinforce(
    mdp: TabularMDP,
    *,
    episodes: int = 1000,
    alpha: float = 0.5,
    baseline: str = "state",
    baseline_alpha: float = 0.1,
    seed: int = 0,
    max_steps: int = 1000,
    progress=None,
) -> SolverResult:
    """Tabular REINFORCE: after each episode ``theta += alpha * g`` (one-episode estimate, ``theta`` fixed
    within the episode), from ``theta = 0`` (the uniform policy).

    ``baseline``: ``"state"`` (a running Monte Carlo estimate ``b(s) += baseline_alpha (G - b(s))``),
    ``"none"``. The result's ``policy`` is ``softmax(theta)``; its ``V`` and ``Q`` are the exact values of
    that policy; ``history["return"]`` the undiscounted return of each episode; ``info["theta"]`` the logits.
    """
    if baseline not in ("state", "none"):
        raise TokenMDPError(f"baseline must be 'state' or 'none'; got '{baseline}'")
    if episodes < 1:
        raise TokenMDPError(f"episodes must be at least 1; got {episodes}")
    if alpha <= 0:
        raise TokenMDPError(f"alpha (step size) must be positive; got {alpha}")
    rng = np.random.default_rng(seed)
    env = Sampler(mdp, rng)
    theta = np.zeros((mdp.n_states, mdp.n_actions))
    b = np.zeros(mdp.n_states) if baseline == "state" else None
    returns: list[float] = []
    for ep in range(episodes):
        states, actions, rewards = sample_episode(env, softmax_policy(theta), rng, max_steps)
        grad = reinforce_gradient(theta, states, actions, rewards, mdp.gamma, b)
        if b is not None:
            G = discounted_returns(rewards, mdp.gamma)
            for s, g in zip(states, G):
                b[s] += baseline_alpha * (g - b[s])
        theta += alpha * grad
        returns.append(float(rewards.sum()))
        if progress is not None:
            progress(ep + 1)
    pi = softmax_policy(theta)
    res = evaluate_policy(mdp, pi)
    return SolverResult(
        "reinforce", res.V, res.Q, pi, iterations=episodes, history={"return": returns},
        info={"alpha": alpha, "baseline": baseline, "seed": seed, "max_steps": max_steps, "theta": theta},
    )
