"""Policy-gradient losses: the clipped ratio objective, KL penalties, aggregation, the clipped value loss.

Shapes: ``logprobs``, ``old_logprobs``, ``ref_logprobs``, ``entropy``, ``values`` (B, T); ``advantages`` (B,) or
(B, T); ``response_mask`` (B, T). Losses are minimised (the negative of the objective).

Aggregation (how per-token losses ``l_it`` become one number; it changes the gradient, not only the logging).
``m_it`` is the mask, ``|o_i| = sum_t m_it``:

* ``"seq_mean_token_mean"`` (GRPO): ``(1/N_seq) sum_i (1/|o_i|) sum_t m_it l_it``;
* ``"token_mean"`` (DAPO, bnpo): ``(1/N_tok) sum_i sum_t m_it l_it``;
* ``"seq_sum_const"`` (Dr. GRPO): ``(1/N_seq) sum_i sum_t m_it l_it / max_len`` with a constant ``max_len``;
* ``"seq_mean_token_sum"``: ``(1/N_seq) sum_i sum_t m_it l_it`` (the plain REINFORCE estimator; = ``seq_sum_const``
  with ``max_len = 1``).

Exact gradient accumulation: ``N_seq`` (``num_seqs``) and ``N_tok`` (``num_tokens``) default to the counts of the
batch passed in. When a minibatch is split into micro-batches, pass the counts of the whole minibatch
(``num_seqs = B_minibatch``, ``num_tokens = response_mask_minibatch.sum()``) to every micro-batch call and **sum**
the micro-batch losses (do not average them, do not divide by the number of accumulation steps): every
aggregation above is then a sum of per-micro-batch terms, so the accumulated gradient equals the full-batch one
exactly (``tests/test_losses.py`` checks this for each aggregation). Metrics are means over the micro-batch.
"""

from __future__ import annotations

import torch

from tokenmdp.errors import TokenMDPError

Tensor = torch.Tensor

AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_sum_const", "seq_mean_token_sum")
KL_ESTIMATORS = ("k1", "k2", "k3")


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
) -> tuple[Tensor, dict[str, float]]:
    """The clipped importance-ratio loss with optional KL-in-loss and entropy bonus; returns ``(loss, metrics)``.

    Per token, ``rho = exp(logprobs - old_logprobs)``::

        l_t = -min(rho A_t, clip(rho, 1 - clip_low, 1 + clip_high) A_t) + kl_coef * kl_t - entropy_coef * H_t

    aggregated by ``aggregation`` (module docstring). ``is_weights`` (B, T), optional: per-token weights of a stale
    batch (truncated importance sampling, :func:`tokenmdp.algos.correction.truncated_is`) multiplying the policy
    term, ``-w_t min(...)`` (detached; with ``w = 2``, ``rho = 1``, ``A = +1``: ``l = -2``). ``clip_high=None`` means ``clip_low`` (symmetric PPO/GRPO);
    DAPO uses 0.2 / 0.28. ``kl_t`` is :func:`kl_penalty` of ``logprobs`` against ``ref_logprobs``.

    Hand example (the tests): ``rho = 1.5``, ``A = +1``, clip 0.2: ``l = -min(1.5, 1.2) = -1.2`` and the gradient
    with respect to ``logprobs`` is 0 (the clipped branch is constant). With ``A = -1``: ``l = 1.5``, gradient 1.5.
    At ``rho = 1`` (on-policy) the gradient is ``-A_t grad log pi``: the REINFORCE gradient.

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

    log_ratio = logp - old
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg_unclipped, pg_clipped = -ratio * adv, -clipped * adv
    pg_tok = torch.maximum(pg_unclipped, pg_clipped)
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
        metrics.update(_ratio_metrics(ratio, log_ratio, adv, mask, pg_clipped > pg_unclipped, clip_low, clip_high))
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


__all__ = ["AGGREGATIONS", "KL_ESTIMATORS", "aggregate", "kl_penalty", "kl_reward", "policy_loss", "value_loss"]
