"""Filtered iterative SFT: the supervised twin of GRPO (arXiv 2505.13697, "RL in Name Only?").

Sample from the current model, filter by the verifier, take a (negated) log-likelihood step, repeat. Per response
``i`` a signed weight ``w_i`` is chosen, and the per-token loss ``l_it = -w_i log pi(o_it | q, o_i<t)`` is reduced
by the same aggregations as the policy loss (:func:`tokenmdp.algos.core.aggregate`).

Filtering by ``mode``: ``"+"`` keeps the correct responses (positives), ``"-"`` the incorrect ones (negatives,
trained with a negated likelihood: their probability is pushed down), ``"+-"`` both. Responses that are filtered
out are dropped from the batch before aggregation: they count neither as tokens nor as sequences (SFT on the kept
set).

Weighting by ``weighting``:

* ``"constant"``: ``w_i = +pos_weight`` for a positive, ``-neg_weight`` for a negative. With
  ``aggregation="token_mean"`` this is plain SFT on the kept tokens (the default).
* ``"advantage"``: ``w_i = A_i`` (given ``advantages``, e.g. GRPO's). With ``aggregation="seq_mean_token_mean"``
  this is the paper's ``A_i / |o_i|`` weighting: ``loss = -(1/G) sum_i (A_i / |o_i|) sum_t log pi(o_it)``, whose
  gradient equals the on-policy, KL-free GRPO gradient (``tokenmdp.train.equivalence`` measures it).

Hand example (the tests): log-probs ``[[-1, -1], [-2, 0]]`` (mask all ones), correct ``[True, False]``, constant
weights, token_mean: ``"+"`` -> ``-(-1 - 1) / 2 = 1``; ``"-"`` -> ``(-2 + 0) / 2 = -1``; ``"+-"`` ->
``(2 - 2) / 4 = 0``. Advantage weighting ``A = [1, -1]``, seq_mean_token_mean, ``"+-"``: ``(1 + (-1)) / 2 = 0``;
``"+"``: ``1``.
"""

from __future__ import annotations

import torch

from tokenmdp.algos.core import aggregate
from tokenmdp.errors import TokenMDPError

Tensor = torch.Tensor
ISFT_MODES = ("+", "-", "+-")
ISFT_WEIGHTINGS = ("constant", "advantage")


def isft_weights(
    correct: Tensor,
    *,
    mode: str = "+-",
    weighting: str = "constant",
    advantages: Tensor | None = None,
    pos_weight: float = 1.0,
    neg_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per-response signed weights ``w`` (B,) and the keep mask (B,) bool of the filter (module docstring)."""
    if mode not in ISFT_MODES:
        raise TokenMDPError(f"unknown isft mode {mode!r}; choose from {', '.join(ISFT_MODES)}")
    correct = correct.to(torch.bool)
    keep = {"+": correct, "-": ~correct, "+-": torch.ones_like(correct)}[mode]
    if weighting == "constant":
        w = torch.where(correct, torch.tensor(float(pos_weight)), torch.tensor(-float(neg_weight)))
    elif weighting == "advantage":
        if advantages is None or advantages.shape != correct.shape:
            raise TokenMDPError("isft weighting 'advantage' needs advantages of shape (B,)")
        w = advantages.detach().to(torch.get_default_dtype())
    else:
        raise TokenMDPError(f"unknown isft weighting {weighting!r}; choose from {', '.join(ISFT_WEIGHTINGS)}")
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype)), keep


def isft_loss(
    logprobs: Tensor,
    response_mask: Tensor,
    correct: Tensor,
    *,
    mode: str = "+-",
    weighting: str = "constant",
    advantages: Tensor | None = None,
    pos_weight: float = 1.0,
    neg_weight: float = 1.0,
    aggregation: str = "token_mean",
    max_len: int | None = None,
    num_tokens: int | float | Tensor | None = None,
    num_seqs: int | float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Filtered (iterative) SFT loss ``aggregate(-w_i log pi(o_it))`` over the kept responses.

    ``logprobs`` (B, T) are the current policy's token log-probs, ``correct`` (B,) bool the verifier's verdict.
    For exact gradient accumulation pass ``num_tokens`` / ``num_seqs`` counted over the *kept* responses of the
    whole minibatch (:func:`kept_counts`). Metrics: ``isft/loss``, ``isft/num_pos``, ``isft/num_neg`` (kept),
    ``isft/nll_pos``, ``isft/nll_neg`` (mean per-token negative log-likelihood of kept positives / negatives).
    """
    mask = response_mask.to(torch.bool)
    if logprobs.shape != mask.shape or correct.shape != mask.shape[:1]:
        raise TokenMDPError(
            f"isft_loss: logprobs {tuple(logprobs.shape)} must match response_mask {tuple(mask.shape)} and "
            f"correct must be (B,), got {tuple(correct.shape)}"
        )
    w, keep = isft_weights(correct, mode=mode, weighting=weighting, advantages=advantages,
                           pos_weight=pos_weight, neg_weight=neg_weight)
    kept_mask = mask & keep.unsqueeze(-1)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    logp = torch.where(kept_mask, logprobs, zero)
    loss_tok = -w.to(logprobs.dtype).unsqueeze(-1) * logp
    if num_seqs is None:
        num_seqs = int(keep.sum())
    # sequence-based aggregations must only see the kept rows (dropped rows have all-zero masks anyway)
    loss = aggregate(loss_tok, kept_mask, aggregation=aggregation, max_len=max_len,
                     num_tokens=num_tokens, num_seqs=num_seqs)
    with torch.no_grad():
        correct_b = correct.to(torch.bool).unsqueeze(-1)
        pos, neg = kept_mask & correct_b, kept_mask & ~correct_b
        metrics = {
            "isft/loss": float(loss.detach()),
            "isft/num_pos": float((keep & correct.to(torch.bool)).sum()),
            "isft/num_neg": float((keep & ~correct.to(torch.bool)).sum()),
            "isft/nll_pos": float(-logp.detach()[pos].mean()) if pos.any() else 0.0,
            "isft/nll_neg": float(-logp.detach()[neg].mean()) if neg.any() else 0.0,
        }
    return loss, metrics


def kept_counts(response_mask: Tensor, correct: Tensor, *, mode: str) -> tuple[int, int]:
    """``(num_tokens, num_seqs)`` of the responses that ``mode`` keeps: the normalisers for micro-batching."""
    if mode not in ISFT_MODES:
        raise TokenMDPError(f"unknown isft mode {mode!r}; choose from {', '.join(ISFT_MODES)}")
    correct = correct.to(torch.bool)
    keep = {"+": correct, "-": ~correct, "+-": torch.ones_like(correct)}[mode]
    return int((response_mask.to(torch.bool) & keep.unsqueeze(-1)).sum()), int(keep.sum())


__all__ = ["ISFT_MODES", "ISFT_WEIGHTINGS", "isft_loss", "isft_weights", "kept_counts"]
