"""Direct preference optimisation: the sigmoid (DPO) and IPO losses, and on-policy preference pairs.

Inputs are sequence log-probabilities (B,): ``log pi(y|x) = sum_t log pi(y_t | x, y_<t)`` of the chosen (``w``)
and rejected (``l``) responses under the policy and the frozen reference. With the log-ratio margin

    h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)),

* ``"sigmoid"`` (DPO, Rafailov et al. 2023): ``loss = -log sigmoid(beta h)`` (with label smoothing ``e``:
  ``-(1-e) log sigmoid(beta h) - e log sigmoid(-beta h)``, the conservative DPO of noisy labels);
* ``"ipo"`` (Azar et al. 2023): ``loss = (h - 1/(2 beta))^2``. IPO is usually applied to length-averaged
  log-probabilities: pass ``mean`` instead of ``sum`` with :func:`sequence_logps`.

Hand example (the tests): beta 0.1, h = 1: sigmoid ``log(1 + e^-0.1) = 0.6444``; ipo ``(1 - 5)^2 = 16``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmdp.errors import TokenMDPError

Tensor = torch.Tensor
DPO_LOSS_TYPES = ("sigmoid", "ipo")


def sequence_logps(logprobs: Tensor, response_mask: Tensor, *, average: bool = False) -> Tensor:
    """Sum (or mean) of token log-probs over valid tokens, (B, T) -> (B,)."""
    mask = response_mask.to(torch.bool)
    total = torch.where(mask, logprobs, torch.zeros((), dtype=logprobs.dtype)).sum(dim=-1)
    if average:
        return total / mask.sum(dim=-1).clamp(min=1).to(logprobs.dtype)
    return total


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """DPO / IPO loss averaged over pairs; returns ``(loss, metrics)`` (see the module docstring).

    Metrics: ``dpo/loss``, ``dpo/margin`` (mean h), ``dpo/accuracy`` (fraction with h > 0),
    ``dpo/reward_chosen`` and ``dpo/reward_rejected`` (mean implicit rewards ``beta * log-ratio``).
    """
    if beta <= 0:
        raise TokenMDPError(f"dpo beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise TokenMDPError(f"dpo label_smoothing must be in [0, 0.5), got {label_smoothing}")
    shapes = {t.shape for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or policy_chosen.dim() != 1:
        raise TokenMDPError(f"dpo_loss: the four log-prob tensors must share one (B,) shape, got {sorted(shapes)}")
    chosen_ratio = policy_chosen - ref_chosen.detach()
    rejected_ratio = policy_rejected - ref_rejected.detach()
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise TokenMDPError(f"unknown dpo loss_type {loss_type!r}; choose from {', '.join(DPO_LOSS_TYPES)}")
    loss = losses.mean()
    with torch.no_grad():
        metrics = {
            "dpo/loss": float(loss),
            "dpo/margin": float(h.mean()),
            "dpo/accuracy": float((h > 0).to(h.dtype).mean()),
            "dpo/reward_chosen": float((beta * chosen_ratio).mean()),
            "dpo/reward_rejected": float((beta * rejected_ratio).mean()),
        }
    return loss, metrics


def preference_pairs(rewards: Tensor, *, group_size: int) -> tuple[Tensor, Tensor]:
    """On-policy pairs: in each group, the best response (chosen) and the worst (rejected), if they differ.

    Returns ``(chosen_index, rejected_index)`` (row indices into the batch, shape (P,)); groups whose rewards are
    all equal give no pair. Ties go to the first response. Hand example: rewards ``[0, 1, 1, 0, 0, 0]``, G = 3:
    one pair, chosen 1, rejected 0 (the second group is all 0).
    """
    if rewards.dim() != 1 or group_size < 2 or rewards.shape[0] % group_size != 0:
        raise TokenMDPError(f"preference_pairs: group_size {group_size} must be >= 2 and divide {rewards.shape[0]}")
    r = rewards.view(-1, group_size)
    best, worst = r.argmax(dim=-1), r.argmin(dim=-1)
    keep = r.max(dim=-1).values > r.min(dim=-1).values
    offset = torch.arange(r.shape[0]) * group_size
    return (best + offset)[keep], (worst + offset)[keep]


__all__ = ["DPO_LOSS_TYPES", "dpo_loss", "preference_pairs", "sequence_logps"]
