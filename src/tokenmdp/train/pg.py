"""The policy-gradient update (REINFORCE, RLOO, the GRPO family, PPO) of one training step.

From a scored batch: behaviour log-probs (the engine's, on-policy), reference log-probs (only when the KL weight
is non-zero), critic values (PPO), credit assignment and advantages as the :class:`AlgoSpec` asks
(:func:`tokenmdp.algos.registry.compute_advantages`), then ``spec.mu`` epochs of minibatch updates of the clipped
policy loss (:func:`tokenmdp.algos.losses.policy_loss`) and, with a critic, the clipped value loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tokenmdp.algos.correction import truncated_is
from tokenmdp.algos.losses import kl_reward, policy_loss, value_loss
from tokenmdp.algos.registry import compute_advantages
from tokenmdp.mdp.credit import assign_credit, process
from tokenmdp.train.batch import Batch, TrainBatch, step_rewards
from tokenmdp.train.evaluation import equivalence
from tokenmdp.train.updates import (
    MetricMeter,
    batch_order,
    critic_values,
    forward,
    logprobs_all,
    reference_logprobs,
    micro_passes,
    minibatches,
    nothing_to_train,
    optimizer_step,
    values_all,
    zero_missing_grads,
)

if TYPE_CHECKING:
    from tokenmdp.train.setup import Components


def turn_rewards_matter(batch: Batch) -> bool:
    """Whether a multi-turn batch's per-turn rewards put credit anywhere but on each row's last policy token (then
    they are the token rewards; otherwise the spec's credit assignment spreads the return as in a single turn)."""
    tr = batch.token_rewards
    if tr is None:
        return False
    return bool(((tr != 0) & ~_last_token(batch.rollout.response_mask)).any())


def _last_token(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the last policy token of each row."""
    counts = mask.long().cumsum(dim=1)
    return mask.bool() & (counts == counts[:, -1:])


def _credit(c: Components, batch: Batch) -> torch.Tensor | None:
    """Token rewards when they are not the spec's plain credit assignment: a multi-turn environment's per-turn
    rewards (each on the last token of its turn: :func:`tokenmdp.mdp.env.turn_token_rewards`, the return kept),
    process rewards, or KL in the reward."""
    spec, mask = c.spec, batch.rollout.response_mask
    if batch.token_rewards is not None and (spec.credit == "process" or turn_rewards_matter(batch)):
        turn = batch.token_rewards.to(batch.rewards.dtype)  # the earlier turns' rewards are the step rewards
        return process(batch.rewards, mask, step_rewards=turn * ~_last_token(mask))
    if spec.credit == "process":
        steps = step_rewards(c, batch, step_reward=c.config.task.step_reward)
        return process(batch.rewards, mask, step_rewards=steps, final=c.spec.process_final)
    if spec.kl_in_reward:
        return assign_credit(spec.credit, batch.rewards, mask, **spec.credit_kwargs)
    return None


def anchor_in_pass(c: Components) -> bool:
    """Whether a stale batch's anchor ``pi_old`` (the learner's log-probs before the update) can be read off the
    loss's own forward pass instead of a pass of its own: one epoch and one optimizer step per batch (the
    parameters of that forward are those before the update), and nothing else needs ``pi_old`` before the loss
    (no KL in the reward, no equivalence diagnostic, no LoRA dropout in the loss's forward). Then ``pi_old`` is the detached log-probs of the same
    forward, equal in value to a separate pass, the ratio is exactly 1 and the truncated importance weights come from
    the same numbers: the update is the same and one no-gradient forward pass a step cheaper."""
    spec, optim = c.spec, c.config.optim
    one_step = optim.minibatch_size is None or optim.minibatch_size >= c.config.rollout.prompts_per_step * (
        c.config.rollout.group_size)
    dropout = c.config.model.lora.enabled and c.config.model.lora.dropout > 0  # the loss forward drops, a pass not
    return spec.mu == 1 and one_step and not spec.kl_in_reward and not c.config.run.equivalence and not dropout


def prepare(c: Components, batch: Batch) -> tuple[TrainBatch, dict]:
    """The update's :class:`TrainBatch` (behaviour and reference log-probs, critic values, advantages, returns)
    and its metrics.

    With overlapped rollouts (``rollout.max_staleness > 0``) the batch was sampled by older weights: ``old`` is
    recomputed under the learner's current weights (the ratio's anchor, the trust region stays around them) and
    the sampler's log-probs give the truncated importance weights (:func:`tokenmdp.algos.correction.truncated_is`).
    """
    spec, ro = c.spec, batch.rollout
    stale = c.config.rollout.max_staleness > 0
    metrics: dict = {}
    is_weights = None
    if stale and anchor_in_pass(c):
        old = None  # the loss's own forward gives the anchor (:func:`_micro_loss`): no extra pass
    else:
        old = logprobs_all(c, c.model, ro) if c.config.rollout.recompute_logprobs or stale else ro.logprobs
    if stale and old is not None:
        is_weights, tis_m = truncated_is(old, ro.logprobs, ro.response_mask, cap=spec.tis_cap)
        metrics.update(tis_m)
    ref = reference_logprobs(c, ro)
    values = values_all(c, ro) if c.critic is not None else None
    token_rewards = _credit(c, batch)
    if spec.kl_in_reward:
        token_rewards, kl_m = kl_reward(token_rewards, old, ref, ro.response_mask, kl_coef=spec.kl_coef,
                                        estimator=spec.kl_estimator)
        metrics.update(kl_m)
    baseline = c.state.get("baseline")
    adv, returns, baseline = compute_advantages(
        spec, batch.rewards, ro.response_mask, group_size=batch.group_size, values=values,
        token_rewards=token_rewards, baseline_state=None if baseline is None else torch.tensor(baseline),
        max_len=c.settings.max_new_tokens,
    )
    if baseline is not None:
        c.state["baseline"] = float(baseline)
    valid = ro.response_mask.bool()
    metrics["adv/mean"] = float(adv[valid].mean()) if valid.any() else 0.0
    metrics["adv/abs_mean"] = float(adv[valid].abs().mean()) if valid.any() else 0.0
    tb = TrainBatch(rollout=ro, old_logprobs=old, advantages=adv, ref_logprobs=ref, values=values, returns=returns,
                    is_weights=is_weights)
    return tb, metrics


def train_rows(c: Components, batch: Batch) -> torch.Tensor:
    """Rows that take part in the update: all, or (``filter_groups``) those of groups with unequal rewards."""
    rows = torch.arange(len(batch), device=batch.rewards.device)
    if not c.spec.filter_groups:
        return rows
    groups = batch.rewards.view(-1, batch.group_size)
    mixed = (groups.max(dim=1).values > groups.min(dim=1).values).repeat_interleave(batch.group_size)
    return rows[mixed]


def can_skip_zero_advantage(c: Components) -> bool:
    """Whether rows with a zero advantage on every token may skip the forward and backward pass.

    With ``A_t = 0`` the clipped policy term ``-min(rho A_t, clip(rho) A_t)`` is 0 whatever ``rho`` is, so such a
    row adds exactly nothing to the gradient, provided nothing else in the loss reads it: no KL term in the loss,
    no entropy bonus, no critic. The normalisers (``num_seqs``, ``num_tokens``) stay those of the whole
    minibatch, so the update is the same as with the row (up to float summation order). GRPO, RLOO and Dr. GRPO
    give exactly 0 to every row of a group whose rewards are all equal (all right or all wrong).
    """
    spec = c.spec
    return (c.config.optim.skip_zero_advantage and c.critic is None and spec.entropy_coef == 0
            and spec.loss_kl_coef == 0)


def signal_rows(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) bool: rows with a non-zero advantage on some counted token."""
    return ((adv != 0) & mask.bool()).any(dim=1)


def _micro_loss(c: Components, t: TrainBatch, n_tok, n_seq, meter: MetricMeter) -> torch.Tensor:
    spec, sub = c.spec, t.rollout
    lp, ent = forward(c, c.model, sub, entropy=True)
    old, is_weights, tis_m = t.old_logprobs, t.is_weights, {}
    if old is None:  # a stale batch's anchor from this very forward (anchor_in_pass)
        old = lp.detach().float()
        is_weights, tis_m = truncated_is(old, sub.logprobs, sub.response_mask, cap=spec.tis_cap)
    loss, m = policy_loss(
        lp.float(), old, t.advantages, sub.response_mask, clip_low=spec.clip_low,
        clip_high=spec.clip_high, aggregation=spec.aggregation, ref_logprobs=t.ref_logprobs,
        kl_coef=spec.loss_kl_coef, kl_estimator=spec.kl_estimator,
        entropy=ent.float(), entropy_coef=spec.entropy_coef, max_len=spec.divisor(c.settings.max_new_tokens),
        num_tokens=n_tok, num_seqs=n_seq, is_weights=is_weights,
    )
    m.update(tis_m)
    if c.critic is not None:
        v = critic_values(c, c.critic, sub)
        v_loss, vm = value_loss(v.float(), t.values, t.returns, sub.response_mask, clip_range=spec.value_clip,
                                aggregation="token_mean", num_tokens=n_tok, num_seqs=n_seq)
        m.update(vm)
        loss = loss + spec.value_coef * v_loss
    meter.add(m, float(sub.response_mask.sum()))
    return loss


def pg_update(c: Components, batch: Batch, *, step: int) -> dict:
    """``spec.mu`` epochs of minibatch updates on ``batch``; returns the averaged metrics."""
    tb, metrics = prepare(c, batch)
    if c.config.run.equivalence:
        metrics.update(equivalence(c, tb))
    rows = train_rows(c, batch)
    metrics["update/rows"] = float(len(rows))
    if nothing_to_train(c, len(rows), epochs=c.spec.mu):
        return metrics
    meter = MetricMeter()
    mask = batch.rollout.response_mask
    order = batch_order(c, batch.rollout)
    generator = torch.Generator().manual_seed(c.config.run.seed * 65_537 + step)
    live = signal_rows(tb.advantages, mask).cpu() if can_skip_zero_advantage(c) else None
    skipped = 0
    for _ in range(c.spec.mu):
        for mb in minibatches(rows.cpu(), c.config.optim.minibatch_size, generator=generator):
            n_seq, n_tok = len(mb), mask[mb.to(mask.device)].sum()
            work = mb if live is None else mb[live[mb]]
            skipped += len(mb) - len(work)
            for micro in micro_passes(c, work, order):
                loss = _micro_loss(c, tb.select(micro), n_tok, n_seq, meter)
                c.accelerator.backward(loss)
            meter.end_minibatch()
            if len(work) < len(mb):
                zero_missing_grads(c.model)
            optimizer_step(c, meter)
    metrics["update/skipped_rows"] = skipped / c.spec.mu
    return {**metrics, **meter.result()}
