"""Off-policy correction of a stale batch: truncated importance sampling (TIS) per token.

With rollouts overlapped with updates (``rollout.max_staleness = k``), the batch of step ``t`` was sampled by the
behaviour policy ``mu`` = the weights of ``k`` updates ago, while the update starts from the learner's current
weights ``pi_old``. The decoupled objective (AReaL's decoupled PPO; verl's rollout-correction "token TIS") keeps
the trust region around ``pi_old`` and corrects the sampling distribution with a truncated weight::

    w_t   = min(pi_old(y_t | s_t) / mu(y_t | s_t), C)          (detached; C = ``cap``, AlgoSpec.tis_cap)
    l_t   = -w_t * min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t),   rho_t = pi_theta / pi_old

so ``E_mu[w rho A grad log pi] = E_pi_old[rho A grad log pi]`` whenever no weight is truncated (``C`` bounds the
variance at the price of a small bias where ``pi_old / mu > C``). Clipping the ratio against ``mu`` instead would
start every update already off 1 by the staleness and clip away the gradient of those tokens. With no staleness
(``mu = pi_old``) every ``w_t = 1`` and the loss is the plain clipped loss.

Hand example (the test): ``log pi_old = log [[0.6, 0.3], [0.9, -]]``, ``log mu = log [[0.2, 0.6], [0.3, -]]``,
mask ``[[1, 1], [1, 0]]``, ``C = 2``: ratios ``[3, 0.5, 3]``, weights ``[[2, 0.5], [2, 0]]`` (0 on padding),
``async/is_ratio_mean = 6.5 / 3 = 2.1667``, ``async/is_ratio_max = 3``, ``async/tis_clip_frac = 2 / 3``.
"""

from __future__ import annotations

import torch

from tokenmdp.errors import TokenMDPError

Tensor = torch.Tensor


def truncated_is(old_logprobs: Tensor, behaviour_logprobs: Tensor, response_mask: Tensor, *, cap: float = 2.0
                 ) -> tuple[Tensor, dict[str, float]]:
    """Per-token truncated importance weights ``min(exp(old - behaviour), cap)``, (B, T), 0 on padding, and the
    metrics ``async/is_ratio_mean``, ``async/is_ratio_max`` (of the untruncated ratio) and ``async/tis_clip_frac``
    (the fraction of tokens whose weight was truncated), over the tokens of ``response_mask``."""
    if not cap > 0:
        raise TokenMDPError(f"the TIS cap must be > 0, got {cap}")
    if old_logprobs.shape != behaviour_logprobs.shape or old_logprobs.shape != response_mask.shape:
        raise TokenMDPError(f"old_logprobs {tuple(old_logprobs.shape)}, behaviour_logprobs "
                            f"{tuple(behaviour_logprobs.shape)} and response_mask {tuple(response_mask.shape)} must "
                            "have the same shape")
    mask = response_mask.to(torch.bool)
    zero = torch.zeros((), dtype=torch.float32, device=old_logprobs.device)
    # padding sanitised before exp(): garbage there must not overflow
    log_ratio = torch.where(mask, old_logprobs.detach().float() - behaviour_logprobs.detach().float(), zero)
    ratio = torch.exp(log_ratio)
    weights = torch.where(mask, torch.clamp(ratio, max=float(cap)), zero)
    valid = ratio[mask]
    n = max(int(mask.sum()), 1)
    metrics = {
        "async/is_ratio_mean": float(valid.sum() / n) if valid.numel() else 1.0,
        "async/is_ratio_max": float(valid.max()) if valid.numel() else 1.0,
        "async/tis_clip_frac": float((valid > cap).sum() / n) if valid.numel() else 0.0,
    }
    return weights, metrics


__all__ = ["truncated_is"]
