"""The supervised updates of one training step: filtered iterative SFT and DPO.

* Filtered iterative SFT (``kind="isft"``): the step's rollouts are filtered by the verifier (positives, negatives
  or both, ``spec.isft_mode``) and the kept responses take (negated) log-likelihood steps
  (:func:`tokenmdp.algos.isft.isft_loss`), with constant or advantage weights.
* DPO (``kind="dpo"``): pairs are a correct (chosen) and an incorrect (rejected) response of each group that has
  both (on-policy, :func:`tokenmdp.algos.dpo.preference_pairs` on the verifier's verdicts), or offline
  ``(prompt, chosen, rejected)`` pairs from ``task.dpo_data``; the loss is :func:`tokenmdp.algos.dpo.dpo_loss` against the frozen reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tokenmdp.algos.dpo import dpo_loss, preference_pairs, sequence_logps
from tokenmdp.algos.isft import isft_loss, kept_counts
from tokenmdp.algos.losses import kl_penalty
from tokenmdp.algos.registry import compute_advantages
from tokenmdp.rollout.padding import right_pad
from tokenmdp.rollout.types import Rollout, encode_prompts
from tokenmdp.train.batch import Batch, TrainBatch
from tokenmdp.train.updates import (
    MetricMeter,
    approx_kl,
    batch_order,
    dummy_pass,
    forward,
    lockstep,
    reference_logprobs,
    micro_batches,
    micro_passes,
    minibatches,
    nothing_to_train,
    optimizer_step,
)

if TYPE_CHECKING:
    from tokenmdp.train.setup import Components


def isft_update(c: Components, batch: Batch, *, step: int) -> dict:
    """``spec.mu`` epochs of filtered SFT minibatch steps on the kept responses of ``batch``."""
    spec, ro = c.spec, batch.rollout
    adv = None
    if spec.isft_weighting == "advantage":
        adv, _, _ = compute_advantages(spec, batch.rewards, ro.response_mask, group_size=batch.group_size)
    keep = {"+": batch.correct, "-": ~batch.correct, "+-": torch.ones_like(batch.correct)}[spec.isft_mode]
    rows = torch.arange(len(batch), device=keep.device)[keep].cpu()
    metrics: dict = {"update/rows": float(len(rows))}
    if nothing_to_train(c, len(rows), epochs=spec.mu):
        return metrics
    tb = TrainBatch(rollout=ro, old_logprobs=ro.logprobs, advantages=adv, correct=batch.correct)
    meter = MetricMeter()
    generator = torch.Generator().manual_seed(c.config.run.seed * 65_537 + step)
    max_len = spec.divisor(c.settings.max_new_tokens)
    order = batch_order(c, ro)
    for _ in range(spec.mu):
        for mb in minibatches(rows, c.config.optim.minibatch_size, generator=generator):
            mbd = mb.to(keep.device)
            n_tok, n_seq = kept_counts(ro.response_mask[mbd], batch.correct[mbd], mode=spec.isft_mode)
            for micro in micro_passes(c, mb, order):
                t = tb.select(micro)
                sub = t.rollout
                lp, ent = forward(c, c.model, sub, entropy=True)
                seq_adv = None if t.advantages is None else t.advantages[:, 0]  # a response has >= 1 token
                loss, m = isft_loss(
                    lp.float(), sub.response_mask, t.correct, mode=spec.isft_mode, weighting=spec.isft_weighting,
                    advantages=seq_adv, pos_weight=spec.isft_pos_weight, neg_weight=spec.isft_neg_weight,
                    aggregation=spec.aggregation, max_len=max_len, num_tokens=n_tok, num_seqs=n_seq,
                )
                m["policy/entropy"] = float(ent.detach()[sub.response_mask.bool()].mean())
                m["policy/approx_kl"] = approx_kl(t.old_logprobs, lp, sub.response_mask)
                meter.add(m, float(sub.response_mask.sum()))
                c.accelerator.backward(loss)
            meter.end_minibatch()
            optimizer_step(c, meter)
    return {**metrics, **meter.result()}


def pairs_rollout(c: Components, pairs: list) -> Rollout:
    """Offline pairs as one rollout: rows ``0..P-1`` the chosen responses, ``P..2P-1`` the rejected ones (each
    tokenized without special tokens, EOS appended)."""
    tok = c.tokenizer
    prompts = [p.prompt for p in pairs] * 2
    texts = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    prompt_ids, prompt_mask = encode_prompts(tok, prompts, device=c.device)
    eos = tok.eos_token_id
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    response_ids = right_pad(rows, tok.pad_token_id if tok.pad_token_id is not None else eos, dtype=torch.long)
    response_mask = right_pad([[1] * len(r) for r in rows], 0, dtype=torch.long)
    n = len(rows)
    return Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids.to(c.device),
        response_mask=response_mask.to(c.device), logprobs=torch.zeros(response_ids.shape, device=c.device),
        terminated=torch.ones(n, dtype=torch.bool, device=c.device),
        truncated=torch.zeros(n, dtype=torch.bool, device=c.device), prompts=prompts, responses=texts,
    )


def dpo_update(c: Components, batch: Batch | None, *, step: int, pairs: list | None = None) -> dict:
    """DPO minibatch steps on on-policy pairs of ``batch`` or on the offline ``pairs`` of this step."""
    if pairs is not None:
        ro = pairs_rollout(c, pairs)
        chosen = torch.arange(len(pairs))
        rejected = chosen + len(pairs)
    else:
        # the best (chosen) and the worst (rejected) response of the same prompt by the verifier's reward: with a
        # 0/1 reward a correct and an incorrect one; with partial credit (a format reward) also a formatted and an
        # unformatted one, as an online-DPO reward model's ranking would
        ro = batch.rollout
        chosen, rejected = preference_pairs(batch.rewards.float().cpu(), group_size=batch.group_size)
    metrics: dict = {"update/rows": float(2 * len(chosen)), "dpo/pairs": float(len(chosen))}
    if nothing_to_train(c, len(chosen), epochs=c.spec.mu):
        return metrics
    tb = TrainBatch(rollout=ro, old_logprobs=ro.logprobs, ref_logprobs=reference_logprobs(c, ro))
    meter = MetricMeter()
    generator = torch.Generator().manual_seed(c.config.run.seed * 65_537 + step)
    pair_rows = torch.arange(len(chosen))
    pairs_per_micro = max(1, c.config.optim.micro_batch_size // 2)
    pairs_per_minibatch = None if c.config.optim.minibatch_size is None else max(1, c.config.optim.minibatch_size // 2)
    for _ in range(c.spec.mu):
        for mb in minibatches(pair_rows, pairs_per_minibatch, generator=generator):
            for micro in lockstep(c, list(micro_batches(mb, pairs_per_micro))):
                if micro is None:  # a sharded policy: another process's pass, joined with zero loss
                    dummy_pass(c)
                    continue
                rows = torch.cat([chosen[micro], rejected[micro]])
                loss = _dpo_micro(c, tb.select(rows), len(micro), len(mb), meter)
                c.accelerator.backward(loss)
            meter.end_minibatch()
            optimizer_step(c, meter)
    return {**metrics, **meter.result()}


def _dpo_micro(c: Components, t: TrainBatch, n_micro: int, n_mb: int, meter: MetricMeter) -> torch.Tensor:
    """The DPO loss of one micro-batch of pairs (chosen rows first, then their rejected rows), scaled by its share
    of the minibatch (exact accumulation)."""
    spec, sub = c.spec, t.rollout
    lp, ent = forward(c, c.model, sub, entropy=True)
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
