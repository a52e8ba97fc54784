"""The token MDP: transitions, terminated vs truncated, terminal reward, bad input."""

from __future__ import annotations

import pytest

from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.token import TokenMDP

EOS = 0


def reward_is_a_eos(prompt, response):
    return 1.0 if response == (1, EOS) else 0.0


def make(max_len=3, vocab=3, reward=reward_is_a_eos):
    return TokenMDP(reward, eos_id=EOS, max_len=max_len, vocab_size=vocab)


def test_reset_and_concatenation():
    mdp = make()
    s = mdp.reset([5, 6])
    assert s.prompt == (5, 6) and s.response == () and s.t == 0 and not s.done
    r = mdp.step(s, 2)
    assert r.state.response == (2,) and r.state.ids == (5, 6, 2) and r.next_state is r.state
    assert (r.reward, r.terminated, r.truncated) == (0.0, False, False)
    # the previous state is untouched (immutable states)
    assert s.response == ()


def test_terminated_on_eos_with_terminal_reward():
    mdp = make()
    r1 = mdp.step(mdp.reset([9]), 1)
    r2 = mdp.step(r1.state, EOS)
    assert (r1.reward, r1.terminated, r1.truncated) == (0.0, False, False)
    assert (r2.reward, r2.terminated, r2.truncated) == (1.0, True, False)
    assert r2.state.response == (1, EOS) and r2.state.done


def test_truncated_at_max_len_gets_reward_of_full_sequence():
    seen = []

    def reward(prompt, response):
        seen.append((prompt, response))
        return float(len(response)) + 0.5

    mdp = make(max_len=3, reward=reward)
    steps = mdp.run([4], [2, 1, 2])
    assert [(s.reward, s.terminated, s.truncated) for s in steps] == [
        (0.0, False, False), (0.0, False, False), (3.5, False, True)]
    assert seen == [((4,), (2, 1, 2))]  # called once, at the end, with the full sequence


def test_eos_at_last_position_is_terminated_not_truncated():
    mdp = make(max_len=2)
    steps = mdp.run([], [1, EOS])
    assert (steps[-1].terminated, steps[-1].truncated, steps[-1].reward) == (True, False, 1.0)


def test_immediate_eos_and_run_stops_at_end():
    mdp = make(max_len=3)
    steps = mdp.run([], [EOS, 1, 1])
    assert len(steps) == 1 and steps[0].terminated and steps[0].reward == 0.0


def test_is_complete():
    mdp = make(max_len=2)
    assert mdp.is_complete((EOS,)) and mdp.is_complete((1, 2)) and mdp.is_complete((2, EOS))
    assert not mdp.is_complete((1,)) and not mdp.is_complete((EOS, 1)) and not mdp.is_complete(())


def test_step_after_end_and_bad_action_raise():
    mdp = make()
    done = mdp.step(mdp.reset(), EOS).state
    with pytest.raises(TokenMDPError, match="already ended"):
        mdp.step(done, 1)
    with pytest.raises(TokenMDPError, match="action 3 is outside"):
        mdp.step(mdp.reset(), 3)
    assert list(mdp.actions(done)) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(eos_id=5, max_len=2, vocab_size=3), "eos_id 5"),
        (dict(eos_id=0, max_len=0, vocab_size=3), "max_len"),
        (dict(eos_id=0, max_len=2, vocab_size=1), "vocab_size"),
    ],
)
def test_bad_construction(kwargs, message):
    with pytest.raises(TokenMDPError, match=message):
        TokenMDP(reward_is_a_eos, **kwargs)
    with pytest.raises(TokenMDPError, match="reward_fn"):
        TokenMDP(None, eos_id=0, max_len=2, vocab_size=3)
