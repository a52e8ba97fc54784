"""TabularMDP: validation messages, builders, gymnasium import, files and the name registry."""

from __future__ import annotations

import json
from importlib.util import find_spec
from types import SimpleNamespace

import numpy as np
import pytest

from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.tabular import TabularMDP, chain, cliff_walking, gridworld4x4, random_mdp
from tokenmdp.mdp.tabular_io import from_gymnasium, get_mdp, load_mdp


def two_state(**kw):
    """s0 --a0--> s1 (terminal) with reward 1; a1 stays in s0 with reward 0."""
    P = np.zeros((2, 2, 2))
    P[0, 0, 1] = 1.0
    P[0, 1, 0] = 1.0
    P[1, :, 1] = 1.0
    r = np.array([[1.0, 0.0], [0.0, 0.0]])
    args = dict(P=P, r=r, gamma=0.9, terminal=[1])
    args.update(kw)
    return TabularMDP(**args)


# ---------------------------------------------------------------- validation: one test per message


def test_valid_two_state():
    mdp = two_state()
    assert mdp.n_states == 2 and mdp.n_actions == 2
    np.testing.assert_array_equal(mdp.terminal, [False, True])
    np.testing.assert_array_equal(mdp.start, [1.0, 0.0])  # uniform over non-terminal states


def test_P_wrong_rank():
    with pytest.raises(TokenMDPError, match=r"P must have shape \(S, A, S\); got \(2, 2\)"):
        two_state(P=np.eye(2))


def test_P_not_square():
    with pytest.raises(TokenMDPError, match=r"P must have shape \(S, A, S\); got \(2, 2, 3\)"):
        two_state(P=np.full((2, 2, 3), 1 / 3))


def test_P_row_sum_names_row_and_sum():
    P = two_state().P.copy()
    P[0, 1, 0] = 0.7
    with pytest.raises(TokenMDPError, match=r"row P\[0, 1, :\] sums to 0\.7, not 1 \(tolerance 1e-08\)"):
        two_state(P=P)


def test_P_row_sum_tolerance_is_1e8():
    P = two_state().P.copy()
    P[0, 1, 0] = 1.0 + 5e-9  # within tolerance
    two_state(P=P)
    P[0, 1, 0] = 1.0 + 2e-8
    with pytest.raises(TokenMDPError, match=r"row P\[0, 1, :\] sums to 1\.00000002"):
        two_state(P=P)


def test_P_negative():
    P = two_state().P.copy()
    P[0, 1] = [1.5, -0.5]
    with pytest.raises(TokenMDPError, match=r"P\[0, 1, 1\] = -0\.5 is negative"):
        two_state(P=P)


def test_P_not_finite():
    P = two_state().P.copy()
    P[0, 0, 0] = np.nan
    with pytest.raises(TokenMDPError, match=r"P\[0, 0, 0\] is not finite"):
        two_state(P=P)


def test_r_shape():
    with pytest.raises(TokenMDPError, match=r"r must have shape \(S, A\) = \(2, 2\) or \(S, A, S\) = \(2, 2, 2\); "
                                            r"got \(3,\)"):
        two_state(r=np.zeros(3))


def test_r_not_finite():
    with pytest.raises(TokenMDPError, match=r"r\[0, 1\] is not finite"):
        two_state(r=np.array([[1.0, np.inf], [0.0, 0.0]]))


@pytest.mark.parametrize("gamma", [-0.1, 1.5])
def test_gamma_range(gamma):
    with pytest.raises(TokenMDPError, match=rf"gamma must be in \[0, 1\]; got {gamma:g}"):
        two_state(gamma=gamma)


def test_gamma_not_a_number():
    with pytest.raises(TokenMDPError, match=r"gamma must be a number in \[0, 1\]; got 'high'"):
        two_state(gamma="high")


def test_gamma_one_needs_terminal():
    P = np.ones((2, 1, 2)) / 2
    with pytest.raises(TokenMDPError, match="gamma = 1 needs at least one terminal state"):
        TabularMDP(P, np.zeros((2, 1)), 1.0)
    TabularMDP(P, np.zeros((2, 1)), 0.99)  # fine with discounting
    assert two_state(gamma=1.0).gamma == 1.0  # fine with a terminal state


def test_terminal_out_of_range():
    with pytest.raises(TokenMDPError, match=r"terminal: state 5 is out of range \[0, 2\)"):
        two_state(terminal=[5])


def test_terminal_mask_shape():
    with pytest.raises(TokenMDPError, match=r"terminal: a boolean mask must have shape \(2,\); got \(3,\)"):
        two_state(terminal=np.array([True, False, False]))


def test_terminal_all_states():
    with pytest.raises(TokenMDPError, match="every state is terminal"):
        two_state(terminal=[0, 1])


def test_start_errors():
    with pytest.raises(TokenMDPError, match=r"start must have shape \(2,\); got \(3,\)"):
        two_state(start=[1.0, 0.0, 0.0])
    with pytest.raises(TokenMDPError, match="start sums to 0.5, not 1"):
        two_state(start=[0.5, 0.0])
    with pytest.raises(TokenMDPError, match="start must be a probability distribution"):
        two_state(start=[1.5, -0.5])
    with pytest.raises(TokenMDPError, match="start puts probability on terminal state 1"):
        two_state(start=[0.5, 0.5])


def test_names_and_grid_errors():
    with pytest.raises(TokenMDPError, match="state_names has 3 entries; expected 2"):
        two_state(state_names=["a", "b", "c"])
    with pytest.raises(TokenMDPError, match="action_names has 1 entries; expected 2"):
        two_state(action_names=["go"])
    with pytest.raises(TokenMDPError, match="grid 2x2 has 4 cells but the MDP has 2 states"):
        two_state(grid=(2, 2))


# ---------------------------------------------------------------- terminal states and rewards


def test_terminal_rows_become_absorbing_with_zero_reward():
    P = two_state().P.copy()
    P[1, :, :] = [0.3, 0.7]  # the user's row for the terminal state is ignored (and need not even sum to 1)
    r = np.full((2, 2, 2), 5.0)
    mdp = two_state(P=P, r=r)
    np.testing.assert_array_equal(mdp.P[1], [[0.0, 1.0], [0.0, 1.0]])
    assert (mdp.r[1] == 0).all()
    np.testing.assert_allclose(mdp.R, [[5.0, 5.0], [0.0, 0.0]])


def test_expected_reward_from_sas_rewards():
    # R[s, a] = sum_s' P r: 0.25 * 4 + 0.75 * (-4) = -2
    P = np.array([[[0.25, 0.75]], [[0.5, 0.5]]])
    r = np.array([[[4.0, -4.0]], [[1.0, 3.0]]])
    mdp = TabularMDP(P, r, 0.5)
    np.testing.assert_allclose(mdp.R, [[-2.0], [2.0]])
    assert mdp.reward(0, 0, 1) == -4.0


def test_with_gamma_revalidates():
    mdp = random_mdp(4, 2, seed=1)
    assert mdp.with_gamma(0.5).gamma == 0.5
    with pytest.raises(TokenMDPError, match="gamma = 1 needs"):
        mdp.with_gamma(1.0)


# ---------------------------------------------------------------- builders


def test_chain_structure():
    mdp = chain()
    assert mdp.n_states == 6 and mdp.action_names == ["left", "right"]
    np.testing.assert_array_equal(np.flatnonzero(mdp.terminal), [0, 5])
    np.testing.assert_array_equal(mdp.start, np.eye(6)[1])
    assert mdp.P[1, 0, 0] == 1.0 and mdp.P[4, 1, 5] == 1.0
    np.testing.assert_allclose(mdp.R[1], [0.1, 0.0])
    np.testing.assert_allclose(mdp.R[4], [0.0, 1.0])
    slippy = chain(slip=0.2)
    np.testing.assert_allclose(slippy.P[2, 1, [1, 3]], [0.2, 0.8])
    np.testing.assert_allclose(slippy.R[1], [0.8 * 0.1, 0.2 * 0.1])
    with pytest.raises(TokenMDPError, match="chain: n must be at least 3; got 2"):
        chain(2)


def test_gridworld_structure():
    mdp = gridworld4x4()
    assert mdp.gamma == 1.0 and mdp.grid == (4, 4)
    np.testing.assert_array_equal(np.flatnonzero(mdp.terminal), [0, 15])
    up, right, down, left = range(4)
    assert mdp.P[5, up, 1] == 1 and mdp.P[5, right, 6] == 1 and mdp.P[5, down, 9] == 1 and mdp.P[5, left, 4] == 1
    assert mdp.P[3, up, 3] == 1 and mdp.P[3, right, 3] == 1  # off the grid: stay
    assert (mdp.R[mdp.nonterminal] == -1).all() and (mdp.R[mdp.terminal] == 0).all()
    np.testing.assert_allclose(mdp.start[mdp.nonterminal], 1 / 14)


def test_cliff_structure():
    mdp = cliff_walking()
    assert mdp.grid == (4, 12) and mdp.start[36] == 1.0
    np.testing.assert_array_equal(np.flatnonzero(mdp.terminal), [47])
    up, right, down, left = range(4)
    assert mdp.P[36, right, 36] == 1.0 and mdp.R[36, right] == -100  # into the cliff: back to start
    assert mdp.P[24, down, 36] == 1.0 and mdp.R[24, down] == -1
    assert mdp.P[30, down, 36] == 1.0 and mdp.R[30, down] == -100
    assert mdp.P[35, down, 47] == 1.0 and mdp.R[35, down] == -1
    reach = mdp.reachable()
    assert not reach[37:47].any() and reach[:37].all() and reach[47]


def test_random_mdp_seeded():
    a, b, c = random_mdp(5, 3, seed=7), random_mdp(5, 3, seed=7), random_mdp(5, 3, seed=8)
    np.testing.assert_array_equal(a.P, b.P)
    assert not np.allclose(a.P, c.P)
    np.testing.assert_allclose(a.P.sum(axis=2), 1.0, atol=1e-12)
    sparse = random_mdp(6, 2, seed=0, branching=2)
    assert ((sparse.P > 0).sum(axis=2) <= 2).all()
    with pytest.raises(TokenMDPError, match=r"branching must be in \[1, 6\]; got 9"):
        random_mdp(6, 2, branching=9)


def test_transitions_and_to_dict():
    mdp = two_state()
    assert mdp.transitions() == [(0, 0, 1, 1.0, 1.0), (0, 1, 0, 1.0, 0.0)]
    d = json.loads(json.dumps(mdp.to_dict()))
    assert d["terminal"] == [1] and d["n_states"] == 2 and len(d["transitions"]) == 2


# ---------------------------------------------------------------- gymnasium


needs_gym = pytest.mark.skipif(find_spec("gymnasium") is None, reason="gymnasium not installed")


@needs_gym
def test_from_gymnasium_cliff_equals_builder():
    import warnings

    import gymnasium as gym

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = gym.make("CliffWalking-v1")
    g, c = from_gymnasium(env, gamma=1.0), cliff_walking()
    np.testing.assert_array_equal(g.P, c.P)
    np.testing.assert_array_equal(g.R, c.R)
    np.testing.assert_array_equal(g.start, c.start)
    np.testing.assert_array_equal(g.terminal, c.terminal)
    assert g.action_names == c.action_names and g.markers == c.markers


@needs_gym
def test_frozenlake_terminals_are_holes_and_goal():
    mdp = get_mdp("frozenlake")
    np.testing.assert_array_equal(np.flatnonzero(mdp.terminal), [5, 7, 11, 12, 15])
    assert mdp.markers[15] == "G" and mdp.markers[5] == "H" and mdp.grid == (4, 4)
    np.testing.assert_allclose(mdp.P[0, 0, [0, 4]], [2 / 3, 1 / 3])  # left at the corner, slippery
    np.testing.assert_allclose(mdp.R[14, 2], 1 / 3)  # right from the cell next to the goal: 1/3 chance of 1
    assert mdp.action_names == ["left", "down", "right", "up"]


@needs_gym
def test_taxi_loads():
    mdp = get_mdp("taxi")
    assert (mdp.n_states, mdp.n_actions) == (500, 6)
    assert mdp.terminal.sum() == 4 and mdp.start.sum() == pytest.approx(1.0)
    assert mdp.state_names[0] == "(0,0) p=R d=R" and mdp.terminal[0]  # passenger delivered to R
    assert mdp.state_names[1] == "(0,0) p=R d=G" and mdp.start[1] > 0


def test_from_gymnasium_routes_ambiguous_done_to_extra_state():
    # state 1 is entered with done=True from 0 (action 0) but also with done=False from 0 (action 1)
    P = {
        0: {0: [(1.0, 1, 5.0, True)], 1: [(0.5, 1, 0.0, False), (0.5, 0, 0.0, False)]},
        1: {0: [(1.0, 0, -1.0, False)], 1: [(1.0, 1, 0.0, False)]},
    }
    env = SimpleNamespace(P=P, observation_space=SimpleNamespace(n=2), action_space=SimpleNamespace(n=2),
                          initial_state_distrib=np.array([1.0, 0.0]))
    mdp = from_gymnasium(env, gamma=0.9)
    assert mdp.n_states == 3 and np.flatnonzero(mdp.terminal).tolist() == [2]
    assert mdp.P[0, 0, 2] == 1.0 and mdp.R[0, 0] == 5.0
    np.testing.assert_allclose(mdp.P[0, 1], [0.5, 0.5, 0.0])
    assert mdp.P[1, 0, 0] == 1.0


def test_from_gymnasium_needs_P():
    with pytest.raises(TokenMDPError, match="exposes no transition table P"):
        from_gymnasium(SimpleNamespace())


# ---------------------------------------------------------------- registry and files


@needs_gym
def test_registry_names():
    for name in ("chain", "gridworld", "cliff", "frozenlake", "frozenlake8", "random"):
        assert isinstance(get_mdp(name), TabularMDP)
    assert get_mdp("frozenlake8").n_states == 64
    assert get_mdp("chain", gamma=0.5).gamma == 0.5
    assert not np.allclose(get_mdp("random", seed=1).P, get_mdp("random", seed=2).P)


def test_registry_unknown_name():
    with pytest.raises(TokenMDPError, match="unknown MDP 'nope'; known: chain, gridworld, cliff"):
        get_mdp("nope")


def test_load_mdp_json_and_yaml(tmp_path):
    data = {"P": two_state().P.tolist(), "r": [[1, 0], [0, 0]], "gamma": 0.9, "terminal": [1],
            "action_names": ["go", "wait"]}
    pj = tmp_path / "m.json"
    pj.write_text(json.dumps(data))
    mdp = load_mdp(pj)
    assert mdp.name == "m" and mdp.action_names == ["go", "wait"]
    np.testing.assert_array_equal(mdp.P, two_state().P)
    import yaml

    py = tmp_path / "m.yaml"
    py.write_text(yaml.safe_dump(data))
    assert get_mdp(str(py), gamma=0.5).gamma == 0.5


def test_load_mdp_errors_name_the_file(tmp_path):
    with pytest.raises(TokenMDPError, match="MDP file not found"):
        load_mdp(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"P": [[[1]]], "r": [[0]]}')
    with pytest.raises(TokenMDPError, match=r"bad\.json: missing field 'gamma'"):
        load_mdp(bad)
    bad.write_text('{"P": [[[1]]], "r": [[0]], "gamma": 0.5, "gama": 1}')
    with pytest.raises(TokenMDPError, match=r"bad\.json: unknown field 'gama'"):
        load_mdp(bad)
    bad.write_text('{"P": [[[0.5]]], "r": [[0]], "gamma": 0.5}')
    with pytest.raises(TokenMDPError, match=r"bad\.json: row P\[0, 0, :\] sums to 0\.5"):
        load_mdp(bad)
    bad.write_text("{not json")
    with pytest.raises(TokenMDPError, match=r"bad\.json: not valid JSON"):
        load_mdp(bad)
