"""Tabular solvers: exact values, agreement between DP methods, TD control on cliff walking, REINFORCE."""

from __future__ import annotations

import itertools
from importlib.util import find_spec

import numpy as np
import pytest

from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.tabular import TabularMDP, chain, cliff_walking, gridworld4x4, random_mdp
from tokenmdp.solvers import (
    evaluate_policy,
    greedy_path,
    iterative_evaluation,
    policy_iteration,
    q_from_v,
    reinforce,
    solve,
    td_control,
    value_iteration,
)
from tokenmdp.solvers.common import epsilon_greedy
from tokenmdp.solvers.policy_gradient import (
    discounted_returns,
    exact_policy_gradient,
    reinforce_gradient,
    sample_episode,
    softmax_policy,
)
from tokenmdp.solvers.show import path_picture, policy_picture
from tokenmdp.solvers.td import Sampler, td_target

FIG_4_1 = np.array([
    [0, -14, -20, -22],
    [-14, -18, -20, -20],
    [-20, -20, -18, -14],
    [-22, -20, -14, 0],
], dtype=float)


def two_state(gamma=0.9):
    """s0: a0 -> terminal s1 with reward 1, a1 -> stay in s0 with reward 0."""
    P = np.zeros((2, 2, 2))
    P[0, 0, 1] = P[0, 1, 0] = 1.0
    return TabularMDP(P, np.array([[1.0, 0.0], [0.0, 0.0]]), gamma, terminal=[1])


# ---------------------------------------------------------------- hand-computed pieces


def test_two_state_by_hand():
    # random policy: V0 = 0.5 * 1 + 0.5 * 0.9 * V0  ->  V0 = 0.5 / 0.55
    mdp = two_state()
    res = evaluate_policy(mdp)
    np.testing.assert_allclose(res.V, [0.5 / 0.55, 0.0], atol=1e-12)
    np.testing.assert_allclose(res.Q[0], [1.0, 0.9 * 0.5 / 0.55], atol=1e-12)
    opt = value_iteration(mdp)
    np.testing.assert_allclose(opt.V, [1.0, 0.0])
    np.testing.assert_allclose(opt.Q[0], [1.0, 0.9])


def test_q_from_v_chain():
    mdp = chain()
    Q = q_from_v(mdp, np.zeros(6))
    np.testing.assert_allclose(Q[1], [0.1, 0.0])
    np.testing.assert_allclose(Q[4], [0.0, 1.0])
    # terminal values are masked: a non-zero V on a terminal state never leaks
    V = np.array([100.0, 0, 0, 0, 0, 100.0])
    np.testing.assert_allclose(q_from_v(mdp, V), Q)


def test_epsilon_greedy_and_td_targets():
    np.testing.assert_allclose(epsilon_greedy(np.array([1.0, 3.0, 3.0]), 0.3), [0.1, 0.45, 0.45])
    q_next = np.array([2.0, 4.0])
    assert td_target("q-learning", -1.0, q_next, 1.0, epsilon=0.2) == 3.0
    assert td_target("expected-sarsa", -1.0, q_next, 1.0, epsilon=0.2) == pytest.approx(2.8)
    assert td_target("sarsa", -1.0, q_next, 1.0, epsilon=0.2, a_next=0) == 1.0
    assert td_target("sarsa", -1.0, None, 1.0, epsilon=0.2) == -1.0  # terminal: no bootstrap
    with pytest.raises(TokenMDPError, match="unknown TD rule 'td9'"):
        td_target("td9", 0.0, q_next, 1.0, epsilon=0.1)


def test_policy_gradient_pieces_by_hand():
    np.testing.assert_allclose(softmax_policy(np.array([[0.0, np.log(3.0)]])), [[0.25, 0.75]])
    np.testing.assert_allclose(discounted_returns(np.array([0.0, 0.0, 1.0]), 0.9), [0.81, 0.9, 1.0])
    g = reinforce_gradient(np.zeros((1, 2)), np.array([0]), np.array([1]), np.array([1.0]), 1.0)
    np.testing.assert_allclose(g, [[-0.5, 0.5]])
    # pi = [0.25, 0.75]; G = [0.5, 1]; weights gamma^t G = [0.5, 0.5]
    # t0 (a=1): 0.5 * [-0.25, 0.25]; t1 (a=0): 0.5 * [0.75, -0.75]; sum [0.25, -0.25]
    theta = np.array([[0.0, np.log(3.0)]])
    g = reinforce_gradient(theta, np.array([0, 0]), np.array([1, 0]), np.array([0.0, 1.0]), 0.5)
    np.testing.assert_allclose(g, [[0.25, -0.25]])
    g_b = reinforce_gradient(theta, np.array([0, 0]), np.array([1, 0]), np.array([0.0, 1.0]), 0.5,
                             baseline=np.array([0.5]))
    np.testing.assert_allclose(g_b, [[0.1875, -0.1875]])  # weights [0, 0.5 * 0.5]: only t1, 0.25 * [0.75, -0.75]


# ---------------------------------------------------------------- dynamic programming


def test_gridworld_figure_4_1_exact():
    res = evaluate_policy(gridworld4x4())
    np.testing.assert_allclose(res.V.reshape(4, 4), FIG_4_1, atol=1e-6)


def test_gridworld_iterative_evaluation_agrees():
    mdp = gridworld4x4()
    sync = iterative_evaluation(mdp, tol=1e-10)
    inplace = iterative_evaluation(mdp, tol=1e-10, in_place=True)
    assert sync.converged and inplace.converged
    np.testing.assert_allclose(sync.V.reshape(4, 4), FIG_4_1, atol=1e-6)
    np.testing.assert_allclose(inplace.V.reshape(4, 4), FIG_4_1, atol=1e-6)
    assert inplace.iterations < sync.iterations  # in-place uses fresher values
    short = iterative_evaluation(mdp, max_iter=3)
    assert not short.converged and short.iterations == 3
    # after k synchronous sweeps from 0, V_k(s) = -k for states at distance > k from a corner (k = 1)
    np.testing.assert_allclose(iterative_evaluation(mdp, max_iter=1).V[1:15], -1.0)


def test_gridworld_optimal_is_distance_to_nearest_corner():
    mdp = gridworld4x4()
    vi = value_iteration(mdp)
    dist = np.array([min(i + j, 6 - i - j) for i in range(4) for j in range(4)], dtype=float)
    np.testing.assert_allclose(vi.V, -dist)
    assert vi.iterations == 4  # 3 sweeps to propagate, the 4th changes nothing
    pi = policy_iteration(mdp)
    assert pi.iterations == 2  # greedy w.r.t. the random policy's values is already optimal
    np.testing.assert_allclose(pi.V, -dist)


def test_improper_policy_with_gamma_one_is_an_error():
    mdp = gridworld4x4()
    always_up = np.zeros((16, 4))
    always_up[:, 0] = 1.0
    # only the first column walks up into the corner (0, 0); the other 11 non-terminal states bump forever
    with pytest.raises(TokenMDPError, match=r"gamma = 1 the policy never reaches a terminal state from 11 "
                                            r"state\(s\) \(\(0,1\), \(0,2\), \(0,3\), \(1,1\), \(1,2\)\)"):
        evaluate_policy(mdp, always_up)


def test_policy_validation_messages():
    mdp = two_state()
    with pytest.raises(TokenMDPError, match=r"policy must have shape \(S, A\) = \(2, 2\); got \(2, 3\)"):
        evaluate_policy(mdp, np.full((2, 3), 1 / 3))
    with pytest.raises(TokenMDPError, match="policy row 0 sums to 0.5, not 1"):
        evaluate_policy(mdp, np.array([[0.25, 0.25], [0.5, 0.5]]))
    with pytest.raises(TokenMDPError, match="finite, non-negative"):
        evaluate_policy(mdp, np.array([[1.5, -0.5], [0.5, 0.5]]))


def _check_agreement(mdp: TabularMDP, atol: float = 1e-6) -> None:
    vi, pi = value_iteration(mdp), policy_iteration(mdp)
    assert vi.converged and pi.converged
    np.testing.assert_allclose(vi.V, pi.V, atol=atol)
    np.testing.assert_allclose(evaluate_policy(mdp, vi.policy).V, vi.V, atol=atol)
    np.testing.assert_allclose(evaluate_policy(mdp, pi.policy).V, pi.V, atol=1e-10)
    np.testing.assert_allclose(vi.Q.max(axis=1), vi.V, atol=atol)  # Bellman optimality
    assert (vi.V >= evaluate_policy(mdp).V - atol).all()  # optimal beats random everywhere


@pytest.mark.parametrize("seed", range(5))
def test_vi_pi_eval_agree_on_random_mdps(seed):
    mdp = random_mdp(8, 3, seed=seed, branching=4)
    _check_agreement(mdp)
    # random rewards: the optimal policy is unique, so VI and PI choose the same actions
    np.testing.assert_array_equal(value_iteration(mdp).greedy_actions, policy_iteration(mdp).greedy_actions)


def test_value_iteration_matches_brute_force_over_all_policies():
    mdp = random_mdp(4, 2, seed=3)
    best = np.full(4, -np.inf)
    for actions in itertools.product(range(2), repeat=4):  # all 16 deterministic policies
        best = np.maximum(best, evaluate_policy(mdp, np.eye(2)[list(actions)]).V)
    np.testing.assert_allclose(value_iteration(mdp).V, best, atol=1e-8)


@pytest.mark.skipif(find_spec("gymnasium") is None, reason="gymnasium not installed")
def test_vi_pi_eval_agree_on_frozenlake():
    from tokenmdp.mdp.tabular_io import get_mdp

    mdp = get_mdp("frozenlake")
    _check_agreement(mdp)
    assert (value_iteration(mdp).V[mdp.terminal] == 0).all()


@pytest.mark.skipif(find_spec("gymnasium") is None, reason="gymnasium not installed")
def test_taxi_optimal_route():
    from tokenmdp.mdp.tabular_io import get_mdp

    mdp = get_mdp("taxi")
    vi = value_iteration(mdp)
    path = greedy_path(mdp, vi.greedy, start=1)  # taxi and passenger at R (0,0), destination G (0,4)
    # pickup, 8 moves around the wall, dropoff: -1 on 9 steps then +20, discounted by 0.99
    assert path.steps == 10 and path.reason == "terminal"
    assert path.ret == pytest.approx(-(1 - 0.99**9) / 0.01 + 20 * 0.99**9)
    assert vi.V[1] == pytest.approx(path.ret)


def test_chain_optimal_values():
    vi = value_iteration(chain())
    np.testing.assert_allclose(vi.V, [0, 0.729, 0.81, 0.9, 1.0, 0], atol=1e-10)
    assert vi.greedy_actions[1:5].tolist() == [1, 1, 1, 1]


# ---------------------------------------------------------------- sampling and TD control


def test_sampler_frequencies_match_P():
    mdp = chain(slip=0.25)
    env = Sampler(mdp, np.random.default_rng(0))
    draws = np.array([env.step(2, 1)[0] for _ in range(4000)])
    assert abs((draws == 3).mean() - 0.75) < 0.03 and set(draws.tolist()) == {1, 3}
    assert {env.reset() for _ in range(50)} == {1}


def test_td_control_is_seeded():
    mdp = chain(slip=0.1)
    a = td_control(mdp, "sarsa", episodes=50, seed=3)
    b = td_control(mdp, "sarsa", episodes=50, seed=3)
    c = td_control(mdp, "sarsa", episodes=50, seed=4)
    np.testing.assert_array_equal(a.Q, b.Q)
    assert not np.array_equal(a.Q, c.Q)
    assert len(a.history["return"]) == 50 and a.iterations == 50


def test_q_learning_learns_q_star_off_policy():
    # acting uniformly at random (epsilon 1), Q-learning still learns Q* (off-policy); the chain is
    # deterministic, so with alpha 0.5 the error halves at each visit
    mdp = chain()
    res = td_control(mdp, "q-learning", episodes=400, epsilon=1.0, alpha=0.5, seed=0)
    np.testing.assert_allclose(res.Q, value_iteration(mdp).Q, atol=1e-3)


def test_expected_sarsa_evaluates_its_own_policy():
    # epsilon 1: expected SARSA is on-policy evaluation of the uniform policy; its target has no sampling
    # noise on a deterministic MDP, so Q converges to Q of the random policy (not Q*)
    mdp = chain()
    res = td_control(mdp, "expected-sarsa", episodes=400, epsilon=1.0, alpha=0.5, seed=0)
    np.testing.assert_allclose(res.Q, evaluate_policy(mdp).Q, atol=1e-3)
    # epsilon 0: pure exploitation takes the small prize on the first step and never explores further
    greedy = td_control(mdp, "expected-sarsa", episodes=50, epsilon=0.0, alpha=0.5, seed=0)
    np.testing.assert_allclose(greedy.Q[1], [0.1, 0.0])
    assert greedy.greedy_actions[1] == 0


def test_td_argument_errors():
    with pytest.raises(TokenMDPError, match=r"alpha \(step size\) must be in \(0, 1\]; got 0"):
        td_control(chain(), "sarsa", alpha=0)
    with pytest.raises(TokenMDPError, match=r"epsilon must be in \[0, 1\]; got 2"):
        td_control(chain(), "sarsa", epsilon=2)
    with pytest.raises(TokenMDPError, match="episodes must be at least 1; got 0"):
        td_control(chain(), "sarsa", episodes=0)


def test_cliff_q_learning_runs_along_the_edge():
    mdp = cliff_walking()
    res = td_control(mdp, "q-learning", episodes=500, epsilon=0.1, alpha=0.5, seed=0)
    path = greedy_path(mdp, res.greedy)
    assert path.reason == "terminal" and path.steps == 13 and path.ret == -13
    assert path.states == [36, *range(24, 36), 47]  # up, 11 times right along the cliff, down


def _row(s: int) -> int:
    return s // 12


def test_cliff_sarsa_keeps_away():
    mdp = cliff_walking()
    res = td_control(mdp, "sarsa", episodes=500, epsilon=0.1, alpha=0.5, seed=0)
    path = greedy_path(mdp, res.greedy)
    assert path.reason == "terminal" and path.steps > 13
    edge = [s for s in path.states if _row(s) == 2]
    assert all(s % 12 in (0, 11) for s in edge)  # in the row above the cliff only at its two ends
    assert min(_row(s) for s in path.states) <= 1
    # and SARSA earns more while learning (fewer falls), as in Sutton & Barto figure 6.4
    q = td_control(mdp, "q-learning", episodes=500, epsilon=0.1, alpha=0.5, seed=0)
    assert np.mean(res.history["return"][-100:]) > np.mean(q.history["return"][-100:])


def test_cliff_expected_sarsa_is_safe_too():
    mdp = cliff_walking()
    res = td_control(mdp, "expected-sarsa", episodes=500, epsilon=0.1, alpha=0.5, seed=0)
    path = greedy_path(mdp, res.greedy)
    assert path.reason == "terminal" and path.steps > 13


def test_pictures():
    mdp = cliff_walking()
    vi = value_iteration(mdp)
    pic = policy_picture(mdp, vi.greedy).splitlines()
    assert pic[3] == "↑ C C C C C C C C C C G"
    assert pic[2].split() == ["→"] * 11 + ["↓"]
    path = greedy_path(mdp, vi.greedy)
    assert path_picture(mdp, path).splitlines()[1] == " ".join(["."] * 12)
    assert policy_picture(gridworld4x4(), evaluate_policy(gridworld4x4()).policy).splitlines()[0] == "T · · ·"


# ---------------------------------------------------------------- policy gradient


def test_exact_gradient_matches_finite_differences():
    mdp = chain(5, slip=0.2)
    theta = np.random.default_rng(0).normal(size=(5, 2))
    J, grad = exact_policy_gradient(mdp, theta)
    h = 1e-6
    fd = np.zeros_like(theta)
    for s, a in np.ndindex(*theta.shape):
        e = np.zeros_like(theta)
        e[s, a] = h
        fd[s, a] = (exact_policy_gradient(mdp, theta + e)[0] - exact_policy_gradient(mdp, theta - e)[0]) / (2 * h)
    np.testing.assert_allclose(grad, fd, atol=1e-6)
    assert J == pytest.approx(mdp.start @ evaluate_policy(mdp, softmax_policy(theta)).V)


@pytest.mark.parametrize("use_baseline", [False, True])
def test_reinforce_estimate_is_unbiased(use_baseline):
    mdp = chain(4, slip=0.2)
    theta = np.array([[0.0, 0.0], [0.3, -0.2], [-0.5, 0.4], [0.0, 0.0]])
    _, exact = exact_policy_gradient(mdp, theta)
    rng = np.random.default_rng(1)
    env, pi = Sampler(mdp, rng), softmax_policy(theta)
    b = np.array([0.0, 0.4, 0.6, 0.0]) if use_baseline else None
    grads = np.array([
        reinforce_gradient(theta, *sample_episode(env, pi, rng, 200), mdp.gamma, b) for _ in range(6000)
    ])
    mean, se = grads.mean(axis=0), grads.std(axis=0) / np.sqrt(len(grads))
    assert (np.abs(mean - exact) <= 4 * se + 1e-9).all(), (mean, exact, se)
    assert np.abs(exact).max() > 0.05  # the test is not vacuous


def test_reinforce_learns_the_chain():
    mdp = chain()
    res = reinforce(mdp, episodes=500, alpha=0.5, seed=0)
    assert res.greedy_actions[1:5].tolist() == [1, 1, 1, 1]
    assert (res.policy[1:5, 1] > 0.9).all()
    J = mdp.start @ res.V
    assert J > 0.7  # optimal 0.729; the left prize alone is worth 0.1
    assert mdp.start @ evaluate_policy(mdp).V < 0.3  # the uniform policy it started from
    returns = res.history["return"]
    assert np.mean(returns[:10]) < 0.5 and np.mean(returns[-50:]) > 0.95  # the learning curve moves


def test_solve_dispatch():
    assert solve(chain(), "vi").method == "vi"
    assert solve(chain(), "reinforce", episodes=20).iterations == 20
    with pytest.raises(TokenMDPError, match="unknown method 'magic'"):
        solve(chain(), "magic")
