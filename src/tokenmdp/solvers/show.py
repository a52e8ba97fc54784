"""Printing tabular results: greedy paths, grid pictures of arrows, and rich tables of V, Q, P and r."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from tokenmdp.mdp.tabular import TabularMDP

ARROWS = {
    "up": "↑", "right": "→", "down": "↓", "left": "←",
    "north": "↑", "east": "→", "south": "↓", "west": "←",
}


@dataclass
class Path:
    """A most-likely trajectory: ``states`` (steps + 1 entries), ``actions`` (steps entries), the discounted
    ``ret`` collected along it, and why it stopped: ``terminal``, ``loop`` or ``max_steps``."""

    states: list[int]
    actions: list[int]
    ret: float
    reason: str

    @property
    def steps(self) -> int:
        return len(self.actions)


def greedy_path(
    mdp: TabularMDP, policy: np.ndarray, start: int | None = None, *, max_steps: int | None = None
) -> Path:
    """Follow the most probable action of ``policy`` (S, A) and the most probable next state from ``start``
    (default: the most likely start state) until a terminal state, a repeated state, or ``max_steps``
    (default S). On cliff walking the optimal path is 13 steps with return -13.
    """
    s = int(np.argmax(mdp.start)) if start is None else int(start)
    limit = mdp.n_states if max_steps is None else max_steps
    states, actions, ret, disc = [s], [], 0.0, 1.0
    seen = {s}
    while True:
        if mdp.terminal[s]:
            return Path(states, actions, ret, "terminal")
        if len(actions) >= limit:
            return Path(states, actions, ret, "max_steps")
        a = int(np.argmax(policy[s]))
        s2 = int(np.argmax(mdp.P[s, a]))
        ret += disc * mdp.reward(s, a, s2)
        disc *= mdp.gamma
        states.append(s2)
        actions.append(a)
        if s2 in seen:
            return Path(states, actions, ret, "loop")
        seen.add(s2)
        s = s2


def action_symbol(mdp: TabularMDP, a: int) -> str:
    """An arrow for grid moves, else the first letter of the action name."""
    name = mdp.action_names[a]
    return ARROWS.get(name, name[:1])


def _cell(mdp: TabularMDP, s: int, reach: np.ndarray) -> str | None:
    """The fixed label of a cell (terminal or unreachable), or None if it gets an arrow."""
    if mdp.terminal[s]:
        return mdp.markers.get(s, "T")
    if not reach[s]:
        return mdp.markers.get(s, " ")
    return None


def policy_picture(mdp: TabularMDP, policy: np.ndarray) -> str:
    """The greedy action of each cell of a grid MDP as arrows, one text line per grid row.

    Terminal and unreachable cells show their marker (G goal, H hole, C cliff, T terminal); a state whose best
    actions tie (the random policy) shows ``·``. Non-grid MDPs get one line of ``state:symbol`` pairs.
    """
    reach = mdp.reachable()
    marks = []
    for s in range(mdp.n_states):
        label = _cell(mdp, s, reach)
        if label is None:
            top = np.sort(policy[s])[::-1]
            tie = top.size > 1 and top[0] - top[1] < 1e-9
            label = "·" if tie else action_symbol(mdp, int(np.argmax(policy[s])))
        marks.append(label)
    if mdp.grid is None:
        return " ".join(f"{mdp.state_names[s]}:{m}" for s, m in enumerate(marks))
    rows, cols = mdp.grid
    return "\n".join(" ".join(marks[i * cols:(i + 1) * cols]) for i in range(rows))


def path_picture(mdp: TabularMDP, path: Path) -> str:
    """A grid with the arrows of ``path`` only; other cells show their marker or ``.``."""
    if mdp.grid is None:
        steps = [f"{mdp.state_names[s]} -{mdp.action_names[a]}->" for s, a in zip(path.states, path.actions)]
        return " ".join(steps + [mdp.state_names[path.states[-1]]])
    marks = [mdp.markers.get(s, ".") for s in range(mdp.n_states)]
    for s, a in zip(path.states, path.actions):
        marks[s] = action_symbol(mdp, a)
    rows, cols = mdp.grid
    return "\n".join(" ".join(marks[i * cols:(i + 1) * cols]) for i in range(rows))


def _fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.2e}"


def value_table(mdp: TabularMDP, V: np.ndarray, title: str = "V", *, limit: int = 50) -> Table | Group:
    """``V`` laid out as the grid when the MDP has one (title on its own line), else one row per state (at
    most ``limit``, 0: all)."""
    if mdp.grid is not None:
        rows, cols = mdp.grid
        table = Table(show_header=False, box=None, padding=(0, 0, 0, 1))
        for _ in range(cols):
            table.add_column(justify="right")
        for i in range(rows):
            table.add_row(*(_fmt(V[i * cols + j], 3) for j in range(cols)))
        return Group(Text(title, style="bold"), table)
    table = Table(title=title)
    table.add_column("state")
    table.add_column("V", justify="right")
    shown = range(mdp.n_states) if limit <= 0 else range(min(limit, mdp.n_states))
    for s in shown:
        table.add_row(escape(mdp.state_names[s]), _fmt(V[s]))
    if len(shown) < mdp.n_states:
        table.caption = f"{mdp.n_states - len(shown)} more states not shown (--limit 0 shows all)"
    return table


def q_table(mdp: TabularMDP, Q: np.ndarray, policy: np.ndarray, *, limit: int = 50) -> Table:
    """Rows ``state | Q(s, a) for each action | greedy action argmax_a Q``, plus ``pi(greedy | s)`` when the
    policy is stochastic; at most ``limit`` rows (0: all)."""
    table = Table(title="Q(s, a) and the greedy action")
    table.add_column("state")
    for name in mdp.action_names:
        table.add_column(escape(name), justify="right")
    table.add_column("greedy")
    stochastic = bool((policy[mdp.nonterminal].max(axis=1) < 1.0 - 1e-12).any())
    if stochastic:
        table.add_column("pi(greedy|s)", justify="right")
    shown = range(mdp.n_states) if limit <= 0 else range(min(limit, mdp.n_states))
    for s in shown:
        a = int(np.argmax(Q[s]))
        cells = [escape(mdp.state_names[s]), *(_fmt(q) for q in Q[s])]
        cells.append("(terminal)" if mdp.terminal[s] else escape(mdp.action_names[a]))
        if stochastic:
            cells.append("" if mdp.terminal[s] else f"{policy[s, a]:.3f}")
        table.add_row(*cells)
    if len(shown) < mdp.n_states:
        table.caption = f"{mdp.n_states - len(shown)} more states not shown (--limit 0 shows all)"
    return table


def transition_table(mdp: TabularMDP, *, limit: int = 60) -> Table:
    """The sparse transition list ``s, a, s', P, r`` (terminal self-loops left out); ``limit`` 0 shows all."""
    rows = mdp.transitions()
    table = Table(title=Text(f"{mdp.name}: transitions with P > 0"))
    for col in ("s", "a", "s'", "P(s'|s,a)", "r"):
        table.add_column(col, justify="right" if col in ("P(s'|s,a)", "r") else "left")
    shown = rows if limit <= 0 else rows[:limit]
    for s, a, s2, p, r in shown:
        table.add_row(escape(mdp.state_names[s]), escape(mdp.action_names[a]), escape(mdp.state_names[s2]),
                      _fmt(p), _fmt(r))
    if len(shown) < len(rows):
        table.caption = f"{len(rows) - len(shown)} more transitions not shown (--limit 0 shows all)"
    return table


def dense_tables(mdp: TabularMDP) -> list[Table]:
    """One ``P(. | s, a)`` matrix per action (rows s, columns s') and the expected reward table ``R[s, a]``."""
    tables = []
    for a, name in enumerate(mdp.action_names):
        table = Table(title=Text(f"P(s' | s, a={name})"))
        table.add_column("s \\ s'")
        for s2 in mdp.state_names:
            table.add_column(escape(s2), justify="right")
        for s in range(mdp.n_states):
            table.add_row(escape(mdp.state_names[s]), *(_fmt(p) if p else "" for p in mdp.P[s, a]))
        tables.append(table)
    table = Table(title=Text("R[s, a]"), caption="expected reward")
    table.add_column("state")
    for name in mdp.action_names:
        table.add_column(escape(name), justify="right")
    for s in range(mdp.n_states):
        table.add_row(escape(mdp.state_names[s]), *(_fmt(x) for x in mdp.R[s]))
    tables.append(table)
    return tables


def result_text(result) -> str:
    """Plain-text V, Q and policy of a :class:`~tokenmdp.solvers.common.SolverResult`."""
    with np.printoptions(precision=4, suppress=True, linewidth=120):
        return (
            f"{result.method}: {result.iterations} iterations, converged={result.converged}\n"
            f"V =\n{result.V}\nQ =\n{result.Q}\npolicy =\n{result.policy}"
        )
