"""reasoning-gym data sets as tasks (`reasoning_gym:<dataset>`): splits from the seed, the data set's own scorer
as the verifier, a few training steps and a held-out evaluation, and one error for an unknown data set."""

from __future__ import annotations

import json

import pytest

from tokenmdp.errors import TokenMDPError
from tokenmdp.tasks import get_task

pytest.importorskip("reasoning_gym", reason="reasoning-gym is not installed (pip install 'tokenmdp[rg]')")


def test_splits_and_the_data_sets_own_scorer():
    task = get_task("reasoning_gym:leg_counting", size=50, seed=3)
    train, test = task.problems("train", n=100), task.problems("test")
    assert task.num_problems("test") == 10 and len(test) == 10 and len(train) == 100
    assert not {p.id for p in train} & {p.id for p in test}
    assert get_task("reasoning_gym:leg_counting", size=50, seed=3).problems("test") == test  # a function of seed
    p = test[0]
    assert task.render(p).endswith("<answer></answer> tags.") and task.render(p, template="plain") == p.question
    right = task.score(p, f"Counting... <answer>{p.answer}</answer>")
    assert (right.reward, right.correct, right.formatted) == (1.0, True, True)
    wrong = task.score(p, f"<answer>{int(p.answer) + 1}</answer>")
    assert wrong.reward < 1.0 and not wrong.correct and wrong.formatted
    assert task.score(p, "").formatted is False and task.score(p, f"{p.answer}").formatted is False
    assert task.score(p, f"{p.answer}").correct  # the last line is still read and scored
    with pytest.raises(TokenMDPError, match="test split holds 10 entries, not 11"):
        task.problems("test", n=11)


def test_an_unknown_data_set_is_one_error():
    with pytest.raises(TokenMDPError, match=r"unknown reasoning-gym data set 'leg_countin' \(\d+ known; did you "
                                            r"mean .*leg_counting"):
        get_task("reasoning_gym:leg_countin")


def test_trains_and_evaluates_held_out(tiny_random_dir, tmp_path):
    from tokenmdp.cli import main

    out = tmp_path / "run"
    args = ["train", "--algo", "grpo", "--steps", "2", "--out", str(out), "--no-progress", "--set",
            f"model.path={tiny_random_dir}", "--set", "task.name=reasoning_gym:leg_counting", "--set",
            "task.options={size: 40}", "--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=2",
            "--set", "rollout.max_new_tokens=4", "--set", "run.threads=1", "--set", "run.eval_every=2",
            "--set", "run.eval_n=4", "--set", "run.eval_k=2"]
    assert main(args) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "eval/accuracy" in rows[-1]
