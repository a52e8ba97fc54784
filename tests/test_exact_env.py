"""The exact tier's two-LLM case: a frozen stochastic base writes tokens between the policy's, masked out of every
loss (tokenmdp.mdp.enumerate_env, tokenmdp.experiments.exact.env)."""

from __future__ import annotations

import json

import pytest
import torch

from tokenmdp.errors import TokenMDPError
from tokenmdp.experiments.exact import GroupBatch, enumerate_groups, expected_update, make_point, variants
from tokenmdp.experiments.exact.env import run_exact_env, transcript_update
from tokenmdp.experiments.exact.updates import row_coefficients
from tokenmdp.mdp.enumerate import (
    exact_gradient,
    expected_return,
    init_logits,
    probabilities,
    sample_sequences,
    sample_tokens,
    score_function,
)
from tokenmdp.mdp.enumerate_env import TwoLLMTokenMDP, enumerate_env_sequences, policy_rows

HAND_BASE = {(0,): (0.5, 0.5), (1,): (0.75, 0.25), (2,): (0.25, 0.75)}


def hand_table():
    """hint, V = 3, one policy token: EOS, a or b (the hint), then base(a | hint) = 1/2, 3/4, 1/4."""
    return enumerate_env_sequences(TwoLLMTokenMDP(vocab_size=3, max_len=1, variant="hint", base_table=HAND_BASE))


@pytest.fixture(scope="module")
def default():
    return run_exact_env(steps=3)


def test_hand_computed_tiny_case():
    """theta = 0: six episodes of probability 1/3 * base(e | hint); J = (1/2 + 3/4 + 1/4) / 3 = 1/2;
    dJ/dtheta[()] = pi_k (E[R | k] - J) = (0, 1/12, -1/12); the base's rows get nothing."""
    table = hand_table()
    assert table.sequences == ((0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2))
    assert table.prefixes == ((), (0,), (1,), (2,))
    assert table.rewards.tolist() == [1, 0, 1, 0, 1, 0]
    assert table.mask[:, 0].all() and not table.mask[:, 1].any() and table.observation_mask[:, 1].all()
    assert table.lengths.tolist() == [1] * 6 and table.terminated.tolist() == [True, True] + [False] * 4
    theta = torch.zeros(table.shape, dtype=torch.float64)
    torch.testing.assert_close(probabilities(theta, table),
                               torch.tensor([1 / 6, 1 / 6, 1 / 4, 1 / 12, 1 / 12, 1 / 4], dtype=torch.float64))
    j, grad = exact_gradient(theta, table)
    assert j == pytest.approx(0.5, abs=1e-15)
    torch.testing.assert_close(grad[0], torch.tensor([0.0, 1 / 12, -1 / 12], dtype=torch.float64))
    assert grad[1:].abs().max() == 0
    # one policy token: every length normaliser is 1, so each preset is an exact multiple of grad J
    groups = enumerate_groups(table, 2)
    point = make_point(theta, groups)
    batch = GroupBatch(groups, point)
    cat = variants()
    u, _ = expected_update(cat["isft+_seqsum_const"], batch, point)
    torch.testing.assert_close(u, grad.reshape(-1))  # E[R grad log pi] / L with L = 1
    u, _ = expected_update(cat["dr_grpo"], batch, point)
    torch.testing.assert_close(u, grad.reshape(-1) / 2)  # (G - 1) / (G L)


def test_probabilities_sum_to_one_and_match_sampling():
    for variant in ("alternate", "hint"):
        for max_len, env_after in ((2, (1,)), (3, (1, 3))):
            table = enumerate_env_sequences(TwoLLMTokenMDP(max_len=max_len, variant=variant, env_after=env_after))
            theta = init_logits(table, seed=4, requires_grad=False)
            assert float(probabilities(theta, table).sum()) == pytest.approx(1.0, abs=1e-12)
            groups = enumerate_groups(table, 2)
            assert float(groups.probabilities(theta).sum()) == pytest.approx(1.0, abs=1e-12)
            assert (table.mask & table.observation_mask).sum() == 0
            assert int(table.lengths.max()) <= max_len
    table = enumerate_env_sequences(TwoLLMTokenMDP())
    theta = init_logits(table, seed=2, requires_grad=False)
    idx = sample_sequences(theta, table, 40_000, seed=0)
    freq = torch.bincount(idx, minlength=table.num_sequences).double() / 40_000
    assert (freq - probabilities(theta, table)).abs().max() < 0.01
    with pytest.raises(TokenMDPError, match="environment tokens"):
        sample_tokens(theta, table, 1, seed=0)


def test_the_base_rows_get_no_gradient():
    """The base's positions are masked: autograd, the closed-form score and finite differences give 0 on their
    rows; a loss over the whole transcript (the mask dropped) would not."""
    table = enumerate_env_sequences(TwoLLMTokenMDP(variant="alternate"))
    env = ~policy_rows(table)
    assert int(env.sum()) == 2  # the contexts (a) and (b), before the base's token
    theta = init_logits(table, seed=1, requires_grad=False)
    _, grad = exact_gradient(theta, table)
    assert grad[env].abs().max() == 0 and grad[~env].abs().max() > 1e-3
    assert score_function(theta, table)[:, env].abs().max() == 0
    bump = torch.zeros_like(theta)
    bump[env] = 0.3
    j0 = float(expected_return(theta, table))
    assert float(expected_return(theta + bump, table)) == j0
    bump = torch.zeros_like(theta)
    bump[~env, 1] = 0.3  # the same bump on the policy's rows does move J
    assert abs(float(expected_return(theta + bump, table)) - j0) > 1e-3
    transcript = transcript_update(table, theta).view(table.shape)
    assert transcript[env].abs().max() > 1e-3  # the negative control: unmasked, the base's rows move


def test_isft_adv_equals_grpo_group_by_group_exactly():
    """The identity is algebraic in the per-response weights A_i / |o_i|: with float64 advantages the two losses'
    coefficients on every row of every group are bit-identical, the stochastic transition notwithstanding."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for variant in ("alternate", "hint"):
            table = enumerate_env_sequences(TwoLLMTokenMDP(variant=variant))
            groups = enumerate_groups(table, 3)
            point = make_point(init_logits(table, seed=0, requires_grad=False), groups)
            batch = GroupBatch(groups, point)
            a, b = (row_coefficients(variants()[n], batch, point) for n in ("isft+-adv", "grpo_nokl"))
            assert b.abs().max() > 0.01
            assert torch.equal(a, b), variant
    finally:
        torch.set_default_dtype(prev)


def test_default_findings(default):
    """The numbers of the module docstring (V = 3, budget 2, G = 4, seed 0, base seed 1)."""
    cases = {**default["variants"], "degenerate": default["degenerate"]}
    assert set(cases) == {"alternate", "hint", "degenerate"}
    for name, doc in cases.items():
        ids, p = doc["identities"], doc["presets"]
        assert ids["isft+-adv_vs_grpo_nokl_rel_diff"] < 1e-7, name
        for preset in ("isft+_seqsum_const", "isft-_seqsum_const", "reinforce", "rloo"):
            assert p[preset]["cosine"] == pytest.approx(1.0, abs=1e-9), (name, preset)
            assert p[preset]["scale"] == pytest.approx(1 / 2, rel=1e-9), (name, preset)  # grad J / L
        assert p["dr_grpo"]["scale"] == pytest.approx(3 / 8, rel=1e-9)  # (G - 1) / (G L)
        j, g = doc["start"]["J"], doc["group_size"]
        assert p["isft+_seqsum_kept"]["scale"] == pytest.approx((1 - (1 - j) ** g) / (2 * j), rel=1e-9)
        assert p["grpo_nokl"]["cosine"] < 1 - 1e-4  # 1/|o|: the one-token episode EOS weighs double
    for doc in default["variants"].values():
        ids = doc["identities"]
        assert ids["isft+-adv_vs_grpo_nokl_group_rel_diff"] < 1e-7
        assert ids["env_rows_max_abs_update"] == 0 and ids["env_rows_max_abs_grad_J"] == 0
        assert ids["transcript_sft_cosine"] < 0.8 and ids["transcript_sft_env_share"] > 0.5
    alt, hint = default["variants"]["alternate"], default["variants"]["hint"]
    assert alt["mdp"]["correct_lengths"] == [2] and hint["mdp"]["correct_lengths"] == [1, 2]
    # ISFT+'s token mean keeps the direction when every correct episode has the same policy length, not otherwise
    assert alt["presets"]["isft+"]["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert hint["presets"]["isft+"]["cosine"] == pytest.approx(0.9735, abs=1e-4)
    assert alt["presets"]["grpo_nokl"]["cosine"] == pytest.approx(0.9932, abs=1e-4)
    assert default["comparison"]["isft+"]["degenerate"]["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert len(alt["dynamics"]["grpo_nokl"]) == 4
    json.dumps(default, allow_nan=False)


def test_bad_options_are_named():
    with pytest.raises(TokenMDPError, match="--env-after"):
        TwoLLMTokenMDP(max_len=2, env_after=(3,))
    with pytest.raises(TokenMDPError, match="--vocab must be >= 3"):
        TwoLLMTokenMDP(vocab_size=2)
    with pytest.raises(TokenMDPError, match="--env-variant"):
        TwoLLMTokenMDP(variant="chat")
    with pytest.raises(TokenMDPError, match="--env-variant"):
        run_exact_env(env_variants=["chat"])
    with pytest.raises(TokenMDPError, match="base_table"):
        enumerate_env_sequences(TwoLLMTokenMDP(max_len=1, variant="hint", base_table={(0,): (1.0, 0.0)}))


def test_cli(tmp_path):
    from typer.testing import CliRunner

    from tokenmdp.cli import app, main

    res = CliRunner().invoke(app, ["exact", "--env", "two_llm", "--env-variant", "hint", "--steps", "1", "--presets",
                                   "rloo", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "two-LLM case" in res.output and "isft+-adv" in res.output
    doc = json.loads((tmp_path / "exact.json").read_text())
    assert list(doc) == ["two_llm"] and list(doc["two_llm"]["variants"]) == ["hint"]
    assert doc["two_llm"]["comparison"]["rloo"]["hint"]["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert (tmp_path / "plots" / "two_llm_hint_directions.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["exact", "--env", "two_llm", "--env-after", "5"]) == 2
    assert main(["exact", "--env", "chat"]) == 2
