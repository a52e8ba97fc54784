"""Multi-turn environments (tokenmdp.mdp.env, tokenmdp.rollout.multiturn): hand-computed episode layout and credit,
masks on a scripted environment, observation tokens in the context but never in a loss, the single-turn
environment reproducing the engine's rollout exactly, and the bad inputs (a token outside the vocabulary, an
episode that never ends)."""

from __future__ import annotations

import pytest
import torch

from tokenmdp.algos.core import gae, policy_loss, returns_to_go
from tokenmdp.algos.dpo import sequence_logps
from tokenmdp.algos.isft import isft_loss
from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.env import (
    EnvStep,
    EpisodeLimits,
    SingleTurnEnv,
    TokenEnv,
    assemble_episode,
    check_observation,
    turn_token_rewards,
)
from tokenmdp.policy.logprobs import sequence_logprobs
from tokenmdp.rollout.types import Rollout, concat_rollouts
from tokenmdp.rollout.fast import FastEngine
from tokenmdp.rollout.hf import HFEngine
from tokenmdp.rollout.multiturn import run_episodes

PROMPTS = ["n=12:", "n=345:"]


class ScriptedEnv(TokenEnv):
    """Answers every policy turn with the tokens ``obs``, reward ``0.5`` a turn; ends after ``turns`` turns (never,
    with ``turns=None``). The policy's turns stop at ``stop`` (besides EOS)."""

    def __init__(self, obs, *, turns=2, stop=()):
        self.obs, self.turns, self.stop_ids, self.seen = list(obs), turns, tuple(stop), []

    def step(self, action):
        self.seen.append(list(action))
        last = self.turns is not None and len(self.seen) >= self.turns
        return EnvStep(tuple(self.obs), 0.5, last, False, {"seen": len(self.seen)})

    def on_eos(self, action):
        return EnvStep((), 0.25, True, False, {})


@pytest.fixture(scope="module")
def engine(tiny_random):
    model, tok = tiny_random
    return FastEngine(model, tok)


# ---------------------------------------------------------------------------------------------- hand-computed math
def test_assemble_episode_hand_example():
    ids, act, obs, lps, ends = assemble_episode([("action", [5, 6], [-1, -2]), ("observation", [7], ()),
                                                 ("action", [8], [-3])])
    assert ids == [5, 6, 7, 8] and act == [1, 1, 0, 1] and obs == [0, 0, 1, 0]
    assert lps == [-1.0, -2.0, 0.0, -3.0] and ends == [1, 3]
    with pytest.raises(TokenMDPError, match="log-probs"):
        assemble_episode([("action", [5, 6], [-1])])


def test_turn_token_rewards_hand_example():
    out = turn_token_rewards([[0.5, 1.0], [2.0]], [[1, 3], []], 5)
    assert out.tolist() == [[0, 0.5, 0, 1, 0], [0, 0, 0, 0, 0]]
    # the environment's answer to the last turn goes to the last policy token
    assert turn_token_rewards([[0.5, 1.0]], [[2]], 3).tolist() == [[0, 0, 1.5]]


def test_gae_and_returns_skip_observation_holes():
    """An observation between two policy tokens is skipped, not an episode end: the numbers on the valid columns
    are those of the same tokens without the hole (the docstrings' hand examples)."""
    r, v = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]])
    rh, vh = torch.tensor([[0.0, 0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 9.0, 0.7]])
    mh = torch.tensor([[1, 1, 0, 1]])
    for lam, expect in ((0.0, [0.1, 0.1, 0.3]), (1.0, [0.5, 0.4, 0.3])):
        a, ret = gae(r, v, torch.ones(1, 3), lam=lam)
        ah, reth = gae(rh, vh, mh, lam=lam)
        torch.testing.assert_close(a[0], torch.tensor(expect))
        torch.testing.assert_close(ah[0, [0, 1, 3]], a[0])
        assert float(ah[0, 2]) == 0.0 and float(reth[0, 2]) == 0.0
        torch.testing.assert_close(reth[0, [0, 1, 3]], ret[0])
    out = returns_to_go(torch.tensor([[0.0, 1.0, 0.0, 2.0]]), mh, gamma=0.5)
    assert out.tolist() == [[1.0, 2.0, 0.0, 2.0]]


def test_check_observation_names_the_bad_token():
    assert check_observation([1, 2], 5, turn=1, row=0) == (1, 2)
    with pytest.raises(TokenMDPError,
                       match=r"episode 3, turn 2: token 1 is 9, outside the policy's vocabulary \[0, 5\)"):
        check_observation([1, 9], 5, turn=2, row=3)
    with pytest.raises(TokenMDPError, match="not a token id"):
        check_observation([1, "a"], 5, turn=1, row=0)
    with pytest.raises(TokenMDPError, match="max_turns"):
        EpisodeLimits(max_turns=0)


# ---------------------------------------------------------------------------------------------- the driver
def _run(engine, tok, make_env, *, limits, group_size=2, seed=3):
    return run_episodes(engine, tok, make_env, [0, 1], PROMPTS, group_size=group_size, limits=limits, seed=seed)


@pytest.mark.parametrize("engine_cls", [FastEngine, HFEngine])
def test_scripted_env_masks_by_hand(tiny_random, engine_cls):
    """Turns of the policy (stopped at a stop token or 3 tokens) and the environment's 2 tokens alternate; the
    masks, log-probs, rewards and flags follow the layout exactly, row by row."""
    model, tok = tiny_random
    eng = engine_cls(model, tok)
    obs = tok("ab", add_special_tokens=False)["input_ids"]
    stop = tok(" ", add_special_tokens=False)["input_ids"]
    envs = []

    def make():
        envs.append(ScriptedEnv(obs, turns=2, stop=stop))
        return envs[-1]

    ep = _run(eng, tok, make, limits=EpisodeLimits(max_turns=5, turn_tokens=3, max_tokens=40))
    ro = ep.rollout
    assert ro.observation_mask is not None and len(ro) == 4
    checked = 0
    for b, env in enumerate(envs):
        turns = env.seen
        segs = []
        for a in turns:
            segs += [("action", a, [0.0] * len(a)), ("observation", obs, ())]
        ids, act, seen_obs, _, ends = assemble_episode(segs)
        if len(turns) < 2:  # the policy ended the episode with EOS in its first turn: no observation after it
            continue
        n = len(ids)
        assert ro.response_ids[b, :n].tolist() == ids
        assert ro.response_mask[b, :n].tolist() == act and int(ro.response_mask[b, n:].sum()) == 0
        assert ro.observation_mask[b, :n].tolist() == seen_obs
        assert bool((ro.logprobs[b][ro.observation_mask[b].bool()] == 0).all())
        assert bool((ro.logprobs[b][ro.response_mask[b].bool()] < 0).all())
        assert all(1 <= len(a) <= 3 for a in turns) and all(len(a) == 3 or a[-1] in stop for a in turns)
        assert float(ep.rewards[b]) == 1.0 and ep.token_rewards[b, ends].tolist() == [0.5, 0.5]
        assert float(ep.token_rewards[b].sum()) == 1.0
        assert bool(ro.terminated[b]) and not bool(ro.truncated[b]) and int(ep.turns[b]) == 2
        checked += 1
    assert checked >= 2
    # the recorded log-probs are the teacher-forced ones with the observations in the context
    lp, _ = sequence_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.response_ids, ro.response_mask,
                              context_mask=ro.context_mask)
    torch.testing.assert_close(lp, ro.logprobs, atol=1e-4, rtol=1e-4)
    # rows, trimming and concatenation keep the observation mask
    sub = ro.select([1, 3]).trimmed()
    assert torch.equal(sub.observation_mask, ro.observation_mask[[1, 3], : sub.response_ids.shape[1]])
    both = concat_rollouts([ro, ro.select([0])])
    assert torch.equal(both.observation_mask[:4], ro.observation_mask)


def test_single_turn_env_reproduces_the_engine_rollout(tiny_random, engine):
    """The token MDP as an environment through the driver gives the engine's own rollout, field for field."""
    _, tok = tiny_random
    expect = engine.generate(PROMPTS, n=3, max_new_tokens=8, temperature=1.0, seed=7)
    ep = run_episodes(engine, tok, lambda: SingleTurnEnv(lambda p, a: float(len(a))), [0, 1], PROMPTS, group_size=3,
                      limits=EpisodeLimits(1, 8, 8), seed=7)
    got = ep.rollout
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "logprobs", "terminated", "truncated"):
        assert torch.equal(getattr(got, name), getattr(expect, name)), name
    assert got.responses == expect.responses and got.prompts == expect.prompts and got.observation_mask is None
    assert ep.rewards.tolist() == expect.lengths.float().tolist()


def test_observation_tokens_get_no_gradient(tiny_random, engine):
    """Every loss of the family has zero gradient with respect to the log-prob of an observation token, and the
    log-probs there are constants (no path to the parameters); changing the observation after the last policy turn
    changes nothing, changing one in the middle changes the policy's log-probs (it is in the context)."""
    model, tok = tiny_random
    obs = tok("ab", add_special_tokens=False)["input_ids"]
    ep = _run(engine, tok, lambda: ScriptedEnv(obs, turns=2, stop=tok(" ", add_special_tokens=False)["input_ids"]),
              limits=EpisodeLimits(5, 3, 40))
    ro = ep.rollout
    obs_mask, mask = ro.observation_mask.bool(), ro.response_mask
    lp, _ = sequence_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.response_ids, mask,
                              context_mask=ro.context_mask)
    assert bool((lp[obs_mask] == 0).all())
    x = lp.detach().clone().requires_grad_(True)
    adv = torch.randn(mask.shape)
    losses = {
        "grpo": policy_loss(x, ro.logprobs, adv, mask, aggregation="seq_mean_token_mean")[0],
        "ppo": policy_loss(x, ro.logprobs, adv, mask, aggregation="token_mean", ref_logprobs=ro.logprobs - 0.1,
                           kl_coef=0.1, kl_estimator="k3")[0],
        "isft": isft_loss(x, mask, torch.tensor([True, False, True, False]), mode="+-")[0],
        "dpo": sequence_logps(x, mask).sum(),
    }
    for name, loss in losses.items():
        (g,) = torch.autograd.grad(loss, x)
        assert bool((g[obs_mask] == 0).all()), name
        assert float(g[mask.bool()].abs().sum()) > 0, name
    # the observation after the last turn conditions nothing that counts; one in the middle does
    last_obs = ro.observation_mask.clone()
    first_turn_end = [int(ro.observation_mask[b].nonzero()[0]) for b in range(len(ro))]
    changed = ro.response_ids.clone()
    for b in range(len(ro)):
        cols = last_obs[b].nonzero().flatten()
        tail = cols[cols > cols[-1] - len(obs)]
        changed[b, tail] = (changed[b, tail] + 7) % len(tok)
    lp2, _ = sequence_logprobs(model, ro.prompt_ids, ro.prompt_mask, changed, mask, context_mask=ro.context_mask)
    torch.testing.assert_close(lp2, lp, atol=1e-6, rtol=0)
    mid = ro.response_ids.clone()
    for b, col in enumerate(first_turn_end):
        mid[b, col] = (mid[b, col] + 7) % len(tok)
    lp3, _ = sequence_logprobs(model, ro.prompt_ids, ro.prompt_mask, mid, mask, context_mask=ro.context_mask)
    assert float((lp3 - lp).abs().max().detach()) > 1e-4
    # scoring without the context mask (observations dropped from the context) would give other log-probs
    lp4, _ = sequence_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.response_ids, mask)
    assert float((lp4 - lp).abs().max().detach()) > 1e-4


def test_rollout_refuses_overlapping_masks():
    one = torch.ones(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="overlap"):
        Rollout(one, one, one, one, torch.zeros(1, 2), torch.ones(1, dtype=torch.bool),
                torch.zeros(1, dtype=torch.bool), observation_mask=one)


# ---------------------------------------------------------------------------------------------- bad input
def test_observation_outside_the_vocabulary_is_one_clear_error(tiny_random, engine):
    _, tok = tiny_random
    with pytest.raises(TokenMDPError, match=rf"turn 1: token 1 is {len(tok) + 5}, outside the policy's vocabulary"):
        _run(engine, tok, lambda: ScriptedEnv([3, len(tok) + 5]), limits=EpisodeLimits(3, 3, 30))


def test_an_episode_that_never_ends_is_truncated_at_the_limits(tiny_random, engine):
    _, tok = tiny_random
    eos_free = [tok("a", add_special_tokens=False)["input_ids"][0]]
    ep = _run(engine, tok, lambda: ScriptedEnv(eos_free, turns=None), limits=EpisodeLimits(3, 2, 100))
    cut = [i for i in ep.infos if i.get("turns") == 3]
    assert cut and all(i["truncated_by"] == "max_turns" for i in cut)
    assert all(bool(ep.rollout.truncated[b]) for b, i in enumerate(ep.infos) if i.get("turns") == 3)
    assert not bool((ep.rollout.terminated & ep.rollout.truncated).any())
    # a token budget: policy and observation tokens together never pass max_tokens
    ep = _run(engine, tok, lambda: ScriptedEnv(eos_free * 4, turns=None), limits=EpisodeLimits(50, 3, 9))
    total = ep.rollout.context_mask.sum(1)
    assert int(total.max()) <= 9
    long = [b for b, i in enumerate(ep.infos) if i.get("truncated_by") == "max_tokens"]
    assert long and all(int(total[b]) == 9 for b in long)


def test_an_engine_without_token_sampling_refuses(tiny_random):
    from tokenmdp.rollout.types import Engine

    class TextOnly(Engine):
        name = "text-only"

        def generate(self, prompts, **kw):
            raise AssertionError

    _, tok = tiny_random
    with pytest.raises(TokenMDPError, match="'text-only' rollout engine cannot sample from token ids.*task.env.kind"):
        _run(TextOnly(), tok, lambda: ScriptedEnv([3]), limits=EpisodeLimits(2, 2, 10))
