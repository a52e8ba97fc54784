"""The diagnostic of "RL in Name Only?" (arXiv 2505.13697): how far is a GRPO step from weighted filtered SFT?

On one batch of responses, with advantages ``A_i`` (B,), compare two parameter gradients of the same model:

* the GRPO policy loss (:func:`tokenmdp.algos.core.policy_loss`, aggregation ``seq_mean_token_mean``) with the
  batch's behaviour log-probs, the ratio clip and the KL to the reference as configured;
* filtered iterative SFT on positives and negatives weighted by ``A_i / |o_i|``
  (:func:`tokenmdp.algos.isft.isft_loss` with ``mode="+-"``, ``weighting="advantage"``, the same aggregation).

With the KL weight 0 and an on-policy batch (``rho = 1``, so the clip is inactive) the two gradients are equal,

    grad GRPO = -(1/B) sum_i (A_i / |o_i|) sum_t grad log pi(o_it | q, o_i<t) = grad isft(+-),

so their cosine is 1 up to rounding (the tests require > 0.9999 on a tiny Qwen2 model). Off-policy inner epochs
(``epochs > 1``: the clip becomes active) and the KL term move GRPO away from SFT; :func:`gradient_cosines` reports
the cosine as configured, on-policy without KL, and with the KL or the clip switched off one at a time, so a run can
log how much each ingredient contributes (``equiv/*`` metrics).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tokenmdp.algos.isft import isft_loss
from tokenmdp.algos.core import policy_loss
from tokenmdp.errors import TokenMDPError
from tokenmdp.policy.logprobs import sequence_logprobs

Tensor = torch.Tensor
NO_CLIP = dict(clip_low=1.0, clip_high=float("inf"))  # clamp(rho, 0, inf) = rho: the clip never binds


def _field(batch: Any, name: str, *alternatives: str, required: bool = True) -> Tensor | None:
    for key in (name, *alternatives):
        value = batch.get(key) if isinstance(batch, Mapping) else getattr(batch, key, None)
        if value is not None:
            return value
    if required:
        raise TokenMDPError(f"equivalence: the batch has no field {name!r}")
    return None


def flat_grad(loss: Tensor, params: list[nn.Parameter], *, retain_graph: bool = True) -> Tensor:
    """The gradient of ``loss`` with respect to ``params``, flattened into one float64 vector (zeros if unused)."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat([
        (g if g is not None else torch.zeros_like(p)).reshape(-1).to(torch.float64) for g, p in zip(grads, params)
    ])


def cosine(a: Tensor, b: Tensor) -> float:
    """``a . b / (|a| |b|)`` (0 when either vector is zero)."""
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 0.0


def gradient_cosines(
    model: nn.Module,
    batch: Any,
    advantages: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    temperature: float = 1.0,
    aggregation: str = "seq_mean_token_mean",
) -> dict[str, float]:
    """Cosines between the GRPO gradient and the ``A_i / |o_i|``-weighted filtered-SFT gradient on ``batch``.

    ``batch``: a :class:`~tokenmdp.rollout.types.Rollout` or a mapping/object with ``prompt_ids``, ``prompt_mask``,
    ``response_ids``, ``response_mask``, behaviour log-probs ``old_logprobs`` (or ``logprobs``, as in a Rollout)
    and, when ``kl_coef > 0``, ``ref_logprobs``. ``advantages`` (B,), or (B, T) per token (returns-to-go, e.g.
    with process credit: ``A_t = G_t - b_i``): then the GRPO side takes them per token and the SFT side weighs each
    response by its first token's ``A_i0 = R_i - b_i``, so ``equiv/cosine_on_policy`` measures how far per-token
    credit moves a step from weighted filtered SFT (1 exactly when ``A_t`` is constant along each response). One
    forward pass, five backward passes.

    Returns ``equiv/cosine`` (GRPO as configured vs SFT), ``equiv/cosine_on_policy`` (``rho = 1``, no KL: the
    paper's identity, 1 up to rounding), ``equiv/cosine_no_kl`` (as configured without the KL term),
    ``equiv/cosine_no_clip`` (as configured without the clip), ``equiv/grad_norm_grpo``, ``equiv/grad_norm_isft``,
    ``equiv/ratio_max`` and ``equiv/clip_frac`` (of the configured GRPO loss).
    """
    prompt_ids, prompt_mask = _field(batch, "prompt_ids"), _field(batch, "prompt_mask")
    response_ids, response_mask = _field(batch, "response_ids"), _field(batch, "response_mask")
    old = _field(batch, "old_logprobs", "logprobs")
    ref = _field(batch, "ref_logprobs", required=False)
    if kl_coef > 0 and ref is None:
        raise TokenMDPError("equivalence: kl_coef > 0 needs ref_logprobs in the batch")
    if advantages.dim() not in (1, 2) or advantages.shape[0] != response_ids.shape[0] or (
            advantages.dim() == 2 and advantages.shape != response_ids.shape):
        raise TokenMDPError(f"equivalence: advantages must have shape (B,) = ({response_ids.shape[0]},) or (B, T) = "
                            f"{tuple(response_ids.shape)}")
    params = [p for p in model.parameters() if p.requires_grad]
    observed = _field(batch, "observation_mask", required=False)  # a multi-turn episode's environment tokens
    context = {} if observed is None else {"context_mask": response_mask | observed.to(response_mask.dtype)}
    logp, _ = sequence_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature=temperature,
                                **context)
    adv = advantages.detach().to(logp.dtype)
    seq_adv = adv
    if adv.dim() == 2:  # per-token advantages (returns-to-go): the SFT side weighs each response by its first token's
        first = response_mask.long().argmax(dim=1)  # A_i0 = R_i - b_i, the sequence advantage
        seq_adv = adv.gather(1, first.unsqueeze(1)).squeeze(1)

    def grpo(old_lp: Tensor, *, kl: float, clip: dict) -> tuple[Tensor, dict[str, float]]:
        return policy_loss(logp, old_lp, adv, response_mask, aggregation=aggregation, ref_logprobs=ref,
                           kl_coef=kl, kl_estimator=kl_estimator, **clip)

    configured_clip = dict(clip_low=clip_low, clip_high=clip_high)
    sft, _ = isft_loss(logp, response_mask, seq_adv > 0, mode="+-", weighting="advantage", advantages=seq_adv,
                       aggregation=aggregation)
    g_sft = flat_grad(sft, params)
    loss_cfg, metrics = grpo(old, kl=kl_coef, clip=configured_clip)
    g_cfg = flat_grad(loss_cfg, params)
    g_on = flat_grad(grpo(logp.detach(), kl=0.0, clip=configured_clip)[0], params)
    g_no_kl = flat_grad(grpo(old, kl=0.0, clip=configured_clip)[0], params)
    g_no_clip = flat_grad(grpo(old, kl=kl_coef, clip=NO_CLIP)[0], params, retain_graph=False)
    return {
        "equiv/cosine": cosine(g_cfg, g_sft),
        "equiv/cosine_on_policy": cosine(g_on, g_sft),
        "equiv/cosine_no_kl": cosine(g_no_kl, g_sft),
        "equiv/cosine_no_clip": cosine(g_no_clip, g_sft),
        "equiv/grad_norm_grpo": float(g_cfg.norm()),
        "equiv/grad_norm_isft": float(g_sft.norm()),
        "equiv/ratio_max": metrics["policy/ratio_max"],
        "equiv/clip_frac": metrics["policy/clip_frac"],
    }


__all__ = ["gradient_cosines", "flat_grad", "cosine"]
