"""The trainer on multi-turn environments (config ``task.env``) and the two-LLM formulation (a frozen base model as
the environment): every algorithm kind trains on episodes with observations, the single-turn environment gives
the plain loop's batch, a two-LLM run on Countdown with the embedded tiny base, per-turn credit, and the bad
inputs (a base tokenizer that differs from the policy's, settings an environment cannot run with)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tokenmdp.base.store import SHIPPED
from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.env import EpisodeLimits
from tokenmdp.policy.tiny import CHARS, build_char_tokenizer, build_tiny_model
from tokenmdp.rollout.fast import FastEngine
from tokenmdp.rollout.multiturn import run_episodes
from tokenmdp.rollout.two_llm import BaseModelEnvironment, retokenize
from tokenmdp.tasks import get_task
from tokenmdp.train.config import load_config
from tokenmdp.train.trainer import train

from test_trainer import SMALL, ParityTask  # noqa: F401  (registers the parity task)

ALTERNATE = ["task.env.kind=two_llm_alternate", "task.env.max_turns=2", "task.env.turn_tokens=3",
             "task.env.base_tokens=4"]


def _cfg(tmp_path, model_dir, algo, *extra, name=None):
    out = tmp_path / (name or algo)
    return load_config(None, [f"model.path={model_dir}", f"algo.name={algo}", f"run.out={out}", *SMALL, *extra])


@pytest.mark.parametrize("algo", ["grpo", "ppo", "isft+-", "dpo"])
def test_every_algorithm_kind_trains_on_a_multi_turn_env(tmp_path, tiny_random_dir, algo):
    """Two steps of each kind (policy gradient, PPO with its critic, filtered SFT, DPO) on episodes that alternate
    policy lines and base-model lines; the behaviour log-probs match the learner's (ratio 1 on the first epoch)."""
    run = train(_cfg(tmp_path, tiny_random_dir, algo, *ALTERNATE), progress=False)
    before, after = load_file(str(tiny_random_dir / "model.safetensors")), load_file(str(run / "final" /
                                                                                           "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["env/observation_tokens"] > 0 and r["env/turns"] >= 1 for r in records)
    if algo == "grpo":  # one on-policy epoch (PPO's later epochs move the ratio)
        assert abs(records[0]["policy/approx_kl"]) < 1e-5 and records[0]["policy/ratio_max"] < 1 + 1e-4


def test_single_turn_env_gives_the_plain_batch(tmp_path, tiny_random_dir):
    from tokenmdp.train.trainer import build_step

    problems = ParityTask().problems("train", n=2, seed=1)
    batches = []
    for kind in ("none", "single_turn"):
        _, _, rollouts = build_step(_cfg(tmp_path, tiny_random_dir, "grpo", f"task.env.kind={kind}"), tmp_path / "x")
        batches.append(rollouts.collect(problems, step=3))
    plain, env = batches
    for name in ("prompt_ids", "response_ids", "response_mask", "logprobs", "terminated", "truncated"):
        assert torch.equal(getattr(plain.rollout, name), getattr(env.rollout, name)), name
    assert torch.equal(plain.rewards, env.rewards) and torch.equal(plain.correct, env.correct)
    assert [s.reason for s in plain.scores] == [s.reason for s in env.scores]


def test_two_llm_countdown_with_the_embedded_base(tmp_path):
    """The policy starts as a copy of the embedded tiny base and writes a first line; the frozen base answers;
    the verifier scores the base's text. Two GRPO steps run, the policy moves, the base does not."""
    if not (SHIPPED / "model.safetensors").is_file():
        pytest.skip("the embedded base model is not shipped in this checkout")
    cfg = load_config(None, [f"model.path={SHIPPED}", "algo.name=grpo", f"run.out={tmp_path / 'run'}",
                             "rollout.prompts_per_step=2", "rollout.group_size=4", "run.steps=2", "run.save_every=0",
                             "run.threads=1", "optim.lr=1e-3", "task.env.kind=two_llm_hint",
                             "task.env.turn_tokens=12", "task.env.base_tokens=100"])
    run = train(cfg, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["env/turns"] == 1 and r["env/observation_tokens"] > 0 for r in records)
    assert all(r["reward/format"] > 0 for r in records)  # the base writes <answer> tags after the policy's line
    before, after = load_file(str(SHIPPED / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def _base_env(base, base_tok, policy_tok, **kw):
    task = get_task("parity")
    return BaseModelEnvironment(FastEngine(base, base_tok), base_tok, policy_tok, task, **kw)


def test_a_base_with_another_tokenizer_is_retokenised_through_text(tiny_random):
    """The same characters under other ids: the base's text becomes the observation in the policy's ids."""
    base, base_tok = tiny_random
    policy_tok = build_char_tokenizer(CHARS[::-1])
    policy = build_tiny_model(policy_tok, seed=1)
    shared = _base_env(base, base_tok, policy_tok, variant="alternate", max_turns=2, base_tokens=4)
    assert not shared.same_vocab
    ep = run_episodes(FastEngine(policy, policy_tok), policy_tok, shared.make_env, ParityTask().problems(n=2),
                      ["n=1:", "n=2:"], group_size=2, limits=EpisodeLimits(2, 3, 40), seed=0)
    ro = ep.rollout
    assert ro.observation_mask is not None
    checked = 0
    for b in range(len(ro)):
        obs_ids = ro.response_ids[b][ro.observation_mask[b].bool()].tolist()
        base_text = ep.infos[b].get("base_text")
        if base_text is not None:
            assert obs_ids and policy_tok.decode(obs_ids, clean_up_tokenization_spaces=False) == base_text
            checked += 1
    # every episode (2 problems x 2) had the base's turns (seed 0: none ended on the policy's turn), each checked
    assert checked == len(ro) == 4


def test_a_base_whose_text_the_policy_cannot_write_is_refused(tiny_random):
    base, base_tok = tiny_random
    policy_tok = build_char_tokenizer("\n" + "".join(chr(c) for c in range(48, 58)) + "n=:")  # digits and 'n=:'
    policy = build_tiny_model(policy_tok, seed=1)
    shared = _base_env(base, base_tok, policy_tok, variant="hint", base_tokens=6)
    with pytest.raises(TokenMDPError, match="does not round-trip.*task.env.base_path"):
        run_episodes(FastEngine(policy, policy_tok), policy_tok, shared.make_env, ParityTask().problems(n=2),
                     ["n=1:", "n=2:"], group_size=2, limits=EpisodeLimits(1, 3, 20), seed=0)
    assert retokenize("12", policy_tok, what="x") == policy_tok("12", add_special_tokens=False)["input_ids"]


def test_turn_rewards_become_the_token_rewards(tmp_path, tiny_random_dir):
    """Per-turn rewards away from the last policy token are the token rewards of the credit (the return kept)."""
    from tokenmdp.train.algorithms import make_algorithm, turn_rewards_matter
    from tokenmdp.train.batch import Batch
    from tokenmdp.train.config import resolve_algo

    cfg = _cfg(tmp_path, tiny_random_dir, "reinforce", *ALTERNATE)
    unit = make_algorithm(resolve_algo(cfg), cfg, max_new_tokens=8)
    mask = torch.tensor([[1, 1, 0, 1, 0]])
    ro = type("R", (), {"response_mask": mask})()
    late = Batch(ro, [], [], torch.tensor([1.0]), torch.tensor([True]), torch.tensor([True]), 1, {},
                 token_rewards=torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]]))
    early = Batch(ro, [], [], torch.tensor([1.5]), torch.tensor([True]), torch.tensor([True]), 1, {},
                  token_rewards=torch.tensor([[0.0, 0.5, 0.0, 1.0, 0.0]]))
    assert not turn_rewards_matter(late) and turn_rewards_matter(early)
    assert unit.token_rewards(late) is None  # the spec's own credit assignment, as in a single turn
    assert unit.token_rewards(early).tolist() == [[0.0, 0.5, 0.0, 1.0, 0.0]]


@pytest.mark.parametrize("extra, field", [
    (["rollout.engine=vllm"], "task.env.kind"),
    (["rollout.max_staleness=1"], "task.env.kind"),
    (["task.env.turn_tokens=0"], "task.env.turn_tokens"),
    (["task.env.kind=three_llm"], "task.env.kind"),
    (["algo.overrides.credit=process"], "task.env.kind"),
])
def test_env_config_errors_name_the_field(tmp_path, tiny_random_dir, extra, field):
    with pytest.raises(TokenMDPError, match=field.replace(".", r"\.")):
        _cfg(tmp_path, tiny_random_dir, "grpo", "task.env.kind=two_llm_hint", *extra)


def test_a_missing_base_model_is_one_clear_error(tmp_path, tiny_random_dir):
    from tokenmdp.train.setup import build_run

    cfg = _cfg(tmp_path, tiny_random_dir, "grpo", "task.env.kind=two_llm_hint",
               f"task.env.base_path={tmp_path / 'nowhere'}")
    with pytest.raises(TokenMDPError, match="task.env.base_path"):
        build_run(cfg, tmp_path / "x")


def test_process_final_residual_keeps_the_return_and_add_adds_the_steps(tmp_path, tiny_random_dir):
    """credit "process": the residual final reward keeps each row's return R (so a sequence-return estimator is
    uniform credit's exactly), "add" makes it R + the step rewards; hand-checked on one row."""
    from types import SimpleNamespace

    from tokenmdp.train.algorithms import make_algorithm
    from tokenmdp.train.config import resolve_algo

    for final, want in (("residual", [0.0, 0.1, 0.0, 0.9]), ("add", [0.0, 0.1, 0.0, 1.0])):
        cfg = _cfg(tmp_path, tiny_random_dir, "grpo_nokl", "algo.overrides.credit=process",
                   f"algo.overrides.process_final={final}")
        spec = resolve_algo(cfg)
        assert spec.process_final == final
        step_reward = cfg.task.step_reward
        unit = make_algorithm(spec, cfg, max_new_tokens=8,
                              process_rewards=lambda b, w=step_reward: torch.tensor([[0.0, w, 0.0, 0.0]]))
        ro = SimpleNamespace(response_mask=torch.tensor([[1, 1, 1, 1]]))
        batch = SimpleNamespace(rollout=ro, rewards=torch.tensor([1.0]), token_rewards=None)
        got = unit.token_rewards(batch)
        assert got.tolist()[0] == pytest.approx(want)
    with pytest.raises(TokenMDPError, match="process_final"):
        resolve_algo(_cfg(tmp_path, tiny_random_dir, "grpo_nokl", "algo.overrides.process_final=both"))


def test_residual_process_credit_leaves_grpo_as_uniform_credit():
    """Summed step rewards with the residual final reward keep each return R_i, so GRPO's advantages (a weight per
    response) are those of plain credit up to float rounding; added, they are not."""
    from tokenmdp.algos.core import compute_advantages
    from tokenmdp.algos.presets import get_algo
    from tokenmdp.mdp.credit import process

    spec = get_algo("grpo_nokl")
    rewards = torch.tensor([1.0, 0.0, 0.1, 1.0])
    mask = torch.ones(4, 6, dtype=torch.long)
    steps = torch.zeros(4, 6)
    steps[:, 1], steps[1, 3], steps[2, 2] = 0.1, -0.1, 0.1
    plain, _, _ = compute_advantages(spec, rewards, mask, group_size=4)
    residual, _, _ = compute_advantages(spec, rewards, mask, group_size=4,
                                        token_rewards=process(rewards, mask, step_rewards=steps))
    added, _, _ = compute_advantages(spec, rewards, mask, group_size=4,
                                     token_rewards=process(rewards, mask, step_rewards=steps, final="add"))
    torch.testing.assert_close(residual, plain, rtol=0, atol=1e-6)
    assert (added - plain).abs().max() > 0.05


def test_alternate_hands_an_answering_policy_turn_to_the_base(tiny_random):
    """Alternating lines: a policy turn that starts the answer is cut there; the base writes the rest from the text
    before it, the episode ends, and the verifier scores the base's text (the policy's answer is never scored)."""
    from tokenmdp.rollout.two_llm import answer_cut

    assert answer_cut("8*7=56\n</think><answer>(3+5)*7") == 7 and answer_cut("3+5=8\n") is None
    assert answer_cut("<answer>1</answer>") == 0
    base, tok = tiny_random
    shared = _base_env(base, tok, tok, variant="alternate", max_turns=3, base_tokens=5)
    problem = ParityTask().problems(n=1)[0]
    env = shared.make_env()
    env.reset(problem, tok("n=1:", add_special_tokens=False)["input_ids"])
    start = env.text
    step = env.step(tok("1\n", add_special_tokens=False)["input_ids"])  # a plain line: the base answers one line
    assert env.text.startswith(start + "1\n") and env.turn == 1
    if step.terminated:  # the random base may end the episode itself (EOS) on its first line
        return
    before, base_before = env.text, env.base_text
    step = env.step(tok("7</think><answer>1</answer>", add_special_tokens=False)["input_ids"])
    assert step.terminated and "score" in step.info  # handed over: the base's final turn, scored
    written = tok.decode(list(step.observation), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert env.text == before + "7" + written  # the base continued from "7", without the policy's answer
    assert step.info["base_text"] == base_before + written
