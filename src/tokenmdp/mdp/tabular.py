"""Tabular MDPs ``(S, A, P, r, gamma)`` small enough to print and to solve exactly.

A :class:`TabularMDP` holds the transition tensor ``P[s, a, s'] = P(s' | s, a)``, rewards ``r[s, a, s']`` (or
``r[s, a]``), a discount ``gamma``, a start distribution and a set of terminal states. It is validated on
creation; anything wrong raises :class:`tokenmdp.errors.TokenMDPError` naming the field (and the row) at fault.

Terminal states are absorbing with zero reward: whatever their rows of ``P`` and ``r`` held, they are replaced by
a self-loop with reward 0, and solvers mask them (``V(terminal) = 0``) so no value propagates past the end of an
episode. The expected one-step reward is ``R[s, a] = sum_s' P[s, a, s'] r[s, a, s']``.

Builders: :func:`chain`, :func:`gridworld4x4` (Sutton & Barto example 4.1), :func:`cliff_walking` (example 6.6),
:func:`random_mdp`; :func:`from_gymnasium` and the name registry :func:`get_mdp` live in
:mod:`tokenmdp.mdp.tabular_io` (which imports this module, never the reverse).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tokenmdp.errors import TokenMDPError

ROW_TOL = 1e-8
GRID_ACTIONS = ("up", "right", "down", "left")
GRID_MOVES = {"up": (-1, 0), "right": (0, 1), "down": (1, 0), "left": (0, -1)}


def _as_mask(terminal: Sequence[int] | np.ndarray | None, n_states: int) -> np.ndarray:
    if terminal is None:
        return np.zeros(n_states, dtype=bool)
    arr = np.asarray(terminal)
    if arr.dtype == bool:
        if arr.shape != (n_states,):
            raise TokenMDPError(
                f"terminal: a boolean mask must have shape ({n_states},); got {arr.shape}"
            )
        return arr.copy()
    arr = arr.reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TokenMDPError(f"terminal: expected state indices or a boolean mask; got dtype {arr.dtype}")
    mask = np.zeros(n_states, dtype=bool)
    for t in arr.tolist():
        if not 0 <= t < n_states:
            raise TokenMDPError(f"terminal: state {t} is out of range [0, {n_states})")
        mask[t] = True
    return mask


def _check_P(P: np.ndarray, keep: np.ndarray) -> None:
    if P.ndim != 3 or P.shape[0] != P.shape[2]:
        raise TokenMDPError(f"P must have shape (S, A, S); got {P.shape}")
    if P.shape[0] == 0 or P.shape[1] == 0:
        raise TokenMDPError(f"P must have at least one state and one action; got shape {P.shape}")
    bad = ~np.isfinite(P)
    if bad.any():
        s, a, s2 = np.argwhere(bad)[0]
        raise TokenMDPError(f"P[{s}, {a}, {s2}] is not finite ({P[s, a, s2]})")
    neg = (P < 0) & keep[:, None, None]
    if neg.any():
        s, a, s2 = np.argwhere(neg)[0]
        raise TokenMDPError(f"P[{s}, {a}, {s2}] = {P[s, a, s2]:g} is negative")
    sums = P.sum(axis=2)
    off = (np.abs(sums - 1.0) > ROW_TOL) & keep[:, None]
    if off.any():
        s, a = np.argwhere(off)[0]
        raise TokenMDPError(
            f"row P[{s}, {a}, :] sums to {sums[s, a]:.10g}, not 1 (tolerance {ROW_TOL:g})"
        )


def _check_r(r: np.ndarray, S: int, A: int) -> None:
    if r.shape not in ((S, A), (S, A, S)):
        raise TokenMDPError(f"r must have shape (S, A) = ({S}, {A}) or (S, A, S) = ({S}, {A}, {S}); got {r.shape}")
    bad = ~np.isfinite(r)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise TokenMDPError(f"r[{', '.join(map(str, idx))}] is not finite ({r[idx]})")


def _check_start(start: np.ndarray, terminal: np.ndarray) -> None:
    S = terminal.shape[0]
    if start.shape != (S,):
        raise TokenMDPError(f"start must have shape ({S},); got {start.shape}")
    if not np.isfinite(start).all() or (start < 0).any():
        raise TokenMDPError("start must be a probability distribution (finite, non-negative entries)")
    if abs(start.sum() - 1.0) > ROW_TOL:
        raise TokenMDPError(f"start sums to {start.sum():.10g}, not 1 (tolerance {ROW_TOL:g})")
    on_terminal = np.flatnonzero((start > 0) & terminal)
    if on_terminal.size:
        raise TokenMDPError(f"start puts probability on terminal state {int(on_terminal[0])}")


@dataclass(eq=False)
class TabularMDP:
    """A finite MDP with explicit tensors.

    Parameters
    ----------
    P : (S, A, S) array, ``P[s, a, s']``; every non-terminal row ``P[s, a, :]`` sums to 1 within 1e-8.
    r : (S, A) or (S, A, S) array of rewards.
    gamma : discount in [0, 1]; ``gamma = 1`` requires at least one terminal state.
    start : (S,) start distribution; default uniform over the non-terminal states.
    terminal : state indices or an (S,) boolean mask of absorbing end states.
    state_names, action_names : optional labels (default ``s0..``, ``a0..``).
    grid : optional ``(rows, cols)`` with state ``row * cols + col``, for grid pictures.
    markers : optional ``{state: one-character label}`` drawn in grid pictures (start, goal, holes, cliff).
    name : a short name for printing.
    """

    P: np.ndarray
    r: np.ndarray
    gamma: float
    start: np.ndarray | None = None
    terminal: np.ndarray | Sequence[int] | None = None
    state_names: list[str] | None = None
    action_names: list[str] | None = None
    grid: tuple[int, int] | None = None
    markers: dict[int, str] = field(default_factory=dict)
    name: str = "mdp"

    def __post_init__(self) -> None:
        P = np.array(self.P, dtype=np.float64)
        if P.ndim != 3:
            raise TokenMDPError(f"P must have shape (S, A, S); got {P.shape}")
        S, A = P.shape[0], P.shape[1]
        term = _as_mask(self.terminal, S)
        _check_P(P, ~term)
        r = np.array(self.r, dtype=np.float64)
        _check_r(r, S, A)
        try:
            gamma = float(self.gamma)
        except (TypeError, ValueError):
            raise TokenMDPError(f"gamma must be a number in [0, 1]; got {self.gamma!r}") from None
        if not 0.0 <= gamma <= 1.0:
            raise TokenMDPError(f"gamma must be in [0, 1]; got {gamma:g}")
        if gamma == 1.0 and not term.any():
            raise TokenMDPError("gamma = 1 needs at least one terminal state (returns would be unbounded)")
        if term.all():
            raise TokenMDPError("terminal: every state is terminal; at least one state must be non-terminal")
        idx = np.flatnonzero(term)
        P[idx] = 0.0
        P[idx, :, idx] = 1.0
        r[idx] = 0.0
        if self.start is None:
            start = (~term).astype(np.float64) / (~term).sum()
        else:
            start = np.array(self.start, dtype=np.float64)
        _check_start(start, term)
        self.P, self.r, self.gamma, self.start, self.terminal = P, r, gamma, start, term
        self.state_names = self._names(self.state_names, S, "s", "state_names")
        self.action_names = self._names(self.action_names, A, "a", "action_names")
        if self.grid is not None:
            rows, cols = (int(x) for x in self.grid)
            if rows * cols != S:
                raise TokenMDPError(f"grid {rows}x{cols} has {rows * cols} cells but the MDP has {S} states")
            self.grid = (rows, cols)
        for s in self.markers:
            if not 0 <= s < S:
                raise TokenMDPError(f"markers: state {s} is out of range [0, {S})")

    @staticmethod
    def _names(names: Sequence[str] | None, n: int, prefix: str, field_name: str) -> list[str]:
        if names is None:
            return [f"{prefix}{i}" for i in range(n)]
        names = [str(x) for x in names]
        if len(names) != n:
            raise TokenMDPError(f"{field_name} has {len(names)} entries; expected {n}")
        return names

    @property
    def n_states(self) -> int:
        return self.P.shape[0]

    @property
    def n_actions(self) -> int:
        return self.P.shape[1]

    @property
    def nonterminal(self) -> np.ndarray:
        """(S,) boolean mask of the states where an episode goes on."""
        return ~self.terminal

    @property
    def R(self) -> np.ndarray:
        """(S, A) expected immediate reward ``R[s, a] = sum_s' P[s, a, s'] r[s, a, s']``."""
        if self.r.ndim == 2:
            return self.r
        return np.einsum("ijk,ijk->ij", self.P, self.r)

    def reward(self, s: int, a: int, s_next: int) -> float:
        """The reward of one transition ``(s, a, s')``."""
        return float(self.r[s, a] if self.r.ndim == 2 else self.r[s, a, s_next])

    def reachable(self) -> np.ndarray:
        """(S,) boolean mask of the states some action sequence reaches from the start distribution."""
        seen = self.start > 0
        frontier = seen & self.nonterminal
        while frontier.any():
            new = (self.P[frontier].sum(axis=(0, 1)) > 0) & ~seen
            seen |= new
            frontier = new & self.nonterminal
        return seen

    def with_gamma(self, gamma: float) -> TabularMDP:
        """A copy with another discount (validated again)."""
        return TabularMDP(
            self.P, self.r, gamma, start=self.start, terminal=self.terminal, state_names=self.state_names,
            action_names=self.action_names, grid=self.grid, markers=dict(self.markers), name=self.name,
        )

    def transitions(self) -> list[tuple[int, int, int, float, float]]:
        """Every transition with ``P > 0`` as ``(s, a, s', p, r)``, terminal self-loops left out."""
        out = []
        for s, a, s2 in np.argwhere(self.P > 0):
            if self.terminal[s]:
                continue
            out.append((int(s), int(a), int(s2), float(self.P[s, a, s2]), self.reward(s, a, s2)))
        return out

    def to_dict(self) -> dict:
        """A JSON-ready description (transitions listed sparsely)."""
        return {
            "name": self.name,
            "n_states": self.n_states,
            "n_actions": self.n_actions,
            "gamma": self.gamma,
            "terminal": np.flatnonzero(self.terminal).tolist(),
            "start": {int(s): float(p) for s, p in enumerate(self.start) if p > 0},
            "state_names": self.state_names,
            "action_names": self.action_names,
            "grid": list(self.grid) if self.grid else None,
            "transitions": [
                {"s": s, "a": a, "s_next": s2, "p": p, "r": rw} for s, a, s2, p, rw in self.transitions()
            ],
        }


def chain(
    n: int = 6,
    *,
    left_reward: float = 0.1,
    right_reward: float = 1.0,
    step_reward: float = 0.0,
    slip: float = 0.0,
    gamma: float = 0.9,
) -> TabularMDP:
    """A corridor of ``n`` states with a small prize at the left end and a large one at the right end.

    States ``0 .. n-1``; ``0`` and ``n-1`` are terminal; an episode starts in state 1, next to the small prize.
    Actions ``left`` (0) and ``right`` (1) move one cell; with probability ``slip`` the other move happens.
    Entering state 0 pays ``left_reward``, entering ``n-1`` pays ``right_reward``, any other move
    ``step_reward``. With the defaults (n = 6, gamma = 0.9) the optimal policy goes right everywhere:
    from state 1, ``V*(1) = 0.9^3 = 0.729 > 0.1``; a myopic learner settles for the left prize.
    """
    if n < 3:
        raise TokenMDPError(f"chain: n must be at least 3; got {n}")
    if not 0.0 <= slip <= 1.0:
        raise TokenMDPError(f"chain: slip must be in [0, 1]; got {slip}")
    P = np.zeros((n, 2, n))
    r = np.zeros((n, 2, n))
    for s in range(1, n - 1):
        for a, step in ((0, -1), (1, 1)):
            P[s, a, s + step] += 1.0 - slip
            P[s, a, s - step] += slip
    r[:, :, :] = step_reward
    r[:, :, 0] = left_reward
    r[:, :, n - 1] = right_reward
    names = [f"s{i}" for i in range(n)]
    return TabularMDP(
        P, r, gamma, start=np.eye(n)[1], terminal=[0, n - 1], state_names=names,
        action_names=["left", "right"], grid=(1, n), markers={0: "L", n - 1: "R"}, name="chain",
    )


GridStep = Callable[[int, int, tuple[int, int]], tuple[int, float]]


def _grid_mdp(
    rows: int, cols: int, step: GridStep, *, gamma: float, start: np.ndarray | None, terminal: list[int],
    markers: dict[int, str], name: str,
) -> TabularMDP:
    """A deterministic grid world: ``step(row, col, (dr, dc)) -> (next_state, reward)``."""
    S = rows * cols
    P = np.zeros((S, 4, S))
    r = np.zeros((S, 4))
    for s in range(S):
        row, col = divmod(s, cols)
        for a, act in enumerate(GRID_ACTIONS):
            s2, rew = step(row, col, GRID_MOVES[act])
            P[s, a, s2] = 1.0
            r[s, a] = rew
    names = [f"({i},{j})" for i in range(rows) for j in range(cols)]
    return TabularMDP(
        P, r, gamma, start=start, terminal=terminal, state_names=names, action_names=list(GRID_ACTIONS),
        grid=(rows, cols), markers=markers, name=name,
    )


def gridworld4x4(gamma: float = 1.0) -> TabularMDP:
    """The 4x4 gridworld of Sutton & Barto example 4.1.

    States 0..15 row by row; 0 and 15 are terminal; reward -1 on every move; a move off the grid leaves the
    state unchanged. Under the equiprobable random policy with gamma = 1 (figure 4.1)::

        V = [[  0, -14, -20, -22],
             [-14, -18, -20, -20],
             [-20, -20, -18, -14],
             [-22, -20, -14,   0]]
    """

    def step(row: int, col: int, move: tuple[int, int]) -> tuple[int, float]:
        i, j = row + move[0], col + move[1]
        if not (0 <= i < 4 and 0 <= j < 4):
            i, j = row, col
        return i * 4 + j, -1.0

    return _grid_mdp(4, 4, step, gamma=gamma, start=None, terminal=[0, 15], markers={0: "T", 15: "T"},
                     name="gridworld")


def cliff_walking(gamma: float = 1.0, rows: int = 4, cols: int = 12) -> TabularMDP:
    """Cliff walking, Sutton & Barto example 6.6 (the layout of gymnasium's ``CliffWalking-v1``).

    Start in the bottom-left cell, goal (terminal) in the bottom-right one; the cells between them are the
    cliff. Every move pays -1, except a move into the cliff: -100 and back to the start. The shortest path runs
    along the cliff edge: up, ``cols - 1`` times right, down: 13 steps on the 4x12 grid, return -13.
    Actions are ``up, right, down, left`` (gymnasium's order).
    """
    if rows < 2 or cols < 3:
        raise TokenMDPError(f"cliff_walking: needs at least 2 rows and 3 columns; got {rows}x{cols}")
    start_s, goal = (rows - 1) * cols, rows * cols - 1
    cliff = set(range(start_s + 1, goal))

    def step(row: int, col: int, move: tuple[int, int]) -> tuple[int, float]:
        i = min(max(row + move[0], 0), rows - 1)
        j = min(max(col + move[1], 0), cols - 1)
        s2 = i * cols + j
        return (start_s, -100.0) if s2 in cliff else (s2, -1.0)

    markers = {start_s: "S", goal: "G", **{c: "C" for c in cliff}}
    return _grid_mdp(rows, cols, step, gamma=gamma, start=np.eye(rows * cols)[start_s], terminal=[goal],
                     markers=markers, name="cliff")


def random_mdp(
    n_states: int = 8, n_actions: int = 3, seed: int = 0, *, gamma: float = 0.9, branching: int | None = None
) -> TabularMDP:
    """A random MDP: each ``P[s, a, :]`` is Dirichlet(1) over ``branching`` random next states (all by default),
    ``r[s, a, s']`` standard normal; no terminal states; start uniform. Same seed, same MDP.
    """
    if n_states < 1 or n_actions < 1:
        raise TokenMDPError(f"random_mdp: needs n_states >= 1 and n_actions >= 1; got {n_states}, {n_actions}")
    k = n_states if branching is None else int(branching)
    if not 1 <= k <= n_states:
        raise TokenMDPError(f"random_mdp: branching must be in [1, {n_states}]; got {branching}")
    rng = np.random.default_rng(seed)
    P = np.zeros((n_states, n_actions, n_states))
    for s in range(n_states):
        for a in range(n_actions):
            support = rng.choice(n_states, size=k, replace=False)
            P[s, a, support] = rng.dirichlet(np.ones(k))
    r = rng.standard_normal((n_states, n_actions, n_states))
    return TabularMDP(P, r, gamma, name=f"random(S={n_states},A={n_actions},seed={seed})")
