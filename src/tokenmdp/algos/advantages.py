"""Advantage estimators: GRPO, RLOO, REINFORCE baselines, GAE (and returns-to-go, whitening, overlong shaping).

Shapes (DESIGN.md glossary): ``rewards`` (B,) with groups contiguous (row ``i * G + j`` is sample ``j`` of prompt
``i``, as the rollout engines return them); ``token_rewards``, ``values``, ``response_mask`` (B, T).
Sequence-level estimators return (B,); the losses broadcast them over tokens.
"""

from __future__ import annotations

import torch

from tokenmdp.errors import TokenMDPError

Tensor = torch.Tensor


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


__all__ = [
    "grpo_advantages",
    "rloo_advantages",
    "reinforce_advantages",
    "returns_to_go",
    "gae",
    "whiten",
    "overlong_penalty",
]
