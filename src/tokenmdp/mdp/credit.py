"""Credit assignment: spreading a terminal reward over the response tokens.

Every function maps ``rewards`` of shape ``(B,)`` and a ``response_mask`` of shape ``(B, T)`` (1 on the tokens that
count, right padding 0) to ``token_rewards`` of shape ``(B, T)``, zero wherever the mask is 0. Every one of them
preserves the undiscounted return::

    sum_t token_rewards[i, t] == rewards[i]        for every row i with at least one valid token

(rows with no valid token get all zeros: there is no token to credit). ``T_i`` below is the number of valid tokens of
row ``i`` and ``k`` the position of a token among the valid tokens of its row (0 .. T_i - 1), counted with a
cumulative sum of the mask, so a mask with holes (tool output inside a response, say) is handled too.

* ``terminal``: ``r_k = R`` on the last valid token, 0 elsewhere (the verifier's view).
* ``uniform``: ``r_k = R / T_i`` on every valid token (the R1/GRPO assumption named by arXiv 2505.13697).
* ``discounted(gamma)``: ``r_k = R * gamma^(T_i-1-k) / sum_j gamma^(T_i-1-j)``, normalised discount weights:
  later tokens get more credit, and the weights sum to 1 so the return is kept. ``gamma = 1`` gives ``uniform``,
  ``gamma = 0`` gives ``terminal`` (``0^0 = 1``).
* ``process(step_rewards)``: per-step rewards from a step verifier, already placed on the token that ends each
  step (a ``(B, T)`` tensor, zero elsewhere). With ``final="residual"`` (the default) the last valid token gets
  ``R - sum_t step_rewards``, so the return is still ``R`` and the steps only move credit earlier; with
  ``final="add"`` the last token gets ``R`` on top of the step rewards and the return becomes
  ``R + sum_t step_rewards`` (a shaped reward, the one case that does not preserve the return; opt-in).

Hand-computed example checked by the tests: ``R = 3``, mask ``[1, 1, 1, 0]``:
terminal ``[0, 0, 3, 0]``; uniform ``[1, 1, 1, 0]``; discounted(0.5) ``[3/7, 6/7, 12/7, 0]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenmdp.errors import TokenMDPError

Tensor = torch.Tensor


def _check(rewards: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    if response_mask.dim() != 2:
        raise TokenMDPError(f"response_mask must have shape (B, T), got {tuple(response_mask.shape)}")
    if rewards.dim() != 1 or rewards.shape[0] != response_mask.shape[0]:
        raise TokenMDPError(
            f"rewards must have shape (B,) = ({response_mask.shape[0]},), got {tuple(rewards.shape)}"
        )
    mask = response_mask.to(torch.bool)
    dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    return rewards.to(dtype), mask


def _positions(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Position ``k`` of each valid token among its row's valid tokens, and ``T_i`` per row."""
    counts = mask.long().cumsum(dim=-1)
    lengths = counts[:, -1] if mask.shape[1] > 0 else torch.zeros(mask.shape[0], dtype=torch.long)
    return (counts - 1).clamp(min=0), lengths


def _last_token(mask: Tensor) -> Tensor:
    """A boolean (B, T) tensor, True on the last valid token of each row."""
    k, lengths = _positions(mask)
    return mask & (k == (lengths - 1).unsqueeze(-1))


def terminal(rewards: Tensor, response_mask: Tensor) -> Tensor:
    """``r_k = R`` on the last valid token. ``R = 3``, mask ``[1, 1, 1, 0]`` -> ``[0, 0, 3, 0]``."""
    rewards, mask = _check(rewards, response_mask)
    return torch.where(_last_token(mask), rewards.unsqueeze(-1), torch.zeros((), dtype=rewards.dtype))


def uniform(rewards: Tensor, response_mask: Tensor) -> Tensor:
    """``r_k = R / T_i`` on each valid token. ``R = 3``, mask ``[1, 1, 1, 0]`` -> ``[1, 1, 1, 0]``."""
    rewards, mask = _check(rewards, response_mask)
    _, lengths = _positions(mask)
    per_token = rewards / lengths.clamp(min=1).to(rewards.dtype)
    return torch.where(mask, per_token.unsqueeze(-1), torch.zeros((), dtype=rewards.dtype))


def discounted(rewards: Tensor, response_mask: Tensor, *, gamma: float) -> Tensor:
    """``r_k = R gamma^(T_i-1-k) / sum_j gamma^(T_i-1-j)``: normalised discount weights, return kept.

    ``R = 3``, mask ``[1, 1, 1, 0]``, ``gamma = 0.5``: weights ``[0.25, 0.5, 1] / 1.75`` -> ``[3/7, 6/7, 12/7, 0]``.
    """
    if not 0.0 <= float(gamma) <= 1.0:
        raise TokenMDPError(f"credit 'discounted': gamma must be in [0, 1], got {gamma}")
    rewards, mask = _check(rewards, response_mask)
    k, lengths = _positions(mask)
    exponent = (lengths.unsqueeze(-1) - 1 - k).clamp(min=0).to(rewards.dtype)
    weights = torch.pow(torch.as_tensor(float(gamma), dtype=rewards.dtype), exponent)
    weights = torch.where(mask, weights, torch.zeros((), dtype=rewards.dtype))
    total = weights.sum(dim=-1, keepdim=True)
    weights = weights / torch.where(total > 0, total, torch.ones((), dtype=rewards.dtype))
    return weights * rewards.unsqueeze(-1)


def process(
    rewards: Tensor, response_mask: Tensor, *, step_rewards: Tensor, final: str = "residual"
) -> Tensor:
    """Per-step rewards from a step verifier plus the final reward on the last valid token.

    ``step_rewards`` (B, T) holds each step's reward on the token that ends the step (0 elsewhere, and 0 wherever
    the mask is 0: a step reward on a padding token is an error, it would be lost). ``final="residual"``: the last
    token gets ``R - sum_t step_rewards`` (return kept). ``final="add"``: the last token gets ``R``, the return is
    ``R + sum_t step_rewards``.

    Hand example: ``R = 1``, mask ``[1, 1, 1, 1]``, step rewards ``[0, 0.5, 0, 0]``: residual
    ``[0, 0.5, 0, 0.5]``; add ``[0, 0.5, 0, 1]``.
    """
    rewards, mask = _check(rewards, response_mask)
    if step_rewards.shape != response_mask.shape:
        raise TokenMDPError(
            f"credit 'process': step_rewards must have the shape of response_mask {tuple(response_mask.shape)}, "
            f"got {tuple(step_rewards.shape)}"
        )
    steps = step_rewards.to(rewards.dtype)
    if bool(((steps != 0) & ~mask).any()):
        raise TokenMDPError("credit 'process': step_rewards has non-zero entries where response_mask is 0")
    if final == "residual":
        last = rewards - steps.sum(dim=-1)
    elif final == "add":
        last = rewards
    else:
        raise TokenMDPError(f"credit 'process': final must be 'residual' or 'add', got {final!r}")
    return steps + terminal(last, mask)


CREDIT: dict[str, Callable[..., Tensor]] = {
    "terminal": terminal,
    "uniform": uniform,
    "discounted": discounted,
    "process": process,
}
_KWARGS: dict[str, set[str]] = {
    "terminal": set(),
    "uniform": set(),
    "discounted": {"gamma"},
    "process": {"step_rewards", "final"},
}


def assign_credit(name: str, rewards: Tensor, response_mask: Tensor, **kw) -> Tensor:
    """Dispatch to the credit assignment ``name`` (``terminal``, ``uniform``, ``discounted``, ``process``).

    An unknown name or a keyword the chosen function does not take raises :class:`TokenMDPError` naming it.
    """
    if name not in CREDIT:
        raise TokenMDPError(f"unknown credit assignment {name!r}; choose from {', '.join(CREDIT)}")
    unknown = set(kw) - _KWARGS[name]
    if unknown:
        raise TokenMDPError(f"credit {name!r} takes no argument {sorted(unknown)[0]!r}")
    if name == "discounted" and "gamma" not in kw:
        raise TokenMDPError("credit 'discounted' needs gamma=")
    if name == "process" and "step_rewards" not in kw:
        raise TokenMDPError("credit 'process' needs step_rewards= (a (B, T) tensor)")
    return CREDIT[name](rewards, response_mask, **kw)


__all__ = ["terminal", "uniform", "discounted", "process", "assign_credit", "CREDIT"]
