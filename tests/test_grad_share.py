"""The sampler's share of the gradient (``rollout.async_grad_share``): the split by hand; a run with a share takes
the same steps as one without (its gradient norms, losses and parameters equal within float rounding, the sampler
computing part of each step); two runs are bitwise equal and a resumed one ends where the straight one does; what
the share cannot be combined with is one error naming the field."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tokenmdp.errors import TokenMDPError
from tokenmdp.train.config import load_config
from tokenmdp.train.grad_share import split_rows
from tokenmdp.train.trainer import train

from test_trainer import ParityTask, _cfg, crash_at  # noqa: F401  (registers the parity task)

SHARED = ("rollout.max_staleness=1", "run.steps=4", "rollout.prompts_per_step=4", "optim.shared_prompt=true")


def _params(folder):
    return load_file(str(folder / "model.safetensors"))


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_split_takes_whole_groups_from_the_end_nearest_the_share():
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    tokens = torch.tensor([10, 10, 5, 5, 20, 20, 4, 6])  # group sizes 20, 10, 40, 10 (80 in all)
    rows = torch.arange(8)
    mine, theirs = split_rows(rows, groups, tokens, 0.25)  # 20 wanted: group 3 (10), then group 2 (40) overshoots
    assert theirs.tolist() == [6, 7] and mine.tolist() == [0, 1, 2, 3, 4, 5]
    mine, theirs = split_rows(rows, groups, tokens, 0.6)  # 48 wanted: groups 3 and 2 (50), group 1 would make 60
    assert theirs.tolist() == [4, 5, 6, 7]
    assert split_rows(rows, groups, tokens, 0.7)[1].tolist() == [2, 3, 4, 5, 6, 7]  # 56: 60 is nearer than 50
    mine, theirs = split_rows(rows, groups, tokens, 0.9)  # 72: groups 3, 2, 1 (60); group 0 is always the learner's
    assert theirs.tolist() == [2, 3, 4, 5, 6, 7] and mine.tolist() == [0, 1]
    assert split_rows(rows, groups, tokens, 0.05)[1].tolist() == []  # 4 wanted: group 3's 10 is nearer 0
    assert split_rows(rows[2:], groups, tokens, 0.2)[1].tolist() == [6, 7]  # within the rows given: 60 in all
    picked = torch.tensor([7, 6, 1, 0])  # rows in another order: the groups in that order
    assert split_rows(picked, groups, tokens, 0.5)[1].tolist() == [1, 0]


def test_a_share_takes_the_same_steps_as_the_learner_alone(tmp_path, tiny_random_dir):
    base = train(_cfg(tmp_path, tiny_random_dir, "grpo", *SHARED, name="alone"), progress=False)
    shared = train(_cfg(tmp_path, tiny_random_dir, "grpo", *SHARED, "rollout.async_grad_share=0.5", name="share"),
                   progress=False)
    a, b = _records(base), _records(shared)
    assert [r["reward/mean"] for r in a] == [r["reward/mean"] for r in b]  # the same samples at every step
    assert all(r["update/sampler_rows"] >= 4 for r in b)  # whole groups of 4, a part of every step
    assert all(r["update/sampler_rows"] < r["update/rows"] for r in b)
    for x, y in zip(a, b):
        assert y["policy/grad_norm"] == pytest.approx(x["policy/grad_norm"], rel=1e-5)
        assert y["policy/loss"] == pytest.approx(x["policy/loss"], rel=1e-5, abs=1e-7)
        assert y["async/is_ratio_mean"] == pytest.approx(x["async/is_ratio_mean"], rel=1e-6)
    pa, pb = _params(base / "final"), _params(shared / "final")
    moved = max(float((pa[k] - load_file(str(tiny_random_dir / "model.safetensors"))[k]).abs().max()) for k in pa)
    assert moved > 1e-3
    assert max(float((pa[k] - pb[k]).abs().max()) for k in pa) < 1e-5


def test_a_share_under_lora_adds_the_adapters_gradients(tmp_path, tiny_random_dir):
    """Under LoRA the sampler's model copy trains the same adapter: its part of the adapters' gradient lands on the
    learner's adapter parameters by name (a larger learning rate, so that a wrong part would show in step 4)."""
    lora = ("model.lora.enabled=true", "model.lora.rank=4", "model.lora.alpha=8", "optim.lr=1e-2")
    base = train(_cfg(tmp_path, tiny_random_dir, "grpo", *SHARED, *lora, name="alone"), progress=False)
    shared = train(_cfg(tmp_path, tiny_random_dir, "grpo", *SHARED, *lora, "rollout.async_grad_share=0.5",
                        name="share"), progress=False)
    a, b = _records(base), _records(shared)
    assert all(r["update/sampler_rows"] >= 4 for r in b)
    assert [r["reward/mean"] for r in a] == [r["reward/mean"] for r in b]
    for x, y in zip(a, b):
        assert y["policy/grad_norm"] == pytest.approx(x["policy/grad_norm"], rel=1e-5)
    assert a[-1]["policy/grad_norm"] != pytest.approx(a[0]["policy/grad_norm"], rel=1e-3)  # the adapter moved


def test_a_share_is_deterministic_and_resumes_exactly(tmp_path, tiny_random_dir):
    """A run that crashes during step 3 and resumes from step 2 ends bit for bit where a straight run does (so two
    runs are bitwise equal too: the split and the sum have a fixed order)."""
    extra = (*SHARED, "rollout.async_grad_share=0.3")
    straight = train(_cfg(tmp_path, tiny_random_dir, "grpo", *extra, name="a"), progress=False)
    pa = _params(straight / "final")

    cfg = _cfg(tmp_path, tiny_random_dir, "grpo", *extra, "run.save_every=2", name="resumed")
    crash_at(cfg, 3)
    train(cfg, resume=True, progress=False)
    assert all(torch.equal(pa[k], v) for k, v in _params(cfg.run_dir() / "final").items())
    keys = ("reward/mean", "policy/grad_norm", "update/sampler_rows")
    assert [[r[k] for k in keys] for r in _records(cfg.run_dir())] == [[r[k] for k in keys] for r in
                                                                          _records(straight)]


@pytest.mark.parametrize("extra, clash", [
    (["rollout.async_grad_share=1.0"], r"must be in \[0, 1\), got 1.0"),
    (["rollout.async_grad_share=-0.1"], r"must be in \[0, 1\), got -0.1"),
    (["rollout.async_grad_share=0.3"], "rollout.max_staleness 0"),
    (["rollout.async_grad_share=0.3", "rollout.max_staleness=1", "rollout.async_worker=thread"],
     "rollout.async_worker 'thread'"),
    (["rollout.async_grad_share=0.3", "rollout.max_staleness=1", "algo.name=ppo"], "algo 'ppo'"),
    (["rollout.async_grad_share=0.3", "rollout.max_staleness=1", "algo.name=isft+"], "algo 'isft\\+'"),
    (["rollout.async_grad_share=0.3", "rollout.max_staleness=1", "algo.overrides.epochs=2"],
     "more than one optimizer step"),
    (["rollout.async_grad_share=0.3", "rollout.max_staleness=1", "optim.minibatch_size=4"],
     "more than one optimizer step"),
    (["rollout.async_grad_share=0.3", "rollout.max_staleness=1", "model.lora.enabled=true",
      "model.lora.dropout=0.1"], "model.lora.dropout"),
    (["rollout.async_grad_share=0.3", "rollout.max_staleness=1", "run.mixed_precision=bf16"],
     "run.mixed_precision 'bf16'"),
])
def test_what_a_share_cannot_be_combined_with_names_the_field(extra, clash):
    with pytest.raises(TokenMDPError, match=rf"config field 'rollout.async_grad_share'.*{clash}"):
        load_config(None, extra)
