"""The algorithm registry: presets as visible choices, overrides, validation, compute_advantages."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tokenmdp.algos.core import compute_advantages, gae, grpo_advantages, rloo_advantages
from tokenmdp.algos.presets import PRESETS, AlgoSpec, describe, get_algo
from tokenmdp.errors import TokenMDPError

NAMES = ["reinforce", "rloo", "grpo", "dr_grpo", "dapo", "bnpo", "ppo", "dpo", "isft+", "isft-", "isft+-"]


def test_every_required_preset_exists_and_is_documented():
    assert set(NAMES) <= set(PRESETS)
    text = describe()
    for name in PRESETS:
        assert name in text and PRESETS[name].description
        assert PRESETS[name].name == name


def test_preset_choices():
    g, dr, dapo, bnpo, ppo = (PRESETS[n] for n in ("grpo", "dr_grpo", "dapo", "bnpo", "ppo"))
    assert (g.advantage, g.std_scale, g.aggregation, g.kl_in, g.kl_estimator) == (
        "grpo", "group", "seq_mean_token_mean", "loss", "k3")
    assert g.kl_coef > 0 and g.needs_reference and not dr.needs_reference
    assert (dr.std_scale, dr.aggregation, dr.kl_coef) == ("none", "seq_sum_const", 0.0)
    assert (dapo.aggregation, dapo.clip_low, dapo.clip_high, dapo.filter_groups) == ("token_mean", 0.2, 0.28, True)
    # bnpo differs from grpo in the aggregation only
    diff = {f.name for f in dataclasses.fields(AlgoSpec) if getattr(g, f.name) != getattr(bnpo, f.name)}
    assert diff == {"name", "description", "aggregation"}
    assert ppo.critic and ppo.advantage == "gae" and ppo.kl_in == "reward" and ppo.epochs > 1
    assert PRESETS["rloo"].advantage == "rloo" and PRESETS["reinforce"].baseline == "moving_average"
    assert PRESETS["dpo"].kind == "dpo" and PRESETS["dpo"].needs_reference
    assert [PRESETS[n].isft_mode for n in ("isft+", "isft-", "isft+-")] == ["+", "-", "+-"]
    adv = PRESETS["isft+-adv"]
    assert (adv.isft_weighting, adv.aggregation) == ("advantage", "seq_mean_token_mean")
    assert PRESETS["dr_grpo"].choices()["std_scale"] == "none" and "std" not in PRESETS["dr_grpo"].choices()
    assert "dpo_beta" not in g.choices() and "baseline" in PRESETS["reinforce"].choices()


def test_get_algo_overrides_and_string_values():
    spec = get_algo("grpo", kl_coef=0.0, aggregation="token_mean")
    assert spec.kl_coef == 0.0 and spec.aggregation == "token_mean" and spec.name == "grpo"
    assert PRESETS["grpo"].kl_coef == 0.04  # the preset itself is untouched
    spec = get_algo("ppo", epochs="4", clip_high="0.3", whiten_advantages="false", max_len="none")
    assert (spec.epochs, spec.clip_high, spec.whiten_advantages, spec.max_len) == (4, 0.3, False, None)
    assert get_algo(spec, lam=0.9).lam == 0.9
    spec = get_algo("grpo", epochs=2.0, kl_coef=0, clip_high=None, critic=True, advantage="gae")  # YAML-typed values
    assert (spec.epochs, spec.kl_coef, spec.clip_high, spec.critic) == (2, 0.0, None, True)
    assert isinstance(spec.epochs, int) and isinstance(spec.kl_coef, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize("call, message", [
    (lambda: get_algo("grpo2"), "unknown algorithm 'grpo2'"),
    (lambda: get_algo("grpo", klcoef=0.1), "unknown algo field 'klcoef'"),
    (lambda: get_algo("grpo", aggregation="mean"), "algo field 'aggregation' is 'mean'"),
    (lambda: get_algo("grpo", kl_estimator="k9"), "algo field 'kl_estimator'"),
    (lambda: get_algo("grpo", clip_low=-0.1), "algo field 'clip_low' must be >= 0"),
    (lambda: get_algo("grpo", lam=1.5), "algo field 'lam' must be in"),
    (lambda: get_algo("grpo", epochs=0), "algo field 'epochs' must be >= 1"),
    (lambda: get_algo("grpo", epochs="two"), "algo field 'epochs' must be an integer, got 'two'"),
    (lambda: get_algo("grpo", epochs=1.5), "algo field 'epochs' must be an integer, got 1.5"),
    (lambda: get_algo("grpo", kl_coef=True), "algo field 'kl_coef' must be a number, got True"),
    (lambda: get_algo("grpo", critic="maybe"), "algo field 'critic' must be true or false, got 'maybe'"),
    (lambda: get_algo("grpo", aggregation=3), "algo field 'aggregation' is 3; choose one of"),
    (lambda: get_algo("grpo", epochs=None), "algo field 'epochs' must be an integer, got None"),
    (lambda: get_algo("grpo", mu=2), "unknown algo field 'mu' \\(renamed to 'epochs'\\)"),
    (lambda: get_algo("grpo", advantage="gae"), "GAE needs a critic"),
    (lambda: get_algo("grpo", returns="to_go"), "'returns' is 'to_go' but 'std_scale'"),
    (lambda: get_algo("dpo", dpo_beta=0), "'dpo_beta' must be > 0"),
])
def test_bad_specs_name_the_field(call, message):
    with pytest.raises(TokenMDPError, match=message):
        call()


REWARDS = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1])
MASK = (torch.arange(5) < torch.tensor([5, 3, 1, 2, 4, 5, 2, 3]).unsqueeze(-1)).long()


def test_compute_advantages_sequence_estimators():
    adv, ret, _ = compute_advantages(PRESETS["grpo"], REWARDS, MASK, group_size=4)
    expected = grpo_advantages(REWARDS, group_size=4, std="unbiased").unsqueeze(-1) * MASK
    torch.testing.assert_close(adv, expected)
    assert ret is None
    adv, _, _ = compute_advantages(PRESETS["rloo"], REWARDS, MASK, group_size=4)
    torch.testing.assert_close(adv, rloo_advantages(REWARDS, group_size=4).unsqueeze(-1) * MASK)
    # REINFORCE threads its moving-average state: first call b = 0, then b = mean of the first batch
    spec = PRESETS["reinforce"]
    a1, _, s1 = compute_advantages(spec, REWARDS, MASK, group_size=4)
    a2, _, s2 = compute_advantages(spec, REWARDS, MASK, group_size=4, baseline_state=s1)
    torch.testing.assert_close(a1, REWARDS.unsqueeze(-1) * MASK)
    torch.testing.assert_close(a2, (REWARDS - 0.375).unsqueeze(-1) * MASK)
    assert float(s1) == pytest.approx(0.375) and float(s2) == pytest.approx(0.375)


def test_compute_advantages_to_go_and_credit():
    """RLOO with uniform credit and return-to-go: A_t = G_t - b_i (hand values for one group of two)."""
    spec = get_algo("rloo", credit="uniform", returns="to_go")
    r, m = torch.tensor([1.0, 0.0]), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    adv, _, _ = compute_advantages(spec, r, m, group_size=2)
    # G_t of row 0: [1, .75, .5, .25]; baseline of row 0 = R_1 = 0; row 1: G = [0, 0], baseline 1
    torch.testing.assert_close(adv, torch.tensor([[1.0, 0.75, 0.5, 0.25], [-1.0, -1.0, 0, 0]]))
    with pytest.raises(TokenMDPError, match="credit 'process' needs token_rewards"):
        compute_advantages(get_algo("rloo", credit="process"), r, m, group_size=2)


def test_compute_advantages_gae_whitened_and_overlong():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(8, 5, generator=gen)
    adv, ret, _ = compute_advantages(PRESETS["ppo"], REWARDS, MASK, group_size=4, values=values)
    raw, raw_ret = gae(REWARDS.unsqueeze(-1) * (torch.arange(5) == MASK.sum(-1, keepdim=True) - 1), values, MASK,
                       gamma=1.0, lam=0.95)
    torch.testing.assert_close(ret, raw_ret)
    valid = MASK.bool()
    assert abs(float(adv[valid].mean())) < 1e-5 and float(adv[valid].std(correction=0)) == pytest.approx(1, abs=1e-4)
    torch.testing.assert_close(adv[valid], (raw[valid] - raw[valid].mean()) / raw[valid].std(correction=0),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(TokenMDPError, match="needs values"):
        compute_advantages(PRESETS["ppo"], REWARDS, MASK, group_size=4)
    # DAPO's overlong penalty: budget 5, buffer 2 -> lengths 4 and 5 are penalised by 0.5 and 1
    spec = get_algo("dapo", overlong_buffer=2)
    adv, _, _ = compute_advantages(spec, REWARDS, MASK, group_size=4, max_len=5)
    shaped = REWARDS + torch.tensor([-1.0, 0, 0, 0, -0.5, -1, 0, 0])
    torch.testing.assert_close(adv, grpo_advantages(shaped, group_size=4).unsqueeze(-1) * MASK)
    with pytest.raises(TokenMDPError, match="no max_len"):
        compute_advantages(spec, REWARDS, MASK, group_size=4)
