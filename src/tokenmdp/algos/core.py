"""The family's math in one place: advantage estimators, the policy and value losses, KL estimators, aggregation,
the truncated importance weights of a stale batch, and :func:`compute_advantages`, which turns an
:class:`~tokenmdp.algos.presets.AlgoSpec`'s choices into advantages. Pure functions: tensors in, tensors and a
metrics dict out (no model, no I/O). Formulas: ``docs/math.md``.

Shapes: ``rewards`` (B,) with groups contiguous (row ``i * G + j`` is sample ``j`` of prompt ``i``, as the engines
return them); ``token_rewards``, ``values``, ``response_mask``, ``logprobs``, ``old_logprobs``, ``ref_logprobs``,
``entropy`` (B, T); ``advantages`` (B,) or (B, T). Losses are minimised (the negative of the objective).

**Aggregation** (how per-token losses ``l_it`` become one number; it changes the gradient, not only the logging;
``m_it`` is the mask, ``|o_i| = sum_t m_it``):

* ``"seq_mean_token_mean"`` (GRPO): ``(1/N_seq) sum_i (1/|o_i|) sum_t m_it l_it``;
* ``"token_mean"`` (DAPO, bnpo): ``(1/N_tok) sum_i sum_t m_it l_it``;
* ``"seq_sum_const"`` (Dr. GRPO): ``(1/N_seq) sum_i sum_t m_it l_it / max_len`` with a constant ``max_len``;
* ``"seq_mean_token_sum"``: ``(1/N_seq) sum_i sum_t m_it l_it`` (the plain REINFORCE estimator).

**Exact gradient accumulation**: pass the counts of the whole minibatch (``num_seqs``, ``num_tokens``) to every
micro-batch call and sum the micro-batch losses; every aggregation is then a sum of per-micro-batch terms, so the
accumulated gradient equals the full-batch one (``tests/test_losses.py``).

**Truncated importance sampling** of a batch whose sampler is not the learner's ``pi_old``: a stale batch
(``rollout.max_staleness = k``, sampled by the weights of ``k`` updates ago), or the sampler's own numerics (an
inference engine such as vLLM, with ``rollout.recompute_logprobs``). The trust region stays around ``pi_old`` and
each token's loss is weighted by ``w_t = min(pi_old / mu, C)`` (detached; per token or per response, truncated or
masked: :func:`truncated_is`), so ``E_mu[w rho A grad log pi] = E_pi_old[rho A grad log pi]`` where no weight is
cut. Hand example (the test): ``log pi_old = log [[0.6,
0.3], [0.9, -]]``, ``log mu = log [[0.2, 0.6], [0.3, -]]``, ``C = 2``: weights ``[[2, 0.5], [2, 0]]``.
"""

from __future__ import annotations

from typing import Literal

import torch

from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.credit import assign_credit

Tensor = torch.Tensor

Aggregation = Literal["seq_mean_token_mean", "token_mean", "seq_sum_const", "seq_mean_token_sum"]
KLEstimator = Literal["k1", "k2", "k3"]
# how the importance ratio enters the policy loss (policy_loss's docstring): PPO's clipped surrogate, GSPO's
# sequence ratio, CISPO's clipped and detached weight on log pi, SAPO's soft gate
RatioLoss = Literal["clip", "gspo", "cispo", "sapo"]
AGGREGATIONS: tuple[str, ...] = Aggregation.__args__
KL_ESTIMATORS: tuple[str, ...] = KLEstimator.__args__


# -- advantages ----------------------------------------------------------------------------------------------------

def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise TokenMDPError(f"rewards must have shape (B,), got {tuple(rewards.shape)}")
    if int(group_size) < 1 or rewards.shape[0] % int(group_size) != 0:
        raise TokenMDPError(
            f"group_size {group_size} must be >= 1 and divide the batch size {rewards.shape[0]}"
        )
    r = rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())
    return r.view(-1, int(group_size))


def _std(x: Tensor, *, std: str, dim: int | None = None) -> Tensor:
    """Population (divide by n) or unbiased (divide by n - 1) standard deviation; 0 when n - 1 = 0."""
    if std not in ("population", "unbiased"):
        raise TokenMDPError(f"std must be 'population' or 'unbiased', got {std!r}")
    n = x.numel() if dim is None else x.shape[dim]
    if std == "unbiased" and n < 2:
        return torch.zeros(() if dim is None else x.shape[:dim] + x.shape[dim + 1 :], dtype=x.dtype)
    if dim is None:
        return x.std(correction=1 if std == "unbiased" else 0)
    return x.std(dim=dim, keepdim=True, correction=1 if std == "unbiased" else 0)


def grpo_advantages(
    rewards: Tensor,
    *,
    group_size: int,
    scale: str = "group",
    std: str = "unbiased",
    eps: float = 1e-6,
) -> Tensor:
    """GRPO: ``A_i = (R_i - mean(R_group)) / (s + eps)``, one value per response, shape (B,).

    ``scale``: ``"group"`` divides by the std of the response's group (DeepSeekMath), ``"batch"`` by the std of the
    whole batch (a group mean baseline with a batch-wide scale), ``"none"`` does not divide (Dr. GRPO).
    ``std``: ``"unbiased"`` (divide by ``n - 1``, what ``torch.std`` and TRL/verl use) or ``"population"``
    (divide by ``n``, the form of the reduction in arXiv 2505.13697, giving ``A+ = sqrt((1-p)/p)``).
    A group with equal rewards gets advantage 0.

    Hand example (the tests): rewards ``[1, 0, 0, 1]``, one group: mean 0.5; population std 0.5 -> ``[1, -1, -1,
    1]``; unbiased std ``sqrt(1/3)`` -> ``[0.866, -0.866, -0.866, 0.866]`` (up to ``eps``).
    """
    r = _groups(rewards, group_size)
    centred = r - r.mean(dim=-1, keepdim=True)
    if scale == "group":
        s = _std(r, std=std, dim=-1) if group_size > 1 else torch.zeros_like(r)
    elif scale == "batch":
        s = _std(r.reshape(-1), std=std)
    elif scale == "none":
        return centred.reshape(-1)
    else:
        raise TokenMDPError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    return (centred / (s + eps)).reshape(-1)


def rloo_advantages(rewards: Tensor, *, group_size: int) -> Tensor:
    """RLOO: ``A_i = R_i - mean_{j != i} R_j = (G / (G - 1)) (R_i - mean(R_group))``, shape (B,).

    The baseline does not depend on ``R_i``, so the estimator is unbiased. Hand example: ``[1, 0, 0, 0]`` ->
    ``[1, -1/3, -1/3, -1/3]``.
    """
    if int(group_size) < 2:
        raise TokenMDPError(f"rloo needs group_size >= 2 (a leave-one-out baseline), got {group_size}")
    r = _groups(rewards, group_size)
    g = r.shape[-1]
    loo = (r.sum(dim=-1, keepdim=True) - r) / (g - 1)
    return (r - loo).reshape(-1)


def reinforce_advantages(
    rewards: Tensor,
    *,
    baseline: str = "none",
    state: Tensor | float | None = None,
    momentum: float = 0.9,
) -> tuple[Tensor, Tensor | None]:
    """REINFORCE: ``A_i = R_i - b``; returns ``(advantages (B,), new_state)``.

    ``baseline``: ``"none"`` (``b = 0``); ``"batch_mean"`` (``b = mean(R)``, biased by a factor ``(B-1)/B`` because
    ``b`` contains ``R_i``); ``"moving_average"`` (``b = state``, an exponential average of past batch means that
    does not depend on this batch, so the estimator stays unbiased; ``state=None`` means ``b = 0``; the returned
    state is ``momentum * b + (1 - momentum) * mean(R)``, or ``mean(R)`` on the first call). The caller keeps the
    state between steps (checkpoint it with the run). For the other baselines the state passes through unchanged.

    Hand example: rewards ``[1, 0, 1, 1]``, moving average with state 0.5, momentum 0.9: ``A = [0.5, -0.5, 0.5,
    0.5]``, new state ``0.9 * 0.5 + 0.1 * 0.75 = 0.525``.
    """
    if rewards.dim() != 1:
        raise TokenMDPError(f"rewards must have shape (B,), got {tuple(rewards.shape)}")
    r = rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())
    if baseline == "none":
        return r.clone(), None if state is None else torch.as_tensor(state, dtype=r.dtype)
    if baseline == "batch_mean":
        return r - r.mean(), None if state is None else torch.as_tensor(state, dtype=r.dtype)
    if baseline != "moving_average":
        raise TokenMDPError(f"baseline must be 'none', 'batch_mean' or 'moving_average', got {baseline!r}")
    if not 0.0 <= float(momentum) < 1.0:
        raise TokenMDPError(f"momentum must be in [0, 1), got {momentum}")
    mean = r.mean().detach()
    if state is None:
        return r.clone(), mean
    b = torch.as_tensor(state, dtype=r.dtype)
    return r - b, momentum * b + (1.0 - momentum) * mean


def returns_to_go(token_rewards: Tensor, response_mask: Tensor, *, gamma: float = 1.0) -> Tensor:
    """``G_t = sum_{k >= t} gamma^(k - t) r_k`` over valid tokens, (B, T), 0 on padding.

    ``k - t`` counts valid tokens: a hole in the mask (a multi-turn episode's observation tokens,
    :mod:`tokenmdp.mdp.env`) is skipped, not an end, so a turn's tokens see the returns of the later turns.

    Hand example: ``r = [0, 1, 2]``, gamma 0.5 -> ``[1, 2, 2]``; with a hole, ``r = [0, 1, 0, 2]``, mask
    ``[1, 1, 0, 1]``, gamma 0.5 -> ``[1, 2, 0, 2]``.
    """
    mask = response_mask.to(torch.bool)
    out = torch.zeros_like(token_rewards)
    running = torch.zeros(token_rewards.shape[0], dtype=token_rewards.dtype)
    for t in range(token_rewards.shape[1] - 1, -1, -1):
        running = torch.where(mask[:, t], token_rewards[:, t] + gamma * running, running)
        out[:, t] = torch.where(mask[:, t], running, torch.zeros_like(running))
    return out


def gae(
    token_rewards: Tensor,
    values: Tensor,
    response_mask: Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation; returns ``(advantages, returns)``, both (B, T), 0 on padding.

    ``delta_t = r_t + gamma V(s_{t+1}) - V(s_t)``, ``A_t = delta_t + gamma lam A_{t+1}``, ``returns = A + V``.
    The value after the last valid token is 0 (the episode ended; a truncated response is also treated as ended,
    as in TRL/verl). Right padding ends a row; a hole in the mask (a multi-turn episode's observation tokens,
    :mod:`tokenmdp.mdp.env`) is skipped: the next state of a turn's last token is the state before the next
    policy token, so ``s_{t+1}`` and ``A_{t+1}`` come from the next valid column.
    ``lam = 0``: one-step TD errors; ``lam = 1``: ``A_t = G_t - V(s_t)`` (Monte Carlo).

    Hand example (the tests): ``r = [0, 0, 1]``, ``V = [0.5, 0.6, 0.7]``, gamma 1: lam 0 -> ``A = [0.1, 0.1, 0.3]``;
    lam 1 -> ``A = [0.5, 0.4, 0.3]``; returns ``[0.6, 0.7, 1.0]`` and ``[1, 1, 1]``. The same tokens with an
    observation between the second and third, ``mask = [1, 1, 0, 1]``, give the same numbers on the valid columns
    and 0 on the hole.
    """
    if token_rewards.shape != values.shape or values.shape != response_mask.shape:
        raise TokenMDPError(
            f"gae: token_rewards {tuple(token_rewards.shape)}, values {tuple(values.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must have the same (B, T) shape"
        )
    mask = response_mask.to(values.dtype)
    v = values.detach() * mask
    r = token_rewards.to(values.dtype) * mask
    b, t_max = values.shape
    adv = torch.zeros_like(v)
    next_adv = torch.zeros(b, dtype=v.dtype)
    next_v = torch.zeros(b, dtype=v.dtype)
    valid = response_mask.to(torch.bool)
    for t in range(t_max - 1, -1, -1):
        delta = r[:, t] + gamma * next_v - v[:, t]
        a_t = delta + gamma * lam * next_adv
        adv[:, t] = a_t * mask[:, t]
        next_adv = torch.where(valid[:, t], a_t, next_adv)  # a hole carries the next valid column through
        next_v = torch.where(valid[:, t], v[:, t], next_v)
    return adv, (adv + v) * mask


def whiten(x: Tensor, response_mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / std`` over the valid tokens of the batch (population std), 0 on padding (PPO practice)."""
    mask = response_mask.to(torch.bool)
    vals = x[mask]
    if vals.numel() < 2:
        return torch.where(mask, x, torch.zeros((), dtype=x.dtype))
    mean, std = vals.mean(), vals.std(correction=0)
    out = (x - mean) / (std + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros((), dtype=x.dtype))


def overlong_penalty(lengths: Tensor, *, max_len: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment, (B,), to add to the rewards.

    ``0`` for ``L <= max_len - buffer``; ``-penalty * (L - (max_len - buffer)) / buffer`` inside the buffer;
    ``-penalty`` at ``max_len`` and beyond. ``buffer = 0`` disables it (all zeros).
    Hand example: max_len 10, buffer 4: lengths ``[6, 8, 10]`` -> ``[0, -0.5, -1]``.
    """
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.get_default_dtype())
    if buffer > max_len:
        raise TokenMDPError(f"overlong buffer {buffer} must not exceed max_len {max_len}")
    over = (lengths.to(torch.get_default_dtype()) - (max_len - buffer)).clamp(min=0) / buffer
    return -penalty * over.clamp(max=1.0)


# -- losses -------------------------------------------------------------------------------------------------------

def _masked_mean(x: Tensor, mask: Tensor) -> float:
    n = int(mask.sum())
    return float((torch.where(mask, x, torch.zeros((), dtype=x.dtype)).sum() / max(n, 1)).detach())


def aggregate(
    loss_tok: Tensor,
    response_mask: Tensor,
    *,
    aggregation: str,
    max_len: int | None = None,
    num_tokens: int | float | Tensor | None = None,
    num_seqs: int | float | None = None,
) -> Tensor:
    """Reduce per-token losses (B, T) to a scalar by ``aggregation`` (see the module docstring).

    Hand example: ``l = [[1, 2, 0], [3, 0, 0]]``, mask ``[[1, 1, 0], [1, 0, 0]]``: seq_mean_token_mean
    ``(1.5 + 3) / 2 = 2.25``; token_mean ``6 / 3 = 2``; seq_sum_const with max_len 4 ``(3 + 3) / 4 / 2 = 0.75``.
    """
    mask = response_mask.to(torch.bool)
    zero = torch.zeros((), dtype=loss_tok.dtype, device=loss_tok.device)
    masked = torch.where(mask, loss_tok, zero)
    n_seq = float(mask.shape[0] if num_seqs is None else num_seqs)
    if aggregation == "token_mean":
        n_tok = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens)
        return masked.sum() / torch.clamp(n_tok.to(loss_tok.dtype), min=1)
    if aggregation == "seq_mean_token_mean":
        lengths = mask.sum(dim=-1).clamp(min=1).to(loss_tok.dtype)
        return (masked.sum(dim=-1) / lengths).sum() / max(n_seq, 1.0)
    if aggregation == "seq_sum_const":
        if max_len is None or max_len <= 0:
            raise TokenMDPError("aggregation 'seq_sum_const' needs a positive max_len (the generation budget)")
        return masked.sum() / float(max_len) / max(n_seq, 1.0)
    if aggregation == "seq_mean_token_sum":
        return masked.sum() / max(n_seq, 1.0)
    raise TokenMDPError(f"unknown aggregation {aggregation!r}; choose from {', '.join(AGGREGATIONS)}")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, *, estimator: str = "k3") -> Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from samples of ``pi``, with ``d = log pi_ref - log pi``, (B, T).

    ``k1 = -d`` (unbiased, can be negative), ``k2 = d^2 / 2``, ``k3 = exp(d) - d - 1`` (unbiased and >= 0; its
    gradient is not the KL gradient). Hand example: ``log pi = log 0.5``, ``log pi_ref = log 0.25`` (``d = -log 2``):
    k1 = 0.6931, k2 = 0.2402, k3 = 0.5 - 1 + 0.6931 = 0.1931.
    """
    d = ref_logprobs - logprobs
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(d) - d - 1.0
    raise TokenMDPError(f"unknown kl_estimator {estimator!r}; choose from {', '.join(KL_ESTIMATORS)}")


def kl_reward(
    token_rewards: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    response_mask: Tensor,
    *,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[Tensor, dict[str, float]]:
    """KL in the reward instead of the loss (PPO-RLHF): ``r_t <- r_t - kl_coef * kl_t``, (B, T), 0 on padding.

    Use behaviour log-probs (no gradient flows: the result is detached). Hand example: ``r = [0, 1]``,
    ``log pi - log pi_ref = [0.1, 0.2]``, kl_coef 0.5, k1 -> ``[-0.05, 0.9]``.
    """
    mask = response_mask.to(torch.bool)
    kl = kl_penalty(logprobs.detach(), ref_logprobs.detach(), estimator=estimator)
    kl = torch.where(mask, kl, torch.zeros((), dtype=kl.dtype))
    shaped = torch.where(mask, token_rewards - kl_coef * kl, torch.zeros((), dtype=kl.dtype))
    return shaped, {"policy/kl_ref": _masked_mean(kl, mask)}


def _broadcast_advantages(advantages: Tensor, shape: torch.Size) -> Tensor:
    if advantages.dim() == 1 and advantages.shape[0] == shape[0]:
        return advantages.unsqueeze(-1).expand(shape)
    if tuple(advantages.shape) == tuple(shape):
        return advantages
    raise TokenMDPError(f"advantages must have shape (B,) or (B, T) = {tuple(shape)}, got {tuple(advantages.shape)}")


def _check_shapes(mask: Tensor, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != tuple(mask.shape):
            raise TokenMDPError(
                f"{name} must have the shape of response_mask {tuple(mask.shape)}, got {tuple(t.shape)}"
            )


def _ratio_metrics(ratio: Tensor, log_ratio: Tensor, adv: Tensor, mask: Tensor, is_clipped: Tensor,
                   clip_low: float, clip_high: float) -> dict[str, float]:
    """Clip fractions, ``KL(pi_old || pi)`` by k3 of the ratio, and ratio statistics over the valid tokens."""
    low = (ratio < 1.0 - clip_low) & (adv < 0) & mask
    high = (ratio > 1.0 + clip_high) & (adv > 0) & mask
    valid = ratio[mask]
    return {
        "policy/clip_frac": _masked_mean((is_clipped & mask).to(ratio.dtype), mask),
        "policy/clip_frac_low": _masked_mean(low.to(ratio.dtype), mask),
        "policy/clip_frac_high": _masked_mean(high.to(ratio.dtype), mask),
        "policy/approx_kl": _masked_mean(ratio - 1.0 - log_ratio, mask),
        "policy/ratio_mean": _masked_mean(ratio, mask),
        "policy/ratio_min": float(valid.min()) if valid.numel() else 1.0,
        "policy/ratio_max": float(valid.max()) if valid.numel() else 1.0,
    }


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    aggregation: str = "seq_mean_token_mean",
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    max_len: int | None = None,
    num_tokens: int | float | Tensor | None = None,
    num_seqs: int | float | None = None,
    is_weights: Tensor | None = None,
    ratio_loss: str = "clip",
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
) -> tuple[Tensor, dict[str, float]]:
    """The clipped importance-ratio loss with optional KL-in-loss and entropy bonus; returns ``(loss, metrics)``.

    Per token, ``rho = exp(logprobs - old_logprobs)``::

        l_t = -min(rho A_t, clip(rho, 1 - clip_low, 1 + clip_high) A_t) + kl_coef * kl_t - entropy_coef * H_t

    aggregated by ``aggregation`` (module docstring). ``is_weights`` (B, T), optional: per-token weights of a stale
    batch (truncated importance sampling, :func:`truncated_is`) multiplying the policy term, ``-w_t min(...)``
    (detached; with ``w = 2``, ``rho = 1``, ``A = +1``: ``l = -2``). ``clip_high=None`` means ``clip_low``
    (symmetric PPO/GRPO); DAPO uses 0.2 / 0.28. ``kl_t`` is :func:`kl_penalty` of ``logprobs`` against the reference.

    Hand example (the tests): ``rho = 1.5``, ``A = +1``, clip 0.2: ``l = -min(1.5, 1.2) = -1.2`` and the gradient
    with respect to ``logprobs`` is 0 (the clipped branch is constant). With ``A = -1``: ``l = 1.5``, gradient 1.5.
    At ``rho = 1`` (on-policy) the gradient is ``-A_t grad log pi``: the REINFORCE gradient.

    ``ratio_loss`` replaces the clipped surrogate (each is the REINFORCE gradient at ``rho = 1``; they differ off
    policy, with several optimizer steps per batch or a stale batch):

    * ``"gspo"`` (Zheng et al. 2025): one ratio per response, ``s_i = exp(mean_t log rho_it)``, clipped as above
      (GSPO uses 3e-4 / 4e-4), its gradient spread over the response's tokens (the GSPO-token form:
      ``s_it = sg(s_i) pi_t / sg(pi_t)``). Hand example: log-ratios 0.2 and -0.1, ``A = +1``, clip 0.2:
      ``s = e^0.05 = 1.0513``, loss -1.0513, gradient -1.0513 / 2 on each token's log-prob (token mean).
    * ``"cispo"`` (MiniMax-M1, 2025): ``l_t = -sg(clip(rho, 1 - clip_low, 1 + clip_high)) A_t log pi_t``: the weight
      is clipped, never the token's gradient. Hand example: ``rho = 1.5``, ``A = +1``, clip_high 0.28: gradient
      -1.28 (the clipped surrogate's is 0); ``rho = 0.5``, ``A = -1``, clip_low 1 (no lower bound): +0.5.
    * ``"sapo"`` (Gao et al. 2025): a soft gate for the hard clip, ``l_t = -sigmoid(tau (rho - 1)) (4 / tau) A_t``,
      ``tau = sapo_tau_pos`` where ``A > 0``, else ``sapo_tau_neg``. Its gradient is ``-4 sigma'(tau (rho - 1))
      rho A_t``: ``-A_t`` at ``rho = 1``; at ``rho = 1.5``, ``A = +1``, ``tau = 1``: ``-6 sigma'(0.5) = -1.4100``.

    Metrics (token means over the batch): ``policy/pg_loss``, ``policy/clip_frac`` (tokens where the clipped branch
    is taken and differs), ``policy/clip_frac_low`` / ``policy/clip_frac_high`` (rho below 1 - clip_low with A < 0 /
    above 1 + clip_high with A > 0), ``policy/approx_kl`` (``KL(pi_old || pi)`` by k3 of the ratio,
    ``rho - 1 - log rho``), ``policy/ratio_mean`` / ``policy/ratio_min`` / ``policy/ratio_max``, ``policy/kl_ref``
    (when ``ref_logprobs`` is given), ``policy/entropy`` (when ``entropy`` is given), ``policy/loss``.
    """
    mask = response_mask.to(torch.bool)
    _check_shapes(mask, logprobs=logprobs, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, entropy=entropy,
                  is_weights=is_weights)
    if clip_low < 0 or (clip_high is not None and clip_high < 0):
        raise TokenMDPError(f"clip_low and clip_high must be >= 0, got {clip_low} and {clip_high}")
    clip_high = clip_low if clip_high is None else clip_high
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # sanitise padding first: garbage there must not reach exp() (inf * 0 would give nan gradients)
    logp = torch.where(mask, logprobs, zero)
    old = torch.where(mask, old_logprobs.detach(), zero)
    adv = torch.where(mask, _broadcast_advantages(advantages, mask.shape).detach().to(logp.dtype), zero)

    if ratio_loss not in ("clip", "gspo", "cispo", "sapo"):
        raise TokenMDPError(f"ratio_loss must be 'clip', 'gspo', 'cispo' or 'sapo', got {ratio_loss!r}")
    log_ratio = logp - old
    if ratio_loss == "gspo":  # the response's mean log-ratio as each token's value, each token's own gradient
        seq = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        log_ratio = torch.where(mask, seq.detach().unsqueeze(-1) + logp - logp.detach(), zero)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg_unclipped, pg_clipped = -ratio * adv, -clipped * adv
    if ratio_loss == "cispo":
        pg_tok = -clipped.detach() * adv * logp
        is_clipped = clipped.detach() != ratio.detach()
    elif ratio_loss == "sapo":
        if not (sapo_tau_pos > 0 and sapo_tau_neg > 0):
            raise TokenMDPError(f"sapo_tau_pos and sapo_tau_neg must be > 0, got {sapo_tau_pos}, {sapo_tau_neg}")
        tau = torch.where(adv > 0, torch.full_like(ratio, sapo_tau_pos), torch.full_like(ratio, sapo_tau_neg))
        pg_tok = -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * adv
        is_clipped = torch.zeros_like(mask)
    else:
        pg_tok = torch.maximum(pg_unclipped, pg_clipped)
        is_clipped = pg_clipped > pg_unclipped
    if is_weights is not None:
        pg_tok = pg_tok * torch.where(mask, is_weights.detach().to(logp.dtype), zero)
    loss_tok = pg_tok
    agg = dict(aggregation=aggregation, max_len=max_len, num_tokens=num_tokens, num_seqs=num_seqs)

    metrics: dict[str, float] = {}
    if kl_coef != 0.0:
        if ref_logprobs is None:
            raise TokenMDPError("kl_coef is non-zero but no ref_logprobs were given (a reference model is needed)")
        kl_tok = kl_penalty(logp, torch.where(mask, ref_logprobs.detach(), zero), estimator=kl_estimator)
        loss_tok = loss_tok + kl_coef * kl_tok
    if ref_logprobs is not None:
        kl_metric = kl_penalty(logp.detach(), torch.where(mask, ref_logprobs.detach(), zero), estimator=kl_estimator)
        metrics["policy/kl_ref"] = _masked_mean(kl_metric, mask)
    if entropy is not None:
        ent = torch.where(mask, entropy, zero)
        if entropy_coef != 0.0:
            loss_tok = loss_tok - entropy_coef * ent
        metrics["policy/entropy"] = _masked_mean(ent, mask)
    elif entropy_coef != 0.0:
        raise TokenMDPError("entropy_coef is non-zero but no entropy was given")

    loss = aggregate(loss_tok, mask, **agg)
    with torch.no_grad():
        metrics["policy/loss"] = float(loss.detach())
        metrics["policy/pg_loss"] = float(aggregate(pg_tok.detach(), mask, **agg))
        metrics.update(_ratio_metrics(ratio.detach(), log_ratio.detach(), adv, mask, is_clipped, clip_low, clip_high))
    return loss, metrics


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    *,
    clip_range: float | None = 0.2,
    aggregation: str = "token_mean",
    max_len: int | None = None,
    num_tokens: int | float | Tensor | None = None,
    num_seqs: int | float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped value loss ``0.5 max((V - G)^2, (clip(V, V_old - c, V_old + c) - G)^2)``, aggregated.

    ``clip_range=None`` disables clipping (plain ``0.5 (V - G)^2``). Hand example: ``V = 1.0``, ``V_old = 0.5``,
    ``G = 2.0``, c = 0.2: unclipped ``0.5``, clipped ``V -> 0.7``, ``0.5 * 1.69 = 0.845``: loss 0.845 (the clipped
    branch, with zero gradient). Metrics: ``value/loss``, ``value/clip_frac``, ``value/mean``, ``value/error``
    (mean squared error), ``value/explained_variance``.
    """
    mask = response_mask.to(torch.bool)
    _check_shapes(mask, values=values, old_values=old_values, returns=returns)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    v = torch.where(mask, values, zero)
    g = torch.where(mask, returns.detach(), zero)
    err = (v - g) ** 2
    if clip_range is None:
        loss_tok = 0.5 * err
        clipped_more = torch.zeros_like(mask)
    else:
        v_old = torch.where(mask, old_values.detach(), zero)
        v_clip = v_old + torch.clamp(v - v_old, -clip_range, clip_range)
        err_clip = (v_clip - g) ** 2
        loss_tok = 0.5 * torch.maximum(err, err_clip)
        clipped_more = (err_clip > err) & mask
    loss = aggregate(loss_tok, mask, aggregation=aggregation, max_len=max_len, num_tokens=num_tokens,
                     num_seqs=num_seqs)
    with torch.no_grad():
        gv, vv = g[mask], v[mask]
        var_g = gv.var(correction=0) if gv.numel() > 1 else torch.zeros(())
        ev = 1.0 - (gv - vv).var(correction=0) / var_g if float(var_g) > 0 else torch.zeros(())
        metrics = {
            "value/loss": float(loss.detach()),
            "value/clip_frac": _masked_mean(clipped_more.to(values.dtype), mask),
            "value/mean": _masked_mean(v.detach(), mask),
            "value/error": _masked_mean(err.detach(), mask),
            "value/explained_variance": float(ev),
        }
    return loss, metrics


# -- a stale batch ------------------------------------------------------------------------------------------------

def truncated_is(old_logprobs: Tensor, behaviour_logprobs: Tensor, response_mask: Tensor, *, cap: float = 2.0,
                 level: str = "token", mode: str = "truncate",
                 prefix: str = "async") -> tuple[Tensor, dict[str, float]]:
    """Importance weights of ``pi_old`` against the behaviour policy, (B, T), 0 on padding, and their metrics.

    ``level="token"``: the ratio ``r_t = exp(old_t - behaviour_t)`` of each token; ``"sequence"``: the ratio of the
    whole response, ``r_i = exp(sum_t (old_t - behaviour_t))``, on each of its tokens. ``mode="truncate"``: the
    weight ``min(r, cap)``; ``"mask"``: ``r`` where ``r <= cap``, else 0 (the token or response is left out). The
    metrics, over the tokens (or responses) of ``response_mask``: ``{prefix}/is_ratio_mean``,
    ``{prefix}/is_ratio_max`` (of the ratio before the cap) and ``{prefix}/tis_clip_frac`` (the fraction over the
    cap). Hand example: token ratios ``[3, 0.5 | 3]``, cap 2: truncated ``[2, 0.5 | 2]``, masked ``[0, 0.5 | 0]``;
    sequence ratios ``[1.5 | 3]``: truncated ``[1.5, 1.5 | 2]``, masked ``[1.5, 1.5 | 0]``."""
    if not cap > 0:
        raise TokenMDPError(f"the TIS cap must be > 0, got {cap}")
    if level not in ("token", "sequence") or mode not in ("truncate", "mask"):
        raise TokenMDPError(f"importance weights: level must be 'token' or 'sequence' and mode 'truncate' or 'mask', "
                            f"got {level!r}, {mode!r}")
    if old_logprobs.shape != behaviour_logprobs.shape or old_logprobs.shape != response_mask.shape:
        raise TokenMDPError(f"old_logprobs {tuple(old_logprobs.shape)}, behaviour_logprobs "
                            f"{tuple(behaviour_logprobs.shape)} and response_mask {tuple(response_mask.shape)} must "
                            "have the same shape")
    mask = response_mask.to(torch.bool)
    zero = torch.zeros((), dtype=torch.float32, device=old_logprobs.device)
    # padding sanitised before exp(): garbage there must not overflow
    log_ratio = torch.where(mask, old_logprobs.detach().float() - behaviour_logprobs.detach().float(), zero)
    if level == "sequence":  # capped in log space: a long response's ratio must not overflow
        per_row = log_ratio.sum(dim=-1).clamp(max=80.0)
        ratio = torch.exp(per_row).unsqueeze(-1).expand_as(log_ratio)
        valid = torch.exp(per_row)[mask.any(dim=-1)]
    else:
        ratio = torch.exp(log_ratio)
        valid = ratio[mask]
    kept = torch.clamp(ratio, max=float(cap)) if mode == "truncate" else torch.where(ratio <= cap, ratio, zero)
    weights = torch.where(mask, kept, zero)
    n = max(valid.numel(), 1)
    metrics = {
        f"{prefix}/is_ratio_mean": float(valid.sum() / n) if valid.numel() else 1.0,
        f"{prefix}/is_ratio_max": float(valid.max()) if valid.numel() else 1.0,
        f"{prefix}/tis_clip_frac": float((valid > cap).sum() / n) if valid.numel() else 0.0,
    }
    return weights, metrics


# -- an AlgoSpec's advantages -------------------------------------------------------------------------------------

def compute_advantages(
    spec,
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    group_size: int,
    values: torch.Tensor | None = None,
    token_rewards: torch.Tensor | None = None,
    baseline_state: torch.Tensor | None = None,
    max_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The advantages (B, T) that ``spec`` asks for; returns ``(advantages, returns, baseline_state)``.

    ``rewards`` (B,) are the verifier rewards (groups contiguous). ``token_rewards`` (B, T), when given, replace
    the credit assignment of ``spec.credit`` (e.g. with KL in the reward, or process rewards); otherwise they are
    ``assign_credit(spec.credit, rewards, response_mask)``. Sequence estimators (grpo, rloo, reinforce) use the
    sequence return ``R_i = sum_t token_rewards`` on every token (``returns="sequence"``) or the return-to-go
    ``G_t`` minus the same per-sequence baseline (``returns="to_go"``; only for estimators without std scaling,
    so that ``A_t = G_t - b_i``). ``gae`` needs ``values`` (B, T) and
    returns the critic targets as ``returns``. DAPO's overlong penalty (``spec.overlong_buffer > 0``, needs
    ``max_len``) is added to the rewards first. ``baseline_state`` is REINFORCE's moving average (pass back the
    returned one next step).
    """
    mask = response_mask.to(torch.bool)
    dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    rewards = rewards.to(dtype)
    if spec.overlong_buffer > 0:
        if max_len is None:
            raise TokenMDPError("algo field 'overlong_buffer' is set but no max_len was given to compute_advantages")
        penalty = overlong_penalty(mask.sum(-1), max_len=max_len, buffer=spec.overlong_buffer,
                                   penalty=spec.overlong_penalty).to(dtype)
        rewards = rewards + penalty
        if token_rewards is not None:
            token_rewards = token_rewards + assign_credit("terminal", penalty, mask)
    if token_rewards is None and spec.credit == "process":
        raise TokenMDPError("credit 'process' needs token_rewards from the step verifier (mdp.credit.process)")
    # terminal credit with sequence returns: each row's return is its reward (0 for a row with no token), the
    # sum of the token rewards that terminal credit would give; no token rewards need building
    sequence_only = token_rewards is None and spec.credit == "terminal" and spec.advantage != "gae" \
        and spec.returns == "sequence"
    if token_rewards is None and not sequence_only:
        token_rewards = assign_credit(spec.credit, rewards, mask, **spec.credit_kwargs)
    returns = None
    if spec.advantage == "gae":
        if values is None:
            raise TokenMDPError("advantage 'gae' needs values from the critic")
        adv, returns = gae(token_rewards, values, mask, gamma=spec.gamma, lam=spec.lam)
    else:
        seq_return = torch.where(mask.any(dim=-1), rewards, torch.zeros((), dtype=dtype)) if sequence_only \
            else token_rewards.sum(dim=-1)
        if spec.advantage == "grpo":
            seq_adv = grpo_advantages(seq_return, group_size=group_size, scale=spec.std_scale, std=spec.std,
                                      eps=spec.advantage_eps)
        elif spec.advantage == "rloo":
            seq_adv = rloo_advantages(seq_return, group_size=group_size)
        else:
            seq_adv, baseline_state = reinforce_advantages(seq_return, baseline=spec.baseline,
                                                           state=baseline_state, momentum=spec.baseline_momentum)
        adv = seq_adv.unsqueeze(-1).expand(mask.shape).clone()
        if spec.returns == "to_go":  # unscaled estimators: A_t = G_t - b_i = A_i + (G_t - R_i)
            adv = adv + returns_to_go(token_rewards, mask, gamma=1.0) - seq_return.unsqueeze(-1)
    if spec.whiten_advantages:
        adv = whiten(adv, mask)
    return torch.where(mask, adv, torch.zeros((), dtype=adv.dtype)), returns, baseline_state


__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "aggregate",
    "compute_advantages",
    "gae",
    "grpo_advantages",
    "kl_penalty",
    "kl_reward",
    "overlong_penalty",
    "policy_loss",
    "reinforce_advantages",
    "returns_to_go",
    "rloo_advantages",
    "truncated_is",
    "value_loss",
    "whiten",
]
