"""How a scored batch becomes a loss and optimizer steps, one small unit per kind of update.

* :class:`PolicyGradient` (``kind="pg"``: REINFORCE, RLOO, the GRPO family, PPO): behaviour, reference and critic
  passes, credit and advantages (:func:`tokenmdp.algos.core.compute_advantages`), then ``epochs`` passes of
  minibatch updates of the clipped policy loss and, with a critic, the clipped value loss.
* :class:`FilteredSFT` (``kind="isft"``): the verifier keeps positives, negatives or both, which take (negated)
  log-likelihood steps (:func:`tokenmdp.algos.isft.isft_loss`), with constant or advantage weights.
* :class:`DPO` (``kind="dpo"``): best-versus-worst pairs of each group, or offline pairs, under
  :func:`tokenmdp.algos.dpo.dpo_loss` against the frozen reference.

Each unit holds the math's settings and writes its loop plainly: epochs, minibatches, micro-batches, backward,
step. How passes run (precision, sharding, micro-batch cuts) and how a step is taken (gradient averaging,
clipping, non-finite steps) is the :class:`~tokenmdp.train.learner.Learner`'s; the units never branch on them.
:func:`make_algorithm` is the table from a spec's ``kind`` to its unit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from tokenmdp.algos.core import (
    compute_advantages,
    kl_penalty,
    kl_reward,
    policy_loss,
    truncated_is,
    value_loss,
)
from tokenmdp.algos.dpo import dpo_loss, preference_pairs, sequence_logps
from tokenmdp.algos.isft import isft_loss, kept_counts
from tokenmdp.algos.presets import AlgoSpec
from tokenmdp.mdp.credit import assign_credit, process
from tokenmdp.rollout.padding import right_pad
from tokenmdp.rollout.types import Rollout, encode_prompts
from tokenmdp.train.batch import Batch
from tokenmdp.train.equivalence import gradient_cosines
from tokenmdp.train.learner import Learner, approx_kl, micro_batches, zero_missing_grads
from tokenmdp.train.meter import MetricMeter


@dataclass
class TrainBatch:
    """The per-row tensors an update reads (``(B, T)`` unless noted; names as in ``docs/design.md``), built once
    a step from a :class:`~tokenmdp.train.batch.Batch`. Tensors an algorithm does not use are None."""

    rollout: Rollout
    old_logprobs: torch.Tensor | None  # pi_old: the behaviour log-probs, or recomputed; None: the anchor comes
    # from the loss's own forward (a stale batch or recomputed log-probs, PolicyGradient.anchor_in_pass)
    advantages: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    correct: torch.Tensor | None = None  # (B,) the verifier's verdicts (filtered SFT)
    is_weights: torch.Tensor | None = None  # truncated importance weights of a stale batch

    def __len__(self) -> int:
        return len(self.rollout)

    def select(self, rows: torch.Tensor) -> TrainBatch:
        """The rows ``rows`` (trimmed of all-padding response columns, every ``(B, T)`` tensor cut to match)."""
        sub = self.rollout.select(rows.to(self.rollout.device)).trimmed()
        width = sub.response_ids.shape[1]

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            t = t.index_select(0, rows.to(t.device))
            return t[:, :width] if t.dim() == 2 else t

        return TrainBatch(rollout=sub, old_logprobs=cut(self.old_logprobs), advantages=cut(self.advantages),
                          ref_logprobs=cut(self.ref_logprobs), values=cut(self.values), returns=cut(self.returns),
                          correct=cut(self.correct), is_weights=cut(self.is_weights))


def minibatches(rows: torch.Tensor, size: int | None, *, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``rows`` shuffled by ``generator`` and cut into chunks of ``size`` (None: one chunk, unshuffled)."""
    if size is None or size >= len(rows):
        yield rows
        return
    order = rows[torch.randperm(len(rows), generator=generator)]
    for start in range(0, len(order), size):
        yield order[start : start + size]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The minibatch shuffle of training step ``step``: a function of the run seed and the step only."""
    return torch.Generator().manual_seed(seed * 65_537 + step)


def last_token(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the last policy token of each row."""
    counts = mask.long().cumsum(dim=1)
    return mask.bool() & (counts == counts[:, -1:])


def turn_rewards_matter(batch: Batch) -> bool:
    """Whether a multi-turn batch's per-turn rewards put credit anywhere but on each row's last policy token (then
    they are the token rewards; otherwise the spec's credit assignment spreads the return as in a single turn)."""
    tr = batch.token_rewards
    if tr is None:
        return False
    return bool(((tr != 0) & ~last_token(batch.rollout.response_mask)).any())


def signal_rows(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) bool: rows with a non-zero advantage on some counted token."""
    return ((adv != 0) & mask.bool()).any(dim=1)


@dataclass
class PolicyGradient:
    """REINFORCE, RLOO, the GRPO family and PPO: ``spec`` plus the run settings the update reads.

    ``stale``: batches come from overlapped rollouts (``rollout.max_staleness > 0``): ``pi_old`` is the
    learner's current policy and truncated importance weights correct for the sampler's older one.
    ``process_rewards``: the task's step verifier as token rewards (``credit="process"``).
    """

    spec: AlgoSpec
    seed: int
    max_new_tokens: int
    minibatch_size: int | None = None
    batch_rows: int = 0  # prompts x G of a step
    recompute_logprobs: bool = False
    stale: bool = False
    lora_dropout: bool = False
    equivalence: bool = False
    equivalence_rows: int = 16
    skip_zero_advantage: bool = False
    process_rewards: Callable[[Batch], torch.Tensor] | None = None

    @property
    def anchor_in_pass(self) -> bool:
        """Whether the anchor ``pi_old`` of a stale batch or of recomputed log-probs can be read off the loss's own
        forward pass instead of a pass of its own: one epoch and one optimizer step per batch (the forward's
        parameters are those before the update), and nothing needs ``pi_old`` before the loss (no KL in the
        reward, no equivalence diagnostic, no LoRA dropout in the loss's forward). The ratio is then exactly 1 and
        the update the same, one pass cheaper."""
        spec = self.spec
        one_step = self.minibatch_size is None or self.minibatch_size >= self.batch_rows
        return (spec.epochs == 1 and one_step and not spec.kl_in_reward and not self.equivalence
                and not self.lora_dropout)

    @property
    def skips_zero_advantage(self) -> bool:
        """Whether rows with a zero advantage on every token may skip the forward and backward pass: their clipped
        policy term is 0 whatever the ratio, and nothing else in the loss reads them (no KL term, no entropy
        bonus, no critic); the normalisers stay those of the whole minibatch, so the update is the same."""
        spec = self.spec
        return self.skip_zero_advantage and not spec.critic and spec.entropy_coef == 0 and spec.loss_kl_coef == 0

    def anchor(self, learner: Learner, ro: Rollout) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
        """``pi_old`` (the ratio's anchor) and, when the sampler is not ``pi_old``, its importance weights and their
        metrics. On-policy: the sampler's own log-probs. With ``rollout.recompute_logprobs`` (an inference engine's
        numerics differ from the learner's) or a stale batch: the learner's current policy, weighted against the
        sampler's, in a pass of its own or (:attr:`anchor_in_pass`) None, read off the loss's forward."""
        if not (self.recompute_logprobs or self.stale):
            return ro.logprobs, None, {}
        if self.anchor_in_pass:
            return None, None, {}
        old = learner.logprobs_all(learner.model, ro)
        return old, *self.weights(old, ro)

    def weights(self, old: torch.Tensor, ro: Rollout) -> tuple[torch.Tensor, dict]:
        """The importance weights of ``pi_old`` against the sampler's log-probs (:func:`tokenmdp.algos.core.
        truncated_is` as the spec's ``tis_*`` fields say), logged as ``async/*`` for a stale batch, else as
        ``mismatch/*`` with how far the sampler's numerics are from the learner's."""
        spec = self.spec
        is_weights, metrics = truncated_is(old, ro.logprobs, ro.response_mask, cap=spec.tis_cap,
                                           level=spec.tis_level, mode=spec.tis_mode,
                                           prefix="async" if self.stale else "mismatch")
        if not self.stale:
            diff = (old - ro.logprobs).abs()[ro.response_mask.bool()]
            metrics["mismatch/logprob_diff_mean"] = float(diff.mean()) if diff.numel() else 0.0
            metrics["mismatch/logprob_diff_max"] = float(diff.max()) if diff.numel() else 0.0
        return is_weights, metrics

    def token_rewards(self, batch: Batch) -> torch.Tensor | None:
        """Token rewards when they are not the spec's plain credit assignment: a multi-turn environment's per-turn
        rewards (each on the last token of its turn), process rewards, or KL in the reward."""
        spec, mask = self.spec, batch.rollout.response_mask
        if batch.token_rewards is not None and (spec.credit == "process" or turn_rewards_matter(batch)):
            turn = batch.token_rewards.to(batch.rewards.dtype)  # the earlier turns' rewards are the step rewards
            return process(batch.rewards, mask, step_rewards=turn * ~last_token(mask))
        if spec.credit == "process":
            return process(batch.rewards, mask, step_rewards=self.process_rewards(batch), final=spec.process_final)
        if spec.kl_in_reward:
            return assign_credit(spec.credit, batch.rewards, mask, **spec.credit_kwargs)
        return None

    def prepare(self, learner: Learner, batch: Batch) -> tuple[TrainBatch, dict]:
        """The update's :class:`TrainBatch` (behaviour and reference log-probs, critic values, advantages,
        returns) and its metrics."""
        spec, ro = self.spec, batch.rollout
        old, is_weights, metrics = self.anchor(learner, ro)
        ref = learner.reference_logprobs(ro) if spec.needs_reference else None  # (run.kl_to_base loads it too)
        values = learner.values_all(ro) if learner.critic is not None else None
        token_rewards = self.token_rewards(batch)
        if spec.kl_in_reward:
            token_rewards, kl_m = kl_reward(token_rewards, old, ref, ro.response_mask, kl_coef=spec.kl_coef,
                                            estimator=spec.kl_estimator)
            metrics.update(kl_m)
        baseline = learner.state.baseline
        adv, returns, baseline = compute_advantages(
            spec, batch.rewards, ro.response_mask, group_size=batch.group_size, values=values,
            token_rewards=token_rewards, baseline_state=None if baseline is None else torch.tensor(baseline),
            max_len=self.max_new_tokens,
        )
        if baseline is not None:
            learner.state.baseline = float(baseline)
        valid = ro.response_mask.bool()
        metrics["adv/mean"] = float(adv[valid].mean()) if valid.any() else 0.0
        metrics["adv/abs_mean"] = float(adv[valid].abs().mean()) if valid.any() else 0.0
        tb = TrainBatch(rollout=ro, old_logprobs=old, advantages=adv, ref_logprobs=ref, values=values,
                        returns=returns, is_weights=is_weights)
        return tb, metrics

    def train_rows(self, batch: Batch) -> torch.Tensor:
        """Rows that take part in the update: all, or (``filter_groups``) those of groups with unequal rewards, and
        (``keep="correct"``) the correct ones only."""
        rows = torch.arange(len(batch), device=batch.rewards.device)
        if not self.spec.filter_groups and self.spec.keep == "all":
            return rows
        kept = torch.ones(len(batch), dtype=torch.bool, device=batch.rewards.device)
        if self.spec.filter_groups:
            groups = batch.rewards.view(-1, batch.group_size)
            kept &= (groups.max(dim=1).values > groups.min(dim=1).values).repeat_interleave(batch.group_size)
        if self.spec.keep == "correct":
            kept &= batch.correct.to(kept.device)
        return rows[kept]

    def loss(self, learner: Learner, t: TrainBatch, n_tok, n_seq, meter: MetricMeter) -> torch.Tensor:
        """The loss of one micro-batch ``t`` with the minibatch's normalisers (exact accumulation)."""
        spec, sub = self.spec, t.rollout
        lp, ent = learner.forward(learner.model, sub, entropy=True, entropy_grad=spec.entropy_coef != 0.0)
        old, is_weights, tis_m = t.old_logprobs, t.is_weights, {}
        if old is None:  # the anchor from this very forward (anchor_in_pass: a stale batch, recomputed log-probs)
            old = lp.detach().float()
            is_weights, tis_m = self.weights(old, sub)
        loss, m = policy_loss(
            lp.float(), old, t.advantages, sub.response_mask, clip_low=spec.clip_low,
            clip_high=spec.clip_high, aggregation=spec.aggregation, ref_logprobs=t.ref_logprobs,
            kl_coef=spec.loss_kl_coef, kl_estimator=spec.kl_estimator,
            entropy=ent.float(), entropy_coef=spec.entropy_coef, max_len=spec.divisor(self.max_new_tokens),
            num_tokens=n_tok, num_seqs=n_seq, is_weights=is_weights, ratio_loss=spec.ratio_loss,
            sapo_tau_pos=spec.sapo_tau_pos, sapo_tau_neg=spec.sapo_tau_neg,
        )
        m.update(tis_m)
        if learner.critic is not None:
            v = learner.critic_values(learner.critic, sub)
            v_loss, vm = value_loss(v.float(), t.values, t.returns, sub.response_mask, clip_range=spec.value_clip,
                                    aggregation="token_mean", num_tokens=n_tok, num_seqs=n_seq)
            m.update(vm)
            loss = loss + spec.value_coef * v_loss
        meter.add(m, float(sub.response_mask.sum()))
        return loss

    def update(self, learner: Learner, batch: Batch, *, step: int) -> dict:
        """``epochs`` passes of minibatch updates on ``batch``; returns the averaged metrics."""
        tb, metrics = self.prepare(learner, batch)
        if self.equivalence:
            metrics.update(self.equivalence_metrics(learner, tb))
        rows = self.train_rows(batch)
        metrics["update/rows"] = float(len(rows))
        epochs = self.spec.epochs
        if learner.nothing_to_train(len(rows), epochs=epochs):
            return metrics
        meter = MetricMeter()
        mask = batch.rollout.response_mask
        order = learner.batch_order(batch.rollout)
        generator = step_generator(self.seed, step)
        live = signal_rows(tb.advantages, mask).cpu() if self.skips_zero_advantage else None
        skipped, later, steps = 0, [], 0
        for _ in range(epochs):
            for mb in minibatches(rows.cpu(), self.minibatch_size, generator=generator):
                if self.equivalence and steps:  # the policy has moved off the batch's sampler
                    later.append(self.equivalence_metrics(learner, tb, mb).get("equiv/cosine", 1.0))
                n_seq, n_tok = len(mb), mask[mb.to(mask.device)].sum()
                work = mb if live is None else mb[live[mb]]
                skipped += len(mb) - len(work)
                share = learner.grad_share  # rollout.async_grad_share: the sampler's rows of the one minibatch
                mine = work if share is None else share.submit(tb, work, order, n_tok, n_seq)
                for micro in learner.micro_passes(mine, order, rollout=tb.rollout):
                    learner.backward(self.loss(learner, tb.select(micro), n_tok, n_seq, meter))
                if share is not None:
                    share.collect(learner, meter)
                meter.end_minibatch()
                if len(work) < len(mb):
                    zero_missing_grads(learner.model)
                learner.step(meter)
                steps += 1
        metrics["update/skipped_rows"] = skipped / epochs
        if later:  # where C1 stops holding: GRPO's later optimizer steps on a batch against weighted SFT's
            metrics.update({"equiv/cosine_later_min": min(later), "equiv/cosine_later_mean": sum(later) / len(later),
                            "equiv/optimizer_steps": float(len(later) + 1)})
        return {**metrics, **meter.result()}

    def equivalence_metrics(self, learner: Learner, tb: TrainBatch, rows: torch.Tensor | None = None) -> dict:
        """``equiv/*`` (:func:`tokenmdp.train.equivalence.gradient_cosines`) on the first ``equivalence_rows`` rows
        (of ``rows``, a minibatch, when given: before a later optimizer step on the batch, where the ratio to the
        sampler is no longer 1), for group or baseline policy gradients (with ``algo.returns="to_go"`` against their
        per-token advantages; not for a critic's GAE)."""
        spec = self.spec
        if spec.advantage == "gae":
            return {}
        pick = torch.arange(len(tb)) if rows is None else rows
        t = tb.select(pick[:self.equivalence_rows])
        sub = t.rollout
        data = {"prompt_ids": sub.prompt_ids, "prompt_mask": sub.prompt_mask, "response_ids": sub.response_ids,
                "response_mask": sub.response_mask, "old_logprobs": t.old_logprobs, "ref_logprobs": t.ref_logprobs,
                "observation_mask": sub.observation_mask}
        # a constant divisor does not change a cosine: seq_sum_const points where seq_mean_token_sum does
        aggregation = "seq_mean_token_sum" if spec.aggregation == "seq_sum_const" else spec.aggregation
        advantages = t.advantages[:, 0] if spec.returns == "sequence" else t.advantages
        t0 = time.perf_counter()
        with learner.accelerator.autocast():
            out = gradient_cosines(learner.unwrapped(), data, advantages, clip_low=spec.clip_low,
                                   clip_high=spec.clip_high, kl_coef=spec.loss_kl_coef,
                                   kl_estimator=spec.kl_estimator, temperature=learner.temperature,
                                   aggregation=aggregation)
        out["time/equiv"] = time.perf_counter() - t0
        return out


@dataclass
class FilteredSFT:
    """Filtered iterative SFT: ``spec.isft_mode`` keeps positives (``+``), negatives (``-``) or both."""

    spec: AlgoSpec
    seed: int
    max_new_tokens: int
    minibatch_size: int | None = None

    def update(self, learner: Learner, batch: Batch, *, step: int) -> dict:
        """``epochs`` passes of filtered SFT minibatch steps on the kept responses of ``batch``."""
        spec, ro = self.spec, batch.rollout
        adv = None
        if spec.isft_weighting == "advantage":
            adv, _, _ = compute_advantages(spec, batch.rewards, ro.response_mask, group_size=batch.group_size)
        keep = {"+": batch.correct, "-": ~batch.correct, "+-": torch.ones_like(batch.correct)}[spec.isft_mode]
        rows = torch.arange(len(batch), device=keep.device)[keep].cpu()
        metrics: dict = {"update/rows": float(len(rows))}
        if learner.nothing_to_train(len(rows), epochs=spec.epochs):
            return metrics
        tb = TrainBatch(rollout=ro, old_logprobs=ro.logprobs, advantages=adv, correct=batch.correct)
        meter = MetricMeter()
        generator = step_generator(self.seed, step)
        order = learner.batch_order(ro)
        for _ in range(spec.epochs):
            for mb in minibatches(rows, self.minibatch_size, generator=generator):
                mbd = mb.to(keep.device)
                n_tok, n_seq = kept_counts(ro.response_mask[mbd], batch.correct[mbd], mode=spec.isft_mode)
                for micro in learner.micro_passes(mb, order, rollout=ro):
                    learner.backward(self.loss(learner, tb.select(micro), n_tok, n_seq, meter))
                meter.end_minibatch()
                learner.step(meter)
        return {**metrics, **meter.result()}

    def loss(self, learner: Learner, t: TrainBatch, n_tok, n_seq, meter: MetricMeter) -> torch.Tensor:
        """The (weighted, negated for negatives) log-likelihood loss of one micro-batch of kept responses."""
        spec, sub = self.spec, t.rollout
        lp, ent = learner.forward(learner.model, sub, entropy=True, entropy_grad=False)  # a metric here
        seq_adv = None if t.advantages is None else t.advantages[:, 0]  # a response has >= 1 token
        loss, m = isft_loss(
            lp.float(), sub.response_mask, t.correct, mode=spec.isft_mode, weighting=spec.isft_weighting,
            advantages=seq_adv, pos_weight=spec.isft_pos_weight, neg_weight=spec.isft_neg_weight,
            aggregation=spec.aggregation, max_len=spec.divisor(self.max_new_tokens), num_tokens=n_tok,
            num_seqs=n_seq,
        )
        m["policy/entropy"] = float(ent.detach()[sub.response_mask.bool()].mean())
        m["policy/approx_kl"] = approx_kl(t.old_logprobs, lp, sub.response_mask)
        meter.add(m, float(sub.response_mask.sum()))
        return loss


@dataclass
class DPO:
    """DPO on on-policy pairs (the best and the worst response of each group by the verifier's reward: with a 0/1
    reward a correct and an incorrect one), or on offline ``(prompt, chosen, rejected)`` pairs."""

    spec: AlgoSpec
    seed: int
    minibatch_size: int | None = None
    micro_batch_size: int = 16
    tokenizer: object = None  # offline pairs are tokenized here

    def update(self, learner: Learner, batch: Batch | None, *, step: int, pairs: list | None = None) -> dict:
        """DPO minibatch steps on on-policy pairs of ``batch`` or on the offline ``pairs`` of this step."""
        if pairs is not None:
            ro = self.pairs_rollout(pairs, learner.device)
            chosen = torch.arange(len(pairs))
            rejected = chosen + len(pairs)
        else:
            ro = batch.rollout
            chosen, rejected = preference_pairs(batch.rewards.float().cpu(), group_size=batch.group_size)
        metrics: dict = {"update/rows": float(2 * len(chosen)), "dpo/pairs": float(len(chosen))}
        if learner.nothing_to_train(len(chosen), epochs=self.spec.epochs):
            return metrics
        tb = TrainBatch(rollout=ro, old_logprobs=ro.logprobs, ref_logprobs=learner.reference_logprobs(ro))
        meter = MetricMeter()
        generator = step_generator(self.seed, step)
        pair_rows = torch.arange(len(chosen))
        pairs_per_micro = max(1, self.micro_batch_size // 2)
        pairs_per_minibatch = None if self.minibatch_size is None else max(1, self.minibatch_size // 2)
        for _ in range(self.spec.epochs):
            for mb in minibatches(pair_rows, pairs_per_minibatch, generator=generator):
                for micro in learner.lockstep(list(micro_batches(mb, pairs_per_micro))):
                    rows = torch.cat([chosen[micro], rejected[micro]])
                    learner.backward(self.loss(learner, tb.select(rows), len(micro), len(mb), meter))
                meter.end_minibatch()
                learner.step(meter)
        return {**metrics, **meter.result()}

    def loss(self, learner: Learner, t: TrainBatch, n_micro: int, n_mb: int, meter: MetricMeter) -> torch.Tensor:
        """The DPO loss of one micro-batch of pairs (chosen rows first, then their rejected rows), scaled by its
        share of the minibatch (exact accumulation)."""
        spec, sub = self.spec, t.rollout
        lp, ent = learner.forward(learner.model, sub, entropy=True, entropy_grad=False)  # a metric here
        seq = sequence_logps(lp.float(), sub.response_mask)
        seq_ref = sequence_logps(t.ref_logprobs, sub.response_mask)
        loss, m = dpo_loss(seq[:n_micro], seq[n_micro:], seq_ref[:n_micro], seq_ref[n_micro:], beta=spec.dpo_beta,
                           loss_type=spec.dpo_loss_type, label_smoothing=spec.dpo_label_smoothing)
        scale = n_micro / n_mb
        m["dpo/loss"] = m["dpo/loss"] * scale
        m["policy/entropy"] = float(ent.detach()[sub.response_mask.bool()].mean())
        kl = kl_penalty(lp.detach().float(), t.ref_logprobs, estimator="k3")
        m["policy/kl_ref"] = float(kl[sub.response_mask.bool()].mean())
        meter.add(m, float(n_micro))
        return loss * scale

    def pairs_rollout(self, pairs: list, device) -> Rollout:
        """Offline pairs as one rollout: rows ``0..P-1`` the chosen responses, ``P..2P-1`` the rejected ones (each
        tokenized without special tokens, EOS appended)."""
        tok = self.tokenizer
        prompts = [p.prompt for p in pairs] * 2
        texts = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        prompt_ids, prompt_mask = encode_prompts(tok, prompts, device=device)
        eos = tok.eos_token_id
        rows = [tok(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
        response_ids = right_pad(rows, tok.pad_token_id if tok.pad_token_id is not None else eos, dtype=torch.long)
        response_mask = right_pad([[1] * len(r) for r in rows], 0, dtype=torch.long)
        n = len(rows)
        return Rollout(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids.to(device),
            response_mask=response_mask.to(device), logprobs=torch.zeros(response_ids.shape, device=device),
            terminated=torch.ones(n, dtype=torch.bool, device=device),
            truncated=torch.zeros(n, dtype=torch.bool, device=device), prompts=prompts, responses=texts,
        )


Algorithm = PolicyGradient | FilteredSFT | DPO


def make_algorithm(spec: AlgoSpec, config, *, max_new_tokens: int, tokenizer=None,
                   process_rewards: Callable[[Batch], torch.Tensor] | None = None) -> Algorithm:
    """The unit of ``spec.kind`` with the run settings it reads from ``config`` (a ``TrainConfig``)."""
    optim, rollout, run = config.optim, config.rollout, config.run
    if spec.kind == "isft":
        return FilteredSFT(spec, run.seed, max_new_tokens, optim.minibatch_size)
    if spec.kind == "dpo":
        return DPO(spec, run.seed, optim.minibatch_size, optim.micro_batch_size, tokenizer)
    lora = config.model.lora
    return PolicyGradient(
        spec, run.seed, max_new_tokens, minibatch_size=optim.minibatch_size,
        batch_rows=rollout.prompts_per_step * rollout.group_size, recompute_logprobs=rollout.recompute_logprobs,
        stale=rollout.max_staleness > 0, lora_dropout=lora.enabled and lora.dropout > 0,
        equivalence=run.equivalence, equivalence_rows=optim.micro_batch_size,
        skip_zero_advantage=optim.skip_zero_advantage, process_rewards=process_rewards,
    )


__all__ = ["DPO", "Algorithm", "FilteredSFT", "PolicyGradient", "TrainBatch", "make_algorithm", "minibatches",
           "signal_rows", "turn_rewards_matter"]
