"""The arithmetic task: exact values by hand, disjoint prefix-stable splits, GSM8K's scoring, bad options, and a
two-step GRPO run on it."""

from __future__ import annotations

import pytest

from tokenmdp.errors import TokenMDPError
from tokenmdp.tasks import get_task
from tokenmdp.tasks.arithmetic import _value


@pytest.mark.parametrize("operands, ops, value", [
    ([7, 8], ["*"], 56), ([2, 3, 4], ["+", "*"], 14), ([2, 3, 4], ["*", "-"], 2), ([9, 9, 9], ["-", "-"], -9),
    ([5, 0, 3, 2], ["*", "+", "*"], 6),
])
def test_values_by_hand(operands, ops, value):
    assert _value(operands, ops) == value


def test_splits_are_disjoint_prefix_stable_and_exact():
    task = get_task("arithmetic", digits=2, terms=3, ops="+-*")
    train, test = task.problems("train", n=300, seed=1), task.problems("test", n=60, seed=1)
    assert not {p.question for p in train} & {p.question for p in test}
    assert task.problems("train", n=40, seed=1) == train[:40] and task.problems("train", n=40, seed=2) != train[:40]
    for p in train[:50]:
        a = [int(x) for x in p.question.split()[::2]]
        assert all(10 <= x <= 99 for x in a) and int(p.answer) == _value(a, p.question.split()[1::2])
    assert get_task("arithmetic", ops="+x").ops == "+*"
    assert task.render(train[0]) == f"Calculate {train[0].question}. End your reply with 'The answer is N.' " \
                                    "where N is the result."


def test_scoring_reads_the_last_number():
    task = get_task("arithmetic", rewards=[1.0, 0.1, 0.0])
    p = task.problems("train", n=1)[0]
    right, wrong = int(p.answer), int(p.answer) + 1
    assert task.score(p, f" 7 times 8 is... The answer is {right}.").correct
    assert task.score(p, task.reference(p)).reward == 1.0
    s = task.score(p, f" The answer is {wrong}.")
    assert (s.reward, s.correct, s.formatted) == (0.1, False, True)
    s = task.score(p, " I do not know.")
    assert (s.reward, s.correct, s.formatted) == (0.0, False, False)


@pytest.mark.parametrize("kwargs, field", [
    ({"digits": 0}, "digits"), ({"terms": 1}, "terms"), ({"ops": "/"}, "ops"), ({"ops": ""}, "ops"),
    ({"extraction": "last"}, "extraction"), ({"rewards": [1, 0]}, "rewards"),
])
def test_bad_options_name_the_option(kwargs, field):
    with pytest.raises(TokenMDPError, match=f"'{field}'"):
        get_task("arithmetic", **kwargs)


def test_grpo_runs_on_it(tmp_path, tiny_random_dir):
    from tokenmdp.train.config import load_config
    from tokenmdp.train.trainer import train

    run = train(load_config(None, [f"model.path={tiny_random_dir}", "task.name=arithmetic", "task.template=plain",
                                   "algo.name=grpo_nokl", f"run.out={tmp_path / 'run'}", "run.steps=2",
                                   "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=6",
                                   "run.save_every=0", "run.threads=1"]), progress=False)
    assert (run / "DONE").exists() and len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_the_test_split_counts_each_expression_once():
    """One-digit products: 100 expressions, 25 of them test; the held-out set holds each once, and asking for 26
    is an error that names the count (a held-out score over repeats would overstate its power)."""
    task = get_task("arithmetic", ops="x")
    test = task.problems("test", n=25, seed=0)
    assert len({p.question for p in test}) == 25
    assert all(int(p.answer) == int(p.question.split()[0]) * int(p.question.split()[2]) for p in test)
    with pytest.raises(TokenMDPError, match="found only 25 test problems of 26"):
        task.problems("test", n=26, seed=0)
    train = task.problems("train", n=200, seed=0)
    assert len({p.question for p in train}) <= 75 and not {p.question for p in train} & {p.question for p in test}
