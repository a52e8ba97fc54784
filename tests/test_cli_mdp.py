"""`tokenmdp mdp ...` and `tokenmdp demo` through tokenmdp.cli.main."""

from __future__ import annotations

import json
from importlib.util import find_spec

import numpy as np
import pytest

from tokenmdp.cli import main

needs_gym = pytest.mark.skipif(find_spec("gymnasium") is None, reason="gymnasium not installed")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("argv", [["mdp"], ["mdp", "list"], ["mdp", "show"], ["mdp", "solve"], ["demo"]])
def test_help(capsys, argv):
    code, out, _ = run(capsys, *argv, "--help")
    assert code == 0
    assert "Usage" in out and "--help" in out
    if argv[-1] in ("list", "show", "solve", "demo"):
        assert "--json" in out


def test_list_json(capsys):
    names = [row["name"] for row in run_json(capsys, "mdp", "list")]
    assert names == ["chain", "gridworld", "cliff", "frozenlake", "frozenlake8", "taxi", "random"]
    code, out, _ = run(capsys, "mdp", "list")
    assert code == 0 and "Sutton & Barto example 6.6" in out


def test_show_chain_dense(capsys):
    code, out, _ = run(capsys, "mdp", "show", "chain")
    assert code == 0
    assert "chain: 6 states, 2 actions (left, right), gamma 0.9" in out
    assert "P(s' | s, a=left)" in out and "P(s' | s, a=right)" in out and "R[s, a]" in out


def test_show_gridworld_sparse_with_limit(capsys):
    code, out, _ = run(capsys, "mdp", "show", "gridworld", "--limit", "5")
    assert code == 0
    # 14 non-terminal states x 4 actions, deterministic: 56 transitions listed, 5 shown
    assert "51 more transitions not shown" in out


def test_show_json_transitions(capsys):
    d = run_json(capsys, "mdp", "show", "gridworld")
    assert d["n_states"] == 16 and d["terminal"] == [0, 15] and len(d["transitions"]) == 56
    assert all(t["r"] == -1 and t["p"] == 1 for t in d["transitions"])


def test_solve_gridworld_eval_json(capsys):
    d = run_json(capsys, "mdp", "solve", "gridworld", "--method", "eval")
    np.testing.assert_allclose(np.array(d["V"]).reshape(4, 4)[0], [0, -14, -20, -22], atol=1e-9)
    assert d["method"] == "eval" and np.allclose(d["policy"], 0.25)


def test_solve_vi_prints_grid_picture(capsys):
    code, out, _ = run(capsys, "mdp", "solve", "cliff")
    assert code == 0
    assert "→ → → → → → → → → → → ↓" in out and "↑ C C C C C C C C C C G" in out
    assert "greedy path from (3,0): 13 steps, return -13" in out


def test_solve_q_learning_and_sarsa_json(capsys):
    q = run_json(capsys, "mdp", "solve", "cliff", "-m", "q-learning", "--epsilon", "0.1", "--alpha", "0.5",
                 "--seed", "0", "--episodes", "500")
    s = run_json(capsys, "mdp", "solve", "cliff", "-m", "sarsa", "--seed", "0")
    assert q["path"]["steps"] == 13 and s["path"]["steps"] > 13
    assert q["info"] == {"alpha": 0.5, "epsilon": 0.1, "seed": 0, "max_steps": 10000}
    assert len(q["history"]["return"]) == 500
    assert q["picture"].splitlines()[3] == "↑ C C C C C C C C C C G"


def test_solve_reinforce_chain_table(capsys):
    code, out, err = run(capsys, "mdp", "solve", "chain", "-m", "reinforce", "--episodes", "300")
    assert code == 0, err
    assert "pi(greedy|s)" in out and "L → → → → R" in out


def test_solve_gamma_override_and_random_seed(capsys):
    d = run_json(capsys, "mdp", "solve", "chain", "--gamma", "0.5")
    assert d["gamma"] == 0.5
    np.testing.assert_allclose(d["V"][1], 0.125)  # right three times: 0.5^3 beats 0.1 on the left
    a = run_json(capsys, "mdp", "solve", "random", "--seed", "1")
    b = run_json(capsys, "mdp", "solve", "random", "--seed", "2")
    assert a["V"] != b["V"]


@needs_gym
def test_solve_frozenlake_json(capsys):
    d = run_json(capsys, "mdp", "solve", "frozenlake", "-m", "pi")
    assert d["converged"] and d["greedy_names"][15] is None  # terminal goal
    assert 0.5 < d["V"][0] < 0.6


def test_unknown_mdp_is_one_line_exit_2(capsys):
    code, out, err = run(capsys, "mdp", "solve", "nope")
    assert code == 2 and out == ""
    assert err.startswith("error: unknown MDP 'nope'") and err.count("\n") == 1
    assert "Traceback" not in err


def test_unknown_method_and_bad_values(capsys):
    code, _, err = run(capsys, "mdp", "solve", "chain", "--method", "magic")
    assert code == 2 and err.startswith("error: --method: unknown method 'magic'") and err.count("\n") == 1
    code, _, err = run(capsys, "mdp", "solve", "random", "--gamma", "1")
    assert code == 2 and err == "error: gamma = 1 needs at least one terminal state (returns would be unbounded)\n"
    code, _, err = run(capsys, "mdp", "solve", "chain", "-m", "sarsa", "--alpha", "2")
    assert code == 2 and "alpha (step size) must be in (0, 1]; got 2" in err


def test_mdp_from_file(capsys, tmp_path):
    path = tmp_path / "coin.yaml"
    path.write_text(
        "P: [[[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]], [[0, 1, 0], [0, 1, 0]], [[0, 0, 1], [0, 0, 1]]]\n"
        "r: [[[0, 1, -1], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]]]\n"
        "gamma: 1.0\nterminal: [1, 2]\nstart: [1, 0, 0]\naction_names: [flip, wait]\n"
    )
    # flipping is worth 0.5 * 1 + 0.5 * (-1) = 0 and ends the episode; waiting stays in s0 at reward 0
    d = run_json(capsys, "mdp", "solve", str(path), "-m", "eval", "--gamma", "0.9")
    np.testing.assert_allclose(d["V"][0], 0.0, atol=1e-12)
    code, _, err = run(capsys, "mdp", "solve", str(path), "-m", "pi")
    assert code == 0, err
    bad = tmp_path / "bad.yaml"
    bad.write_text("P: [[[0.5]]]\nr: [[0]]\ngamma: 0.5\n")
    code, _, err = run(capsys, "mdp", "show", str(bad))
    assert code == 2 and err.startswith("error: ") and "bad.yaml: row P[0, 0, :] sums to 0.5" in err


def test_demo_json(capsys):
    d = run_json(capsys, "demo", "--tabular", "--episodes", "500")
    np.testing.assert_allclose(np.array(d["gridworld"]["V_random"])[0], [0, -14, -20, -22], atol=1e-9)
    assert d["gridworld"]["iterative_max_diff"] < 1e-6
    assert d["cliff"]["q-learning"]["path_steps"] == 13
    assert d["cliff"]["sarsa"]["path_steps"] > 13


def test_demo_prints(capsys):
    code, out, _ = run(capsys, "demo", "--tabular")
    assert code == 0
    assert "Gridworld 4x4" in out and "Cliff walking" in out and "q-learning: greedy path, 13 steps" in out
