"""Temporal-difference control on a sampled :class:`~tokenmdp.mdp.tabular.TabularMDP` (numpy only).

One update rule, three bootstrap targets (``m[s'] = 0`` if ``s'`` is terminal, else 1):

* SARSA:           ``y = r + gamma m[s'] Q(s', a')`` with ``a'`` the epsilon-greedy action actually taken next;
* Q-learning:      ``y = r + gamma m[s'] max_a' Q(s', a')``;
* expected SARSA:  ``y = r + gamma m[s'] sum_a' pi_eps(a'|s') Q(s', a')``;

then ``Q(s, a) <- Q(s, a) + alpha (y - Q(s, a))``. Behaviour is epsilon-greedy with random tie-breaking, drawn
from a seeded ``numpy.random.Generator``, so a seed fixes the whole run. On cliff walking (epsilon 0.1,
alpha 0.5) Q-learning's greedy path runs along the cliff (13 steps) and SARSA's keeps away from it
(Sutton & Barto example 6.6).

Hand-checked single update (tests): ``Q = 0``, ``alpha = 0.5``, ``r = -1``, ``gamma = 1``, ``Q(s') = [2, 4]``,
``epsilon = 0.2``: Q-learning ``y = 3`` -> ``Q(s, a) = 1.5``; expected SARSA ``y = -1 + 0.1*2 + 0.9*4 = 2.8``
-> ``1.4``; SARSA with ``a' = 0``: ``y = 1`` -> ``0.5``.
"""

from __future__ import annotations

import numpy as np

from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.tabular import TabularMDP
from tokenmdp.solvers.common import SolverResult, epsilon_greedy, greedy_policy

RULES = ("q-learning", "sarsa", "expected-sarsa")


class Sampler:
    """Draws start states and transitions of ``mdp`` with a seeded generator (inverse-CDF sampling)."""

    def __init__(self, mdp: TabularMDP, rng: np.random.Generator) -> None:
        self.mdp = mdp
        self.rng = rng
        self.cdf = np.cumsum(mdp.P, axis=2)
        self.start_cdf = np.cumsum(mdp.start)
        self.last = mdp.n_states - 1

    def reset(self) -> int:
        return min(int(np.searchsorted(self.start_cdf, self.rng.random(), side="right")), self.last)

    def step(self, s: int, a: int) -> tuple[int, float]:
        s2 = min(int(np.searchsorted(self.cdf[s, a], self.rng.random(), side="right")), self.last)
        return s2, self.mdp.reward(s, a, s2)


def td_target(rule: str, r: float, q_next: np.ndarray | None, gamma: float, *, epsilon: float,
              a_next: int | None = None) -> float:
    """The bootstrap target ``y`` of ``rule``; ``q_next`` is ``Q(s', .)`` (A,), or None when ``s'`` is terminal."""
    if q_next is None:
        return r
    if rule == "q-learning":
        return r + gamma * float(q_next.max())
    if rule == "sarsa":
        return r + gamma * float(q_next[a_next])
    if rule == "expected-sarsa":
        return r + gamma * float(epsilon_greedy(q_next, epsilon) @ q_next)
    raise TokenMDPError(f"unknown TD rule '{rule}'; known: {', '.join(RULES)}")


def _choose(rng: np.random.Generator, q_row: np.ndarray, epsilon: float) -> int:
    if rng.random() < epsilon:
        return int(rng.integers(q_row.shape[0]))
    best = np.flatnonzero(q_row == q_row.max())
    return int(best[0]) if best.size == 1 else int(rng.choice(best))


def _check(episodes: int, alpha: float, epsilon: float, max_steps: int) -> None:
    if episodes < 1:
        raise TokenMDPError(f"episodes must be at least 1; got {episodes}")
    if not 0.0 < alpha <= 1.0:
        raise TokenMDPError(f"alpha (step size) must be in (0, 1]; got {alpha}")
    if not 0.0 <= epsilon <= 1.0:
        raise TokenMDPError(f"epsilon must be in [0, 1]; got {epsilon}")
    if max_steps < 1:
        raise TokenMDPError(f"max_steps must be at least 1; got {max_steps}")


def td_control(
    mdp: TabularMDP,
    rule: str,
    *,
    episodes: int = 500,
    alpha: float = 0.5,
    epsilon: float = 0.1,
    seed: int = 0,
    max_steps: int = 10_000,
    progress=None,
) -> SolverResult:
    """Run ``episodes`` episodes of epsilon-greedy TD control with ``rule`` from ``Q = 0``.

    An episode ends at a terminal state or after ``max_steps`` steps (truncated: no special update, the last
    target already bootstrapped). ``history`` holds each episode's undiscounted ``return`` and ``length``.
    ``progress``, if given, is called with the episode number after each episode.
    """
    if rule not in RULES:
        raise TokenMDPError(f"unknown TD rule '{rule}'; known: {', '.join(RULES)}")
    _check(episodes, alpha, epsilon, max_steps)
    rng = np.random.default_rng(seed)
    env = Sampler(mdp, rng)
    Q = np.zeros((mdp.n_states, mdp.n_actions))
    term, gamma = mdp.terminal, mdp.gamma
    returns: list[float] = []
    lengths: list[float] = []
    for ep in range(episodes):
        s = env.reset()
        a = _choose(rng, Q[s], epsilon)
        total, t = 0.0, 0
        for t in range(1, max_steps + 1):  # noqa: B007 - t, the episode length, is read after the loop
            s2, r = env.step(s, a)
            total += r
            a2 = None if term[s2] or rule != "sarsa" else _choose(rng, Q[s2], epsilon)
            y = td_target(rule, r, None if term[s2] else Q[s2], gamma, epsilon=epsilon, a_next=a2)
            Q[s, a] += alpha * (y - Q[s, a])
            if term[s2]:
                break
            s, a = s2, (a2 if a2 is not None else _choose(rng, Q[s2], epsilon))
        returns.append(total)
        lengths.append(float(t))
        if progress is not None:
            progress(ep + 1)
    pi = greedy_policy(Q, mdp)
    return SolverResult(
        rule, Q.max(axis=1) * mdp.nonterminal, Q, pi, iterations=episodes,
        history={"return": returns, "length": lengths},
        info={"alpha": alpha, "epsilon": epsilon, "seed": seed, "max_steps": max_steps},
    )


def q_learning(mdp: TabularMDP, **kw) -> SolverResult:
    """Q-learning (off-policy TD control); keyword arguments as :func:`td_control`."""
    return td_control(mdp, "q-learning", **kw)


def sarsa(mdp: TabularMDP, **kw) -> SolverResult:
    """SARSA (on-policy TD control); keyword arguments as :func:`td_control`."""
    return td_control(mdp, "sarsa", **kw)


def expected_sarsa(mdp: TabularMDP, **kw) -> SolverResult:
    """Expected SARSA; keyword arguments as :func:`td_control`."""
    return td_control(mdp, "expected-sarsa", **kw)
