"""Per-token log-probabilities and entropies of a response under a causal language model.

The state of the token MDP before response token ``t`` is ``s_t = (x, y_<t)``; the policy's log-probability of
the action taken there is

    logprobs[b, t] = log pi(y_t | x, y_<t) = z[y_t] / tau - logsumexp_v(z[v] / tau),

with ``z`` the model's logits at the position that predicts ``y_t`` and ``tau`` the sampling temperature, and the
entropy of that next-token distribution is

    entropy[b, t] = logsumexp(z / tau) - sum_v softmax(z / tau)[v] * z[v] / tau.

A full ``(B, T, V)`` float32 log-softmax is never built: the backbone's last hidden states of the ``N`` counted
response tokens are gathered into an ``(N, H)`` matrix and pushed through the output head ``chunk_size`` rows at a
time, so the peak extra memory is ``chunk_size x V`` floats. Under autograd each chunk is checkpointed, so the
backward pass recomputes the chunk's logits instead of keeping all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tokenmdp.policy.fused_layers import fused_backbone

#: Extra float32 memory that one chunk of logits may take when ``chunk_size`` is not given (bytes).
CHUNK_BYTES = 256 * 2**20


@dataclass
class HeadParts:
    """A causal LM split into its backbone (hidden states), output head and any final logit transform."""

    backbone: nn.Module
    head: nn.Module
    transform: Callable[[torch.Tensor], torch.Tensor] | None


def split_causal_lm(model: nn.Module) -> HeadParts:
    """Split a transformers causal LM into backbone and output head.

    Handles the logit transforms some architectures apply after the head: Gemma-2/3 soft-capping
    (``c * tanh(z / c)``), Cohere's ``logit_scale`` (multiply) and Granite's ``logits_scaling`` (divide).
    """
    prefix = getattr(model, "base_model_prefix", "model")
    backbone = getattr(model, prefix, None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or head is None or backbone is model:
        raise TypeError(f"cannot find the backbone and output head of {type(model).__name__}")
    backbone = fused_backbone(model) or backbone  # optim.fused_layers (tokenmdp.policy.fused_layers.enable)
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None) if "cohere" in type(model).__name__.lower() else None
    div = getattr(cfg, "logits_scaling", None)

    transform = None
    if cap or scale or div:

        def transform(z: torch.Tensor) -> torch.Tensor:
            if scale:
                z = z * scale
            if div:
                z = z / div
            if cap:
                z = torch.tanh(z / cap) * cap
            return z

    return HeadParts(backbone, head, transform)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token among the unmasked tokens of its row: ``cumsum(mask) - 1``, clamped at 0.

    ``[[0, 0, 1, 1, 1]] -> [[0, 0, 0, 1, 2]]``; a right-padded prompt followed by a response,
    ``[[1, 1, 0, 1]] -> [[0, 1, 1, 2]]``, gives the response token position 2, as if the pad were absent.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def predictor_index(attention_mask: torch.Tensor, start: int) -> torch.Tensor:
    """For each column ``j >= start``, the index of the last unmasked column before ``j`` (its predictor).

    With a left-padded prompt this is just ``j - 1``; with a right-padded prompt, ``[[1, 1, 0, 0 | r0, r1]]``,
    the predictor of ``r0`` (column 4) is column 1, the last real prompt token. Returns ``(B, L - start)``;
    ``-1`` where no earlier column is unmasked.
    """
    length = attention_mask.shape[1]
    idx = torch.arange(length, device=attention_mask.device).expand_as(attention_mask)
    last_valid = torch.where(attention_mask.bool(), idx, torch.full_like(idx, -1)).cummax(dim=1).values
    return last_valid[:, start - 1 : length - 1]


def _chunk_stats(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: nn.Module,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    temperature: float,
    want_entropy: bool,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``targets`` (N,) and entropy (N,) (zeros unless wanted) for hidden states (N, H). Without
    ``entropy_grad`` the entropy is computed outside autograd: a metric then keeps no (N, V) softmax alive."""
    logits = head(hidden)
    if transform is not None:
        logits = transform(logits)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if want_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            probs = torch.softmax(logits, dim=-1)
            entropy = lse - (probs * logits).sum(-1)
    else:
        entropy = torch.zeros_like(logp)
    return logp, entropy


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    parts: HeadParts,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked log-probs (N,) and entropies (N,) of ``targets`` given predictor hidden states ``hidden`` (N, H)
    (entropies without gradient unless ``entropy_grad``)."""
    n = hidden.shape[0]
    vocab = parts.head.weight.shape[0] if hasattr(parts.head, "weight") else hidden.shape[-1]
    if chunk_size is None:
        chunk_size = max(1, CHUNK_BYTES // (4 * vocab))
    use_ckpt = torch.is_grad_enabled() and hidden.requires_grad and n > chunk_size
    out_lp, out_ent = [], []
    for s in range(0, n, chunk_size):
        args = (hidden[s : s + chunk_size], targets[s : s + chunk_size])
        fn = lambda h, y: _chunk_stats(h, y, parts.head, parts.transform, temperature,  # noqa: E731
                                       return_entropy, entropy_grad)
        lp, ent = checkpoint(fn, *args, use_reentrant=False) if use_ckpt else fn(*args)
        out_lp.append(lp)
        out_ent.append(ent)
    if n == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if return_entropy else None)
    logp = torch.cat(out_lp)
    return logp, (torch.cat(out_ent) if return_entropy else None)


def _final_states(model: nn.Module, input_ids: torch.Tensor, attn: torch.Tensor) -> tuple[HeadParts, torch.Tensor]:
    """The backbone's last hidden states (B, L, H) and the head to apply to them; for a model that cannot be split
    (a wrapper without ``get_output_embeddings``) the full logits (B, L, V) and an identity head."""
    kw = dict(input_ids=input_ids, attention_mask=attn, position_ids=position_ids_from_mask(attn), use_cache=False)
    try:
        parts = split_causal_lm(model)
    except TypeError:
        parts = None
    if parts is not None:
        out = parts.backbone(**kw)
        if getattr(out, "last_hidden_state", None) is not None:
            return parts, out.last_hidden_state
    return HeadParts(backbone=model, head=nn.Identity(), transform=None), model(**kw).logits


def sequence_logprobs(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    context_mask: torch.Tensor | None = None,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced log pi(y_t | x, y_<t) of every response token, in one forward pass.

    Parameters
    ----------
    model : a transformers causal LM (its backbone and output head are used separately).
    prompt_ids, prompt_mask : (B, P), usually left-padded (right padding works too: each response token is
        predicted from the last unmasked column before it, and position ids come from the attention mask).
    response_ids, response_mask : (B, T), right-padded; the mask is also the response's attention mask.
    context_mask : (B, T), optional: the response's attention mask when it differs from ``response_mask`` (a
        multi-turn episode, :mod:`tokenmdp.mdp.env`: the environment's observation tokens are attended to but not
        scored). Only tokens where ``response_mask`` is 1 get a log-prob.
    temperature : the log-probs and entropies are those of ``softmax(logits / temperature)``; 0 means 1 (greedy
        decoding is scored under the untempered logits).
    return_entropy : also return the entropy of each next-token distribution.
    entropy_grad : whether that entropy carries a gradient (False: a metric only; the loss does not use it, and
        its (N, V) softmax is not kept for the backward pass).
    chunk_size : how many response tokens go through the output head at once; default: as many as fit in 256 MiB
        of float32 logits (the whole batch for a char vocabulary, ~440 tokens for a 152k vocabulary).

    Returns
    -------
    ``(logprobs (B, T) float32, entropy (B, T) float32 or None)``, zeros where ``response_mask`` is 0.

    Example checked by the tests: for a model whose head gives every position the logits ``[0, ln 2, ln 3]``
    (V = 3), the log-prob of token 2 is ``ln 3 - ln 6 = -0.6931`` and the entropy is
    ``ln 6 - (2 ln 2 + 3 ln 3) / 6 = 1.0114``.
    """
    if temperature <= 0:
        temperature = 1.0
    p_len, t_len = prompt_ids.shape[1], response_ids.shape[1]
    if t_len == 0:
        return counted_logprobs(None, None, response_ids, None, temperature=temperature,
                                return_entropy=return_entropy, chunk_size=chunk_size, entropy_grad=entropy_grad)
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attn = torch.cat([prompt_mask, response_mask if context_mask is None else context_mask], dim=1).long()
    parts, hidden = _final_states(model, input_ids, attn)
    pred = predictor_index(attn, p_len)  # (B, T)
    counted = response_mask.bool() & (pred >= 0)
    rows, cols = counted.nonzero(as_tuple=True)
    return counted_logprobs(hidden[rows, pred[rows, cols]], (rows, cols), response_ids, parts,
                            temperature=temperature, return_entropy=return_entropy, chunk_size=chunk_size,
                            entropy_grad=entropy_grad)


def counted_logprobs(
    hidden: torch.Tensor | None,
    where: tuple[torch.Tensor, torch.Tensor] | None,
    response_ids: torch.Tensor,
    parts: HeadParts | None,
    *,
    temperature: float,
    return_entropy: bool,
    chunk_size: int | None,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``(B, T)`` log-probs (and entropies) of :func:`sequence_logprobs` from the predictor hidden states
    ``hidden`` (N, H) of the ``N`` counted response tokens at ``where = (rows, cols)``; zeros elsewhere
    (``hidden=None``: no token is counted)."""
    out_lp = torch.zeros(response_ids.shape, dtype=torch.float32, device=response_ids.device)
    out_ent = torch.zeros_like(out_lp) if return_entropy else None
    if hidden is None:
        return out_lp, out_ent
    rows, cols = where
    logp, ent = token_logprobs_from_hidden(hidden, response_ids[rows, cols], parts, temperature=temperature,
                                           return_entropy=return_entropy, chunk_size=chunk_size,
                                           entropy_grad=entropy_grad)
    out_lp = out_lp.index_put((rows, cols), logp)
    if return_entropy:
        out_ent = out_ent.index_put((rows, cols), ent)
    return out_lp, out_ent

__all__ = [
    "sequence_logprobs",
    "counted_logprobs",
    "token_logprobs_from_hidden",
    "split_causal_lm",
    "position_ids_from_mask",
    "predictor_index",
    "HeadParts",
]
