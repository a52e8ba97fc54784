"""The calculator environment (tokenmdp.rollout.calculator) and held-out evaluation through an environment
(tokenmdp.train.heldout.evaluate with ``env=``): hand-computed answers, episodes of the embedded base model where
every observation is the exact value of the line before it and is masked out of the loss, the single-turn
environment evaluating exactly as the plain evaluation, and a trainer run whose held-out curve goes through the
environment from step 0."""

from __future__ import annotations

import json

import pytest
import torch

from tokenmdp.base.store import SHIPPED
from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.env import EpisodeLimits, SingleTurnEnv
from tokenmdp.rollout.calculator import CalculatorEnvironment, calculate
from tokenmdp.rollout.fast import FastEngine
from tokenmdp.rollout.multiturn import run_episodes
from tokenmdp.tasks import get_task
from tokenmdp.train.config import load_config
from tokenmdp.train.environment import RunEnvironment
from tokenmdp.train.heldout import evaluate
from tokenmdp.train.trainer import train

from test_trainer import SMALL, ParityTask  # noqa: F401  (registers the parity task)

needs_base = pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(),
                                reason="the embedded base model is not shipped in this checkout")


@pytest.mark.parametrize("line, answer", [
    ("3+5", "8"), ("10-6", "4"), ("8-11", "-3"), ("7/2", "7/2"), ("(7/2)*4", "14"), ("6*4", "24"),
    ("(-3)*2", "-6"), (" 12 * 3 ", "36"),
    ("</think><answer>(3+5)*7", None), ("hello", None), ("5/0", None), ("7", None), ("", None), ("3+5=8", None),
    ("1+" * 40 + "1", None),
])
def test_calculate_by_hand(line, answer):
    assert calculate(line) == answer


def test_the_stop_token_must_be_one_token():
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1, 2]}

    with pytest.raises(TokenMDPError, match="task.env.kind"):
        CalculatorEnvironment(Tok(), get_task("countdown"))


@pytest.fixture(scope="module")
def base():
    from tokenmdp.policy.model import load_policy

    if not (SHIPPED / "model.safetensors").is_file():
        pytest.skip("the embedded base model is not shipped in this checkout")
    torch.set_num_threads(1)
    return load_policy(str(SHIPPED))


def _countdown():
    from tokenmdp.base.pretrain import BASE_TASK_KWARGS

    return get_task("countdown", **BASE_TASK_KWARGS)


@needs_base
def test_every_observation_is_the_value_of_the_line_before_it(base):
    task = _countdown()
    problems = task.problems("test", n=6, seed=0)
    prompts = [task.render(p, template="compact") for p in problems]
    calc = CalculatorEnvironment(base.tokenizer, task)
    ep = run_episodes(FastEngine(base.model, base.tokenizer), base.tokenizer, calc.make_env, problems, prompts,
                      group_size=3, limits=EpisodeLimits(16, 48, 96), seed=1)
    ro, tok = ep.rollout, base.tokenizer
    assert ro.observation_mask is not None
    answered = 0
    for b in range(len(ro)):
        ids, act, obs = ro.response_ids[b].tolist(), ro.response_mask[b].tolist(), ro.observation_mask[b].tolist()
        assert not any(a and o for a, o in zip(act, obs))
        k = 0
        while k < len(ids):
            if not obs[k]:
                k += 1
                continue
            end = k
            while end < len(ids) and obs[end]:
                end += 1
            before = tok.decode(ids[:k])
            assert before.endswith("=")  # the calculator answers only a turn that asked
            assert tok.decode(ids[k:end]) == calculate(before[:-1].rsplit("\n", 1)[-1])
            assert bool((ro.logprobs[b, k:end] == 0).all())  # observations: no log-probs, never actions
            answered += 1
            k = end
        score = ep.infos[b].get("score")
        if score is not None:  # the verifier scored the whole text, observations included
            assert score.reward == task.score(problems[b // 3], ro.responses[b]).reward
    assert answered >= 6  # the base writes its steps: the calculator answers most of them


def _single_turn_env(task, tokenizer, max_new):
    def score(problem, ids):
        return task.score(problem, tokenizer.decode(list(ids), skip_special_tokens=True,
                                                    clean_up_tokenization_spaces=False))

    return RunEnvironment("single_turn", lambda: SingleTurnEnv(score), EpisodeLimits(1, max_new, max_new),
                          lambda seed: None)


def test_evaluation_through_the_single_turn_env_is_the_plain_evaluation(tiny_random):
    """The token MDP as an environment evaluates exactly as the plain evaluation: every record, field by field."""
    model, tok = tiny_random
    task = get_task("parity")
    problems = task.problems("test", n=5, seed=0)
    kw = dict(k=2, engine=FastEngine(model, tok), max_new_tokens=6, batch_size=4, seed=3)
    plain = evaluate(model, tok, task, problems, **kw)
    env = evaluate(model, tok, task, problems, env=_single_turn_env(task, tok, 6), **kw)
    assert env["records"] == plain["records"]
    assert env["metrics"] == plain["metrics"] and env["settings"]["env"] == "single_turn"


@needs_base
def test_a_calculator_run_evaluates_through_the_environment_from_step_0(tmp_path):
    cfg = load_config(None, [f"model.path={SHIPPED}", "algo.name=grpo_nokl", f"run.out={tmp_path / 'run'}",
                             "rollout.prompts_per_step=2", "rollout.group_size=4", "run.steps=2", "run.save_every=0",
                             "run.threads=1", "task.env.kind=calculator", "task.env.max_turns=16",
                             "task.env.turn_tokens=48", "run.eval_every=2", "run.eval_before=true", "run.eval_n=4",
                             "run.eval_k=2", "run.equivalence=true"])
    run = train(cfg, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert all(r["env/observation_tokens"] > 0 for r in records if "env/turns" in r)
    steps = [r for r in records if "env/turns" in r]
    assert all(r["env/turns"] > 1 for r in steps)
    # the paper's identity holds on-policy through the calculator's tokens (masked out of both gradients)
    assert all(r["equiv/cosine_on_policy"] > 0.9999 for r in steps)

    # tokenmdp eval --env-from: the final model through the run's environment; a run without one is refused
    from tokenmdp.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(run / "final"), "--env-from", str(run), "--n", "3", "--k", "2",
                 "--threads", "1", "--out", str(out), "--json"]) == 0
    ev = json.loads(out.read_text())
    assert ev["settings"]["env"] == "calculator" and ev["metrics"]["n_problems"] == 3
    assert any("=" in s["completion"] for r in ev["records"] for s in r["samples"])
    (tmp_path / "plain.yaml").write_text(f"model:\n  path: {SHIPPED}\n")
    assert main(["eval", "--model", str(run / "final"), "--env-from", str(tmp_path / "plain.yaml"), "--n", "2"]) == 2
    assert main(["eval", "--model", str(run / "final"), "--env-from", str(tmp_path / "nowhere"), "--n", "2"]) == 2
