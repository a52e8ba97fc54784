"""Tabular MDPs from elsewhere: gymnasium toy-text environments, JSON/YAML files, and the name registry.

* :func:`from_gymnasium` reads the ``P[s][a] = [(p, s', r, done), ...]`` table that FrozenLake, CliffWalking and
  Taxi expose.
* :func:`load_mdp` reads ``{"P": ..., "r": ..., "gamma": ..., "start"?, "terminal"?, ...}`` from a file.
* :func:`get_mdp` resolves a name (``chain``, ``gridworld``, ``cliff``, ``frozenlake``, ``frozenlake8``, ``taxi``,
  ``random``) or a ``.json`` / ``.yaml`` path; it backs ``tokenmdp mdp ...``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.tabular import TabularMDP, chain, cliff_walking, gridworld4x4, random_mdp

GYM_ACTION_NAMES = {
    "FrozenLake": ["left", "down", "right", "up"],
    "CliffWalking": ["up", "right", "down", "left"],
    "Taxi": ["south", "north", "east", "west", "pickup", "dropoff"],
}


def _reachable(P: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """States reachable from the support of ``start`` without passing through a ``stop`` state."""
    seen = start > 0
    frontier = seen & ~stop
    while frontier.any():
        nxt = (P[frontier].sum(axis=(0, 1)) > 0) & ~seen
        seen |= nxt
        frontier = nxt & ~stop
    return seen


def from_gymnasium(env: Any, *, gamma: float = 0.99, name: str | None = None) -> TabularMDP:
    """Build a :class:`TabularMDP` from a gymnasium toy-text environment that exposes ``P``.

    A transition flagged ``done`` makes its next state terminal. If such a state can also be entered without
    ``done`` from a state reachable from the start (so it is not a true end state), one extra absorbing state
    ``end`` is appended and every ``done`` transition leads there instead. Grid layouts (FrozenLake ``desc``,
    CliffWalking ``shape``) are kept for pictures.
    """
    core = getattr(env, "unwrapped", env)
    table = getattr(core, "P", None)
    if not isinstance(table, dict):
        raise TokenMDPError(f"from_gymnasium: {type(core).__name__} exposes no transition table P")
    S, A = int(core.observation_space.n), int(core.action_space.n)
    P, r, done = np.zeros((S, A, S)), np.zeros((S, A, S)), np.zeros((S, A, S), dtype=bool)
    for s, row in table.items():
        for a, outcomes in row.items():
            for p, s2, rew, d in outcomes:
                P[s, a, int(s2)] += p
                r[s, a, int(s2)] = rew
                done[s, a, int(s2)] |= bool(d)
    start = np.asarray(getattr(core, "initial_state_distrib", np.eye(S)[0]), dtype=np.float64)
    terminal = done.any(axis=(0, 1))
    live = _reachable(P, start, terminal) & ~terminal
    soft = ((P > 0) & ~done)[live].any(axis=(0, 1)) & terminal
    kind = type(core).__name__.replace("Env", "")
    grid, markers = _gym_layout(core, kind, S)
    if soft.any():  # route every `done` into one new absorbing state
        P2 = np.zeros((S + 1, A, S + 1))
        r2 = np.zeros((S + 1, A, S + 1))
        P2[:S, :, :S] = np.where(done, 0.0, P)
        P2[:S, :, S] = (P * done).sum(axis=2)
        r2[:S, :, :S] = r
        r2[:S, :, S] = (P * done * r).sum(axis=2) / np.maximum(P2[:S, :, S], 1e-300)
        P, r, start, terminal = P2, r2, np.append(start, 0.0), np.eye(S + 1, dtype=bool)[S]
        grid, markers = None, {}
    names = _gym_state_names(core, kind, S, grid)
    return TabularMDP(
        P, r, gamma, start=start, terminal=terminal, action_names=GYM_ACTION_NAMES.get(kind), state_names=names,
        grid=grid, markers=markers, name=name or kind.lower(),
    )


def _gym_layout(core: Any, kind: str, S: int) -> tuple[tuple[int, int] | None, dict[int, str]]:
    if kind == "FrozenLake":
        desc = np.asarray(core.desc).astype(str)
        markers = {i: c for i, c in enumerate(desc.reshape(-1)) if c in "SHG"}
        return desc.shape, markers
    if kind == "CliffWalking":
        rows, cols = core.shape
        cliff = np.flatnonzero(np.asarray(core._cliff).reshape(-1)) if hasattr(core, "_cliff") else []
        markers = {int(c): "C" for c in cliff}
        markers.update({(rows - 1) * cols: "S", rows * cols - 1: "G"})
        return (rows, cols), markers
    return None, {}


def _gym_state_names(core: Any, kind: str, S: int, grid: tuple[int, int] | None) -> list[str] | None:
    """``(row,col)`` on grids; for Taxi ``(row,col) p=R d=G`` (passenger at R, or ``p=taxi``; destination G)."""
    if grid is not None:
        return [f"({i},{j})" for i in range(grid[0]) for j in range(grid[1])]
    if kind == "Taxi" and hasattr(core, "decode"):
        letters = "RGYB"
        names = []
        for s in range(S):
            row, col, p, d = core.decode(s)
            names.append(f"({row},{col}) p={'taxi' if p == 4 else letters[p]} d={letters[d]}")
        return names
    return None


def _gym(env_id: str, default_name: str, **kwargs: Any) -> Callable[..., TabularMDP]:
    def build(gamma: float = 0.99) -> TabularMDP:
        try:
            import gymnasium as gym
        except ImportError:
            raise TokenMDPError(
                f"MDP '{default_name}' needs gymnasium: pip install 'tokenmdp[gym]'"
            ) from None
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ids = [env_id, env_id.replace("v4", "v3")] if env_id.endswith("v4") else [env_id]
            for i, eid in enumerate(ids):
                try:
                    env = gym.make(eid, **kwargs)
                    break
                except gym.error.Error:
                    if i == len(ids) - 1:
                        raise
        return from_gymnasium(env, gamma=gamma, name=default_name)

    return build


MDP_REGISTRY: dict[str, tuple[Callable[..., TabularMDP], str]] = {
    "chain": (chain, "corridor of 6 states: small prize left (0.1), large prize right (1.0), gamma 0.9"),
    "gridworld": (gridworld4x4, "Sutton & Barto example 4.1: 4x4 grid, two terminal corners, -1 a step"),
    "cliff": (cliff_walking, "Sutton & Barto example 6.6: 4x12 cliff walking, -100 for the cliff"),
    "frozenlake": (_gym("FrozenLake-v1", "frozenlake", map_name="4x4", is_slippery=True),
                   "gymnasium FrozenLake 4x4, slippery, gamma 0.99"),
    "frozenlake8": (_gym("FrozenLake-v1", "frozenlake8", map_name="8x8", is_slippery=True),
                    "gymnasium FrozenLake 8x8, slippery, gamma 0.99"),
    "taxi": (_gym("Taxi-v4", "taxi"), "gymnasium Taxi (500 states, 6 actions), gamma 0.99"),
    "random": (random_mdp, "seeded random MDP: 8 states, 3 actions, Dirichlet rows, gamma 0.9"),
}


def get_mdp(name: str, *, gamma: float | None = None, seed: int | None = None) -> TabularMDP:
    """The MDP called ``name`` in :data:`MDP_REGISTRY`, or one loaded from a ``.json``/``.yaml`` file.

    ``gamma`` overrides the default discount; ``seed`` picks the ``random`` MDP.
    """
    if name not in MDP_REGISTRY:
        if name.endswith((".json", ".yaml", ".yml")):
            mdp = load_mdp(name)
            return mdp if gamma is None else mdp.with_gamma(gamma)
        known = ", ".join(MDP_REGISTRY)
        raise TokenMDPError(f"unknown MDP '{name}'; known: {known} (or a .json/.yaml file)")
    build = MDP_REGISTRY[name][0]
    kwargs: dict[str, Any] = {}
    if name == "random" and seed is not None:
        kwargs["seed"] = seed
    mdp = build(**kwargs)
    return mdp if gamma is None else mdp.with_gamma(gamma)


def load_mdp(path: str | Path) -> TabularMDP:
    """Read an MDP from JSON or YAML: keys ``P`` (S x A x S nested lists), ``r``, ``gamma``, and optionally
    ``start``, ``terminal``, ``state_names``, ``action_names``, ``grid``, ``name``. Errors name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise TokenMDPError(f"MDP file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (json.JSONDecodeError, ValueError) as exc:
        raise TokenMDPError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from None
    except Exception as exc:  # yaml.YAMLError
        raise TokenMDPError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise TokenMDPError(f"{path}: expected a mapping with keys P, r, gamma")
    allowed = {"P", "r", "gamma", "start", "terminal", "state_names", "action_names", "grid", "name"}
    for key in ("P", "r", "gamma"):
        if key not in data:
            raise TokenMDPError(f"{path}: missing field '{key}'")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise TokenMDPError(f"{path}: unknown field '{unknown[0]}' (allowed: {', '.join(sorted(allowed))})")
    try:
        arrays = {k: np.asarray(data[k], dtype=np.float64) for k in ("P", "r")}
    except ValueError as exc:
        raise TokenMDPError(f"{path}: field P or r is not a rectangular array of numbers ({exc})") from None
    try:
        return TabularMDP(
            arrays["P"], arrays["r"], data["gamma"], start=data.get("start"), terminal=data.get("terminal"),
            state_names=data.get("state_names"), action_names=data.get("action_names"),
            grid=tuple(data["grid"]) if data.get("grid") else None, name=data.get("name", path.stem),
        )
    except TokenMDPError as exc:
        raise TokenMDPError(f"{path}: {exc}") from None
