"""Rollouts overlapped with updates (``rollout.max_staleness``): the truncated-IS weights by hand; ``k = 0`` is the
synchronous loop bit for bit; with ``k = 1`` the batch of step t is exactly what a synchronous sampler draws with the
weights of step t - 2 and that step's seed, two runs are bitwise equal, and a run split at a checkpoint and resumed
(or extended) ends where the straight run does; bad input gives one error naming the field."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tokenmdp.algos.core import policy_loss, truncated_is
from tokenmdp.errors import TokenMDPError
from tokenmdp.train.async_rollout import behaviour_step, staleness
from tokenmdp.train.config import load_config
from tokenmdp.train.trainer import train

from test_trainer import SMALL, ParityTask, _cfg, crash_at  # noqa: F401  (registers the parity task)

ASYNC = ("rollout.max_staleness=1", "run.steps=4", "algo.kl_coef=0.05")


def _params(folder):
    return load_file(str(folder / "model.safetensors"))


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_truncated_is_by_hand():
    old = torch.log(torch.tensor([[0.6, 0.3], [0.9, 0.5]]))
    behaviour = torch.log(torch.tensor([[0.2, 0.6], [0.3, 1e-30]]))  # padding garbage must not matter
    mask = torch.tensor([[1, 1], [1, 0]])
    w, m = truncated_is(old, behaviour, mask, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5], [2.0, 0.0]]))
    assert m["async/is_ratio_mean"] == pytest.approx(6.5 / 3, rel=1e-6)
    assert m["async/is_ratio_max"] == pytest.approx(3.0, rel=1e-6)
    assert m["async/tis_clip_frac"] == pytest.approx(2 / 3)
    w, m = truncated_is(old, old, mask, cap=2.0)  # no staleness: every weight is 1
    assert torch.equal(w, mask.float()) and m["async/tis_clip_frac"] == 0.0
    with pytest.raises(TokenMDPError, match="cap must be > 0"):
        truncated_is(old, behaviour, mask, cap=0.0)


def test_policy_loss_weighs_each_token_by_its_is_weight():
    """``l_t = -w_t min(rho A, clip(rho) A)``: at rho = 1, A = +1, w = 2 the loss is -2 and the gradient with
    respect to log pi is -2 (twice the on-policy REINFORCE gradient); a weight of 0 removes the token."""
    lp = torch.zeros(1, 2, requires_grad=True)
    loss, _ = policy_loss(lp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), aggregation="token_mean",
                          is_weights=torch.tensor([[2.0, 0.0]]))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(-1.0)  # (-2 + 0) / 2 tokens
    torch.testing.assert_close(lp.grad, torch.tensor([[-1.0, 0.0]]))


def test_the_staleness_schedule():
    assert [behaviour_step(t, 1) for t in range(1, 6)] == [0, 0, 1, 2, 3]
    assert [staleness(t, 1) for t in range(1, 6)] == [0, 1, 1, 1, 1]
    assert [behaviour_step(t, 2) for t in range(1, 6)] == [0, 0, 0, 1, 2]
    assert [staleness(t, 0) for t in range(1, 4)] == [0, 0, 0]


def test_zero_staleness_is_the_synchronous_loop(tmp_path, tiny_random_dir):
    """``max_staleness=0`` ends with the parameters of the synchronous loop spelled out by hand (collect, update,
    schedule, sync), bit for bit."""
    from tokenmdp.train.data import prompt_stream
    from tokenmdp.train.trainer import _schedule_step, build_step

    extra = ("run.steps=3", "algo.kl_coef=0.05", "optim.minibatch_size=4")
    run = train(_cfg(tmp_path, tiny_random_dir, "grpo", *extra, "rollout.max_staleness=0"), progress=False)
    assert "async/staleness" not in _records(run)[0]
    cfg = _cfg(tmp_path, tiny_random_dir, "grpo", *extra, name="by-hand")
    learner, algorithm, rollouts = build_step(cfg, tmp_path / "by-hand")
    stream = prompt_stream(rollouts.task, seed=0, steps=3, prompts_per_step=2)
    for step in (1, 2, 3):
        algorithm.update(learner, rollouts.collect(stream[step - 1], step=step), step=step)
        _schedule_step(learner.scheduler)
        rollouts.engine.sync_weights(learner.unwrapped())
    by_hand = {k: v.detach() for k, v in learner.unwrapped().state_dict().items() if k in _params(run / "final")}
    assert _equal(_params(run / "final"), by_hand)


@pytest.mark.parametrize("worker", ["process", "thread"])
def test_the_batch_of_step_t_is_sampled_with_the_weights_of_step_t_minus_2(tmp_path, tiny_random_dir, worker):
    from tokenmdp.policy.model import load_policy
    from tokenmdp.rollout.fast import FastEngine
    from tokenmdp.train.trainer import step_seed

    rollouts, weights = {}, {}

    class Capture:
        def on_batch(self, learner, batch, step):  # before the update of `step`: the weights of step - 1
            rollouts[step] = batch.rollout
            weights[step - 1] = {k: v.detach().clone() for k, v in learner.unwrapped().state_dict().items()}

    cfg = _cfg(tmp_path, tiny_random_dir, "grpo", *ASYNC, f"rollout.async_worker={worker}")
    run = train(cfg, progress=False, callbacks=[Capture()])
    records = _records(run)
    assert [r["async/staleness"] for r in records] == [0, 1, 1, 1]
    assert all(r["time/wait"] >= 0 and r["async/is_ratio_max"] >= r["async/is_ratio_mean"] > 0 for r in records)
    # the wait is a part of the step, beside the update; at step 1 nothing was sampled ahead, so the learner
    # waits for the sampler (started with the run) to finish the batch: a measured, positive time
    assert all(0 <= r["time/wait"] and r["time/wait"] + r["time/update"] <= r["time/step"] for r in records)
    assert records[0]["time/wait"] > 0
    assert records[0]["async/is_ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # step 1: sampled with its own weights
    policy = load_policy(str(tiny_random_dir))
    engine = FastEngine(policy.model, policy.tokenizer)
    for step, ro in rollouts.items():
        policy.model.load_state_dict(weights[max(0, step - 2)])
        direct = engine.generate(ro.prompts[::4], n=4, max_new_tokens=6, seed=step_seed(0, step))
        assert torch.equal(direct.response_ids, ro.response_ids), step
        assert torch.equal(direct.logprobs, ro.logprobs), step
    # step 1 is the synchronous run's; from step 2 on the sampler is one update behind
    sync = train(_cfg(tmp_path, tiny_random_dir, "grpo", *ASYNC[1:], name="sync"), progress=False)
    assert _records(sync)[0]["reward/mean"] == records[0]["reward/mean"]
    assert not _equal(_params(sync / "final"), _params(run / "final"))


def test_async_runs_are_deterministic_and_resume_exactly(tmp_path, tiny_random_dir):
    """Two straight runs are bitwise equal; a run that crashes during step 3 and resumes from the step-2
    checkpoint (which carries the batch of step 3, sampled ahead) ends with the same parameters and metrics; a
    finished 4-step run extended to 5 equals a straight 5-step run. Thread and process samplers agree."""
    extra = (*ASYNC, "optim.minibatch_size=4", "algo.epochs=2")
    straight = train(_cfg(tmp_path, tiny_random_dir, "grpo", *extra, name="a"), progress=False)
    again = train(_cfg(tmp_path, tiny_random_dir, "grpo", *extra, "rollout.async_worker=thread", name="b"),
                  progress=False)
    assert _equal(_params(straight / "final"), _params(again / "final"))

    cfg = _cfg(tmp_path, tiny_random_dir, "grpo", *extra, "run.save_every=2", name="resumed")
    crash_at(cfg, 3)
    assert (cfg.run_dir() / "checkpoints" / "step-2" / "async_batches.pt").is_file()
    train(cfg, resume=True, progress=False)
    assert _equal(_params(straight / "final"), _params(cfg.run_dir() / "final"))
    keys = ("reward/mean", "async/is_ratio_mean", "policy/loss")
    assert [[r[k] for k in keys] for r in _records(cfg.run_dir())] == [[r[k] for k in keys] for r in
                                                                          _records(straight)]
    five = train(_cfg(tmp_path, tiny_random_dir, "grpo", *extra, "run.steps=5", name="five"), progress=False)
    train(_cfg(tmp_path, tiny_random_dir, "grpo", *extra, "run.steps=5", name="a"), resume=True, progress=False)
    assert _equal(_params(five / "final"), _params(straight / "final"))


def test_filtered_sft_trains_on_the_older_batch_without_a_ratio(tmp_path, tiny_random_dir):
    run = train(_cfg(tmp_path, tiny_random_dir, "isft+-", *ASYNC[:2], "rollout.async_worker=thread"), progress=False)
    records = _records(run)
    assert [r["async/staleness"] for r in records] == [0, 1, 1, 1]
    assert "async/is_ratio_mean" not in records[0] and records[0]["update/rows"] > 0


def test_bad_input_names_the_field(tmp_path, tiny_random_dir):
    with pytest.raises(TokenMDPError, match=r"config field 'rollout.max_staleness'.* must be non-negative"):
        load_config(None, ["rollout.max_staleness=-1"])
    with pytest.raises(TokenMDPError, match=r"'rollout.async_worker'.* is 'thread', but overlapped rollouts with the "
                                            r"vllm engine need the sampler in its own process"):
        load_config(None, ["rollout.max_staleness=1", "rollout.engine=vllm", "rollout.async_worker=thread"])
    with pytest.raises(TokenMDPError, match=r"algo field 'tis_cap' must be > 0"):
        load_config(None, ["algo.tis_cap=0"])
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "n=1:", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(TokenMDPError, match=r"'rollout.max_staleness' is 1, but offline DPO"):
        train(_cfg(tmp_path, tiny_random_dir, "dpo", f"task.dpo_data={data}", "rollout.max_staleness=1"),
              progress=False)
    assert not (tmp_path / "dpo").exists()
    # the staleness is part of the run: a checkpoint of a synchronous run cannot continue as an overlapped one
    cfg = _cfg(tmp_path, tiny_random_dir, "isft+", "run.steps=1")
    train(cfg, progress=False)
    with pytest.raises(TokenMDPError, match=r"config field 'rollout.max_staleness' is 1 here but 0"):
        train(_cfg(tmp_path, tiny_random_dir, "isft+", "run.steps=2", "rollout.max_staleness=1"), resume=True,
              progress=False)
    # a checkpoint whose in-flight batches are gone is refused, naming the file and the field
    cfg = _cfg(tmp_path, tiny_random_dir, "isft+", "run.steps=1", "rollout.max_staleness=1",
               "rollout.async_worker=thread", name="lost")
    train(cfg, progress=False)
    ckpt = cfg.run_dir() / "checkpoints" / "step-1"
    (ckpt / "async_batches.pt").unlink()
    (ckpt / "checksums.json").unlink()
    longer = _cfg(tmp_path, tiny_random_dir, "isft+", "run.steps=2", "rollout.max_staleness=1",
                  "rollout.async_worker=thread", name="lost")
    with pytest.raises(TokenMDPError, match=r"no async_batches.pt: .*'rollout.max_staleness' = 1"):
        train(longer, resume=True, progress=False)


def test_the_anchor_from_the_loss_forward_equals_a_pass_of_its_own(tmp_path, tiny_random_dir, monkeypatch):
    """One epoch, one optimizer step a batch: pi_old is read off the loss's own forward (no extra pass). The run,
    its importance-weight metrics and its loss equal those of the run that computes pi_old in a pass of its own."""
    from tokenmdp.train.algorithms import PolicyGradient
    from tokenmdp.train.learner import Learner

    extra = (*ASYNC, "rollout.async_worker=thread")
    cfg = _cfg(tmp_path, tiny_random_dir, "grpo", *extra, name="in-pass")
    assert _unit(cfg).anchor_in_pass
    calls = []
    real = Learner.logprobs_all

    def counted(self, model, rollout):  # passes of the trained policy itself (not the reference's)
        if model is self.model:
            calls.append(1)
        return real(self, model, rollout)

    monkeypatch.setattr(Learner, "logprobs_all", counted)
    fast = train(cfg, progress=False)
    assert calls == []  # no pass of its own
    monkeypatch.setattr(PolicyGradient, "anchor_in_pass", property(lambda self: False))
    slow = train(_cfg(tmp_path, tiny_random_dir, "grpo", *extra, name="own-pass"), progress=False)
    assert calls  # the separate pass ran
    a, b = _params(fast / "final"), _params(slow / "final")
    assert all(torch.allclose(a[k], b[k], atol=1e-7, rtol=0) for k in a)
    keys = ("async/is_ratio_mean", "async/is_ratio_max", "async/tis_clip_frac", "policy/loss")
    for x, y in zip(_records(fast), _records(slow)):
        assert all(x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-9) for k in keys), (x, y)


def _unit(config):
    """The policy-gradient unit of ``config`` (no model is built)."""
    from tokenmdp.train.algorithms import make_algorithm
    from tokenmdp.train.config import resolve_algo

    return make_algorithm(resolve_algo(config), config, max_new_tokens=8)


def test_lora_dropout_keeps_the_anchor_in_a_pass_of_its_own(tmp_path, tiny_random_dir):
    cfg = _cfg(tmp_path, tiny_random_dir, "grpo", *ASYNC, "model.lora.enabled=true", "model.lora.dropout=0.1")
    assert not _unit(cfg).anchor_in_pass


def test_importance_weights_by_token_or_sequence_truncated_or_masked():
    """The hand example of truncated_is: token ratios [3, 0.5 | 3], cap 2; sequence ratios [1.5 | 3]."""
    old = torch.log(torch.tensor([[0.6, 0.3], [0.9, 0.5]]))
    mu = torch.log(torch.tensor([[0.2, 0.6], [0.3, 0.5]]))
    mask = torch.tensor([[1, 1], [1, 0]])
    w, m = truncated_is(old, mu, mask, cap=2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 0.5], [2.0, 0.0]]))
    assert m == pytest.approx({"async/is_ratio_mean": 6.5 / 3, "async/is_ratio_max": 3.0, "async/tis_clip_frac": 2 / 3})
    w, _ = truncated_is(old, mu, mask, cap=2.0, mode="mask")
    assert torch.allclose(w, torch.tensor([[0.0, 0.5], [0.0, 0.0]]))
    w, m = truncated_is(old, mu, mask, cap=2.0, level="sequence", prefix="mismatch")
    assert torch.allclose(w, torch.tensor([[1.5, 1.5], [2.0, 0.0]]))
    assert m == pytest.approx({"mismatch/is_ratio_mean": 2.25, "mismatch/is_ratio_max": 3.0,
                               "mismatch/tis_clip_frac": 0.5})
    w, _ = truncated_is(old, mu, mask, cap=2.0, level="sequence", mode="mask")
    assert torch.allclose(w, torch.tensor([[1.5, 1.5], [0.0, 0.0]]))
    long = torch.full((1, 400), 0.5)  # a response whose ratio would overflow float32: capped in log space
    w, m = truncated_is(long, torch.zeros(1, 400), torch.ones(1, 400), cap=2.0, level="sequence")
    assert torch.all(w == 2.0) and math.isfinite(m["async/is_ratio_max"])


def test_recomputed_logprobs_are_weighted_against_the_sampler(tmp_path, tiny_random_dir):
    """rollout.recompute_logprobs: pi_old is the learner's, and the sampler's log-probs (the same model here, so
    ratios within float rounding of 1) give the weights and the mismatch/* metrics."""
    run = train(_cfg(tmp_path, tiny_random_dir, "grpo", "run.steps=2", "rollout.recompute_logprobs=true",
                     "algo.tis_level=sequence", name="mismatch"), progress=False)
    records = _records(run)
    for r in records:
        assert r["mismatch/is_ratio_mean"] == pytest.approx(1.0, abs=1e-3)
        assert 0.0 <= r["mismatch/logprob_diff_mean"] <= r["mismatch/logprob_diff_max"] < 1e-3
        assert r["mismatch/tis_clip_frac"] == 0.0


def test_importance_settings_without_a_sampler_apart_are_an_error(tmp_path, tiny_random_dir):
    with pytest.raises(TokenMDPError, match=r"'algo\.tis_mode' in --set is set, but every batch is sampled by "
                                            r"pi_old itself.*rollout\.recompute_logprobs=true"):
        _cfg(tmp_path, tiny_random_dir, "grpo", "algo.tis_mode=mask")
    _cfg(tmp_path, tiny_random_dir, "grpo", "algo.tis_mode=mask", "rollout.recompute_logprobs=true")


def test_int8_sampler_is_corrected_against_the_float32_policy(tmp_path, tiny_random_dir):
    """rollout.engine_options={quantize: int8}: the fast engine samples from int8 copies of the linear layers; with
    rollout.recompute_logprobs the mismatch metrics measure how far its log-probs are from the float32 policy's
    (above the float-rounding level of the test above, below a few hundredths of a nat); a run extended by
    --resume ends where the straight run does; without recompute_logprobs the setting is refused by name."""
    int8 = ("rollout.recompute_logprobs=true", "rollout.engine_options={quantize: int8}")
    run = train(_cfg(tmp_path, tiny_random_dir, "grpo", "run.steps=3", *int8, name="int8"), progress=False)
    for r in _records(run):
        assert 1e-4 < r["mismatch/logprob_diff_mean"] < 0.05, r["mismatch/logprob_diff_mean"]
        assert r["mismatch/is_ratio_mean"] == pytest.approx(1.0, abs=0.05)
    short = train(_cfg(tmp_path, tiny_random_dir, "grpo", "run.steps=2", *int8, name="resumed"), progress=False)
    train(_cfg(tmp_path, tiny_random_dir, "grpo", "run.steps=3", *int8, name="resumed"), resume=True, progress=False)
    assert _equal(_params(run / "final"), _params(short / "final"))  # seeded, and --resume exact
    with pytest.raises(TokenMDPError, match=r"rollout\.engine_options.*quantize='int8'.*recompute_logprobs=true"):
        _cfg(tmp_path, tiny_random_dir, "grpo", "rollout.engine_options={quantize: int8}")


def test_float16_cache_sampler_is_corrected_against_the_float32_policy(tmp_path, tiny_random_dir):
    """rollout.engine_options={fused_attention: true, kv_cache_dtype: float16}: the sampler's generated keys and
    values in float16; with rollout.recompute_logprobs its log-probs differ from the float32 policy's by more than
    float rounding (about 1e-7 with float32 keys) and less than a thousandth of a nat on average; seeded runs
    repeat; without recompute_logprobs the setting is refused by name."""
    from tokenmdp.rollout import fused

    if fused.load() is None:
        pytest.skip("the fused decode attention cannot be built here (no C++ compiler or ninja)")
    options = "rollout.engine_options={fused_attention: true, kv_cache_dtype: float16}"
    half = ("rollout.recompute_logprobs=true", options)
    runs = [train(_cfg(tmp_path, tiny_random_dir, "grpo", "run.steps=2", *half, name=f"half{i}"), progress=False)
            for i in range(2)]
    for r in _records(runs[0]):
        assert 1e-6 < r["mismatch/logprob_diff_mean"] < 1e-3, r["mismatch/logprob_diff_mean"]
    assert _equal(_params(runs[0] / "final"), _params(runs[1] / "final"))
    with pytest.raises(TokenMDPError, match=r"rollout\.engine_options.*kv_cache_dtype='float16'.*recompute_logprobs"):
        _cfg(tmp_path, tiny_random_dir, "grpo", options)
