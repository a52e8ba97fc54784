"""The exact tier's updates: the presets as it runs them (:class:`Variant`, :func:`variants`), the stacked batch of
every group with each loss kind (:class:`GroupBatch`), and every preset's exact expected update
(:func:`expected_update`). The MDP and the groups are :mod:`tokenmdp.experiments.exact.groups`; the runs, the
dynamics and the identities :mod:`tokenmdp.experiments.exact`.

**The update of one group** comes from the project's own loss code: ``compute_advantages`` + ``policy_loss``
(kind ``pg``), ``isft_loss`` (``isft``), ``dpo_loss`` (``dpo``), on the group's token log-probs (G, T) from
``theta``, on-policy (``old_logprobs = logprobs.detach()``: ratio 1, clip inactive). By the chain rule, with
``e_nt = d log pi(y_nt | s_nt) / d theta`` (the Jacobian of ``token_logprobs``, (N, T, D), D = S * V):

    u_g = -d loss(g) / d theta = -sum_{j in g, t} (d loss(g) / d logprobs_jt) e_{y_j, t}        (D,)
    U   = sum_g P(g) u_g,        Var = sum_g P(g) |u_g|^2 - |U|^2    (trace of the covariance of u_g)

One loss call covers all groups that share the loss's normalisers, passed as ``num_seqs`` / ``num_tokens`` (the
gradient-accumulation arguments of ``aggregate``): the call's loss is the sum of the groups' losses. A batch is
one group of one prompt, so ``token_mean`` divides by the group's tokens and ``isft`` by its kept tokens or
responses. Per preset (also in its ``description``):

* ``reinforce``: ``baseline_state=None`` at every step, i.e. ``b = 0`` (the trainer's first step); a moving
  average is constant within a step and leaves the expectation unchanged (only the variance depends on it).
* ``grpo``, ``bnpo`` (k3 KL in the loss), ``ppo_oracle`` (k1 KL in the reward), ``dpo``: the reference is the
  start policy, so the KL (and DPO's margin) contributes nothing at the start and matters along the dynamics.
* ``dapo``: overlong penalty off (its 16-token buffer exceeds ``max_len``); dynamic sampling only drops groups
  whose advantages are 0 (one group per batch), so it changes nothing.
* ``ppo_oracle``: ``ppo`` with the exact ``V^pi(s_t)`` of the task reward as critic, no whitening, the first
  (on-policy) epoch.
* ``dpo``: ``preference_pairs`` takes the first best and the first worst member; over the orderings of a
  multiset that is a uniformly random correct and an independent uniformly random wrong member, so the
  multiset's update is ``dpo_loss``'s averaged over its (correct, wrong) pairs, and its variance is taken over
  the pairs (the ordering picks one).
* ``isft+_seqsum_const`` / ``isft-_seqsum_const``: ``aggregation="seq_sum_const"`` with ``num_seqs = G`` (a
  constant); ``*_seqsum_kept``: the same with ``num_seqs`` = the kept count, as the trainer passes it.
* ``correct`` is ``R > 0.5``; length counts the EOS token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokenmdp.algos.dpo import dpo_loss, sequence_logps
from tokenmdp.algos.isft import isft_loss
from tokenmdp.algos.core import compute_advantages, kl_reward, policy_loss
from tokenmdp.algos.presets import AlgoSpec, get_algo
from tokenmdp.errors import TokenMDPError
from tokenmdp.experiments.exact.groups import Groups, Point, state_values
from tokenmdp.mdp.credit import assign_credit

Tensor = torch.Tensor


@dataclass(frozen=True)
class Variant:
    """A preset as the exact tier runs it: its spec, and the two choices no spec field expresses."""

    name: str
    spec: AlgoSpec
    description: str
    const_divisor: bool = False  # isft: num_seqs = G (a constant) instead of the kept count
    oracle_critic: bool = False  # pg with a critic: the exact V^pi(s_t)


def variants() -> dict[str, Variant]:
    """The presets of the exact tier, by name (module docstring)."""
    seqsum = dict(aggregation="seq_sum_const")
    out = [
        Variant("reinforce", get_algo("reinforce"), "R - b with b = 0 (the moving average's first step); "
                "token sum / max_len"),
        Variant("rloo", get_algo("rloo"), _desc("rloo")),
        Variant("grpo", get_algo("grpo"), _desc("grpo") + " (reference: the start policy)"),
        Variant("grpo_nokl", get_algo("grpo", kl_coef=0.0), "grpo without the KL"),
        Variant("grpo_nokl_seqsum", get_algo("grpo", kl_coef=0.0, **seqsum), "grpo without the KL, token sum / "
                "max_len: the std scaling without the 1/|o|"),
        Variant("bnpo", get_algo("bnpo"), _desc("bnpo") + " (reference: the start policy)"),
        Variant("dr_grpo", get_algo("dr_grpo"), _desc("dr_grpo")),
        Variant("dapo", get_algo("dapo", overlong_buffer=0), "group mean/std; token mean; no KL; overlong "
                "penalty off (its buffer exceeds max_len); dynamic sampling has no effect on one group"),
        # on-policy (rho = 1) each takes its aggregation's REINFORCE step: gspo is grpo_nokl's, cispo and sapo
        # bnpo's without the KL; listed so that the table says so beside the others
        Variant("gspo", get_algo("gspo"), _desc("gspo")),
        Variant("cispo", get_algo("cispo"), _desc("cispo")),
        Variant("sapo", get_algo("sapo"), _desc("sapo")),
        Variant("ppo_oracle", get_algo("ppo", whiten_advantages=False, epochs=1),
                "ppo with the exact V^pi as critic, GAE(1, 0.95), no whitening, first epoch, k1 KL 0.05 in the "
                "reward (reference: the start policy)", oracle_critic=True),
        Variant("dpo", get_algo("dpo"), "sigmoid DPO, beta 0.1, averaged over every (correct, wrong) pair of the "
                "group (reference: the start policy)"),
    ]
    out += [Variant(n, get_algo(n), _desc(n)) for n in ("isft+", "isft-", "isft+-", "isft+-adv")]
    for sign in "+-":
        base = f"isft{sign}"
        out.append(Variant(f"{base}_seqsum_const", get_algo(base, **seqsum), f"{base}, token sum / max_len / G "
                           "(a constant divisor)", const_divisor=True))
        out.append(Variant(f"{base}_seqsum_kept", get_algo(base, **seqsum), f"{base}, token sum / max_len / the "
                           "number of kept responses (the trainer's divisor)"))
    return {v.name: v for v in out}


def _desc(name: str) -> str:
    return get_algo(name).description


def check_supported(v: Variant) -> None:
    """Raise :class:`TokenMDPError` for a preset whose update the exact tier does not model (module docstring)."""
    s = v.spec
    uses_adv = s.kind == "pg" or (s.kind == "isft" and s.isft_weighting == "advantage")
    bad = [(s.epochs != 1, "epochs > 1 (later epochs are off-policy)"),
           (s.entropy_coef != 0, "an entropy bonus"), (s.whiten_advantages, "batch whitening"),
           (uses_adv and s.advantage == "grpo" and s.std_scale == "batch", "a batch-wide std"),
           (s.kind == "pg" and s.advantage == "reinforce" and s.baseline == "batch_mean", "a batch-mean baseline"),
           (s.critic and not v.oracle_critic, "a learned critic"), (s.credit == "process", "process credit"),
           (s.filter_groups and s.kl_coef > 0 and s.kl_in == "loss", "dynamic sampling with a KL in the loss")]
    for flag, what in bad:
        if flag:
            raise TokenMDPError(f"exact: preset {v.name!r} uses {what}, which the exact tier does not model")


Normalisers = tuple[int | None, int | None]


def _buckets(keys: Tensor, size: int) -> list[tuple[Normalisers, Tensor]]:
    """Groups sharing the normalisers ``(num_tokens, num_seqs)`` (M, 2; -1: not used by the aggregation), as
    ``((num_tokens, num_seqs), row indices of those groups)``."""
    uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
    out = []
    for k, key in enumerate(uniq.tolist()):
        g = torch.nonzero(inverse == k).squeeze(-1)
        norm = tuple(None if x < 0 else int(x) for x in key)
        out.append((norm, (g.unsqueeze(-1) * size + torch.arange(size)).reshape(-1)))
    return out  # type: ignore[return-value]


class GroupBatch:
    """The stacked batch of every group (rows ``g * G + j``), static tensors, and the loss of each kind."""

    def __init__(self, groups: Groups, ref: Point) -> None:
        t = groups.table
        self.groups, self.g, self.max_len = groups, groups.size, t.mdp.max_len
        self.mask = t.mask[groups.rows]
        self.rewards = t.rewards[groups.rows]
        self.correct = self.rewards > 0.5
        self.ref = ref.logprobs[groups.rows]
        self._cache: dict[tuple, Any] = {}

    def _group_sum(self, x: Tensor) -> Tensor:
        return x.view(-1, self.g).sum(dim=-1)

    def buckets(self, v: Variant) -> list[tuple[Normalisers, Tensor]]:
        """The groups of ``v``'s loss calls: those sharing its normalisers (kept counts for ``isft``)."""
        key = (v.spec.kind, v.spec.isft_mode, v.spec.aggregation, v.const_divisor)
        if key not in self._cache:
            keep = {"+": self.correct, "-": ~self.correct, "+-": torch.ones_like(self.correct)}[v.spec.isft_mode]
            keep = keep if v.spec.kind == "isft" else torch.ones_like(keep)
            n_tok = self._group_sum((self.mask & keep.unsqueeze(-1)).sum(-1))
            constant = v.const_divisor or v.spec.kind == "pg"
            n_seq = torch.full_like(n_tok, self.g) if constant else self._group_sum(keep)
            token_mean = v.spec.aggregation == "token_mean"
            keys = torch.stack([n_tok if token_mean else -torch.ones_like(n_tok),
                                n_seq if not token_mean else -torch.ones_like(n_seq)], dim=-1)
            self._cache[key] = _buckets(keys, self.g)
        return self._cache[key]

    def pg_loss(self, v: Variant, lp: Tensor, values: Tensor | None) -> Tensor:
        s = v.spec
        token_rewards = None
        if s.kl_in == "reward" and s.kl_coef > 0:
            kw = {"gamma": s.credit_gamma} if s.credit == "discounted" else {}
            token_rewards, _ = kl_reward(assign_credit(s.credit, self.rewards, self.mask, **kw), lp.detach(),
                                         self.ref, self.mask, kl_coef=s.kl_coef, estimator=s.kl_estimator)
        adv, _, _ = compute_advantages(s, self.rewards, self.mask, group_size=self.g, values=values,
                                       token_rewards=token_rewards, max_len=self.max_len)
        kl_loss = s.kl_coef if s.kl_in == "loss" else 0.0
        total = lp.new_zeros(())
        for (n_tok, n_seq), idx in self.buckets(v):
            loss, _ = policy_loss(lp[idx], lp[idx].detach(), adv[idx], self.mask[idx], clip_low=s.clip_low,
                                  clip_high=s.clip_high, aggregation=s.aggregation,
                                  ref_logprobs=self.ref[idx] if kl_loss else None, kl_coef=kl_loss,
                                  kl_estimator=s.kl_estimator, max_len=s.max_len or self.max_len,
                                  num_tokens=n_tok, num_seqs=n_seq, ratio_loss=s.ratio_loss,
                                  sapo_tau_pos=s.sapo_tau_pos, sapo_tau_neg=s.sapo_tau_neg)
            total = total + loss
        return total

    def isft_loss(self, v: Variant, lp: Tensor) -> Tensor:
        s = v.spec
        adv = None
        if s.isft_weighting == "advantage":
            adv = compute_advantages(s, self.rewards, self.mask, group_size=self.g)[0][:, 0]
        total = lp.new_zeros(())
        for (n_tok, n_seq), idx in self.buckets(v):
            loss, _ = isft_loss(lp[idx], self.mask[idx], self.correct[idx], mode=s.isft_mode,
                                weighting=s.isft_weighting, advantages=None if adv is None else adv[idx],
                                pos_weight=s.isft_pos_weight, neg_weight=s.isft_neg_weight,
                                aggregation=s.aggregation, max_len=s.max_len or self.max_len, num_tokens=n_tok,
                                num_seqs=n_seq)
            total = total + loss
        return total

    def dpo_pairs(self) -> list[tuple[float, Tensor, Tensor]]:
        """Every (correct, wrong) pair of every group, bucketed by its weight ``1 / (n_correct n_wrong)``."""
        if "dpo" not in self._cache:
            c = self.correct.view(-1, self.g)
            n_c = c.sum(-1)
            weight = 1.0 / (n_c * (self.g - n_c)).clamp(min=1).to(torch.float64)
            out = []
            for w in torch.unique(weight[(n_c > 0) & (n_c < self.g)]).tolist():
                gi, ji, ki = torch.nonzero(c.unsqueeze(2) & ~c.unsqueeze(1) & (weight == w).view(-1, 1, 1),
                                           as_tuple=True)
                out.append((w, gi * self.g + ji, gi * self.g + ki))
            self._cache["dpo"] = out
        return self._cache["dpo"]

    def dpo_updates(self, v: Variant, point: Point) -> tuple[Tensor, Tensor, Tensor]:
        """``(group (P,), weight (P,), u (P, D))``: the update of every (correct, wrong) pair, ``-grad dpo_loss``
        of that one pair, and its probability ``1 / (n_correct n_wrong)`` within its group."""
        rows = self.groups.rows
        seq = sequence_logps(point.logprobs[rows], self.mask)
        ref = sequence_logps(self.ref, self.mask)
        score = point.jac.sum(dim=1)  # (N, D): grad log p(y) (the Jacobian is 0 on padding)
        out: list[tuple[Tensor, Tensor, Tensor]] = []
        for w, ch, rj in self.dpo_pairs():
            chosen, rejected = seq[ch].clone().requires_grad_(True), seq[rj].clone().requires_grad_(True)
            loss, _ = dpo_loss(chosen, rejected, ref[ch], ref[rj], beta=v.spec.dpo_beta,
                               loss_type=v.spec.dpo_loss_type, label_smoothing=v.spec.dpo_label_smoothing)
            g_c, g_r = torch.autograd.grad(loss * len(ch), [chosen, rejected])  # dpo_loss is a mean over pairs
            u = -(g_c.unsqueeze(-1) * score[rows[ch]] + g_r.unsqueeze(-1) * score[rows[rj]])
            out.append((ch // self.g, torch.full((len(ch),), w, dtype=torch.float64), u))
        if not out:
            d = point.jac.shape[-1]
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64), torch.zeros(0, d)
        return tuple(torch.cat(parts) for parts in zip(*out))  # type: ignore[return-value]


def theta_free(v: Variant) -> bool:
    """Whether the loss's gradient with respect to the log-probs is the same at every ``theta``: on-policy the
    ratio is 1 wherever ``theta`` is and ``isft`` is linear in the log-probs; a KL, a critic or DPO's reference
    margin depend on ``theta``."""
    s = v.spec
    return s.kind in ("pg", "isft") and s.kl_coef == 0 and not s.critic


def row_coefficients(v: Variant, batch: GroupBatch, point: Point) -> Tensor:
    """``d sum_g loss(g) / d logprobs`` (M * G, T): each row's coefficient in its own group's loss (cached for
    :func:`theta_free` variants)."""
    check_supported(v)
    key = ("coef", v.name)
    if key in batch._cache:
        return batch._cache[key]
    lp = point.logprobs[batch.groups.rows].clone().requires_grad_(True)
    if v.spec.kind == "pg":
        values = None
        if v.spec.critic:
            values = state_values(point.theta, batch.groups.table)[batch.groups.rows]
        loss = batch.pg_loss(v, lp, values)
    else:
        loss = batch.isft_loss(v, lp)
    (coef,) = torch.autograd.grad(loss, lp)
    if theta_free(v):
        batch._cache[key] = coef
    return coef


def expected_update(v: Variant, batch: GroupBatch, point: Point, *,
                    per_group: bool = False) -> tuple[Tensor, Tensor]:
    """``(U, Var)``: the exact expected update (D,) and ``E|u_g - U|^2`` (0 unless ``per_group``; always for DPO,
    whose one-pair estimate is random within a multiset: its variance is over the pairs)."""
    if v.spec.kind == "dpo":
        group, weight, u = batch.dpo_updates(v, point)
        prob = point.weights[group] * weight
        mean = prob @ u
        return mean, (prob @ (u * u).sum(-1) - mean @ mean).clamp(min=0.0)
    coef = row_coefficients(v, batch, point)
    groups, (m, g), t_len = batch.groups, batch.groups.members.shape, coef.shape[1]
    if not per_group:
        w_rows = point.weights.repeat_interleave(g).unsqueeze(-1)
        per_seq = torch.zeros(groups.table.num_sequences, t_len, dtype=torch.float64)
        per_seq.index_add_(0, groups.rows, w_rows * coef)
        return -torch.einsum("nt,ntd->d", per_seq, point.jac), torch.zeros((), dtype=torch.float64)
    coef = coef.view(m, g, t_len)
    u = torch.zeros(m, point.jac.shape[-1], dtype=torch.float64)
    for j in range(g):
        for t in range(t_len):
            u -= coef[:, j, t, None] * point.jac[groups.members[:, j], t]
    mean = point.weights @ u
    return mean, (point.weights @ (u * u).sum(-1) - mean @ mean).clamp(min=0.0)


__all__ = ["GroupBatch", "Normalisers", "Variant", "check_supported", "expected_update", "row_coefficients",
           "theta_free", "variants"]
