"""Padding of token sequences: stacking rows left- or right-padded, re-padding a batch to a wider width, and
the mask of a sampled response's tokens up to its first EOS (what follows is padding)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_pad(seqs: Sequence[torch.Tensor | Sequence[int]], pad_value: int | float = 0, *, length: int | None = None,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """Stack 1-D sequences into ``(B, L)`` with padding on the left: ``[[1, 2], [3]] -> [[1, 2], [0, 3]]``."""
    rows = [torch.as_tensor(s, dtype=dtype) for s in seqs]
    width = max([len(r) for r in rows] + [0]) if length is None else length
    dt = dtype or (rows[0].dtype if rows else torch.long)
    out = torch.full((len(rows), width), pad_value, dtype=dt)
    for i, r in enumerate(rows):
        n = min(len(r), width)
        if n:
            out[i, width - n :] = r[len(r) - n :]
    return out


def right_pad(seqs: Sequence[torch.Tensor | Sequence[int]], pad_value: int | float = 0, *, length: int | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """Stack 1-D sequences into ``(B, L)`` with padding on the right: ``[[1, 2], [3]] -> [[1, 2], [3, 0]]``."""
    rows = [torch.as_tensor(s, dtype=dtype) for s in seqs]
    width = max([len(r) for r in rows] + [0]) if length is None else length
    dt = dtype or (rows[0].dtype if rows else torch.long)
    out = torch.full((len(rows), width), pad_value, dtype=dt)
    for i, r in enumerate(rows):
        n = min(len(r), width)
        out[i, :n] = r[:n]
    return out


def response_mask_from_eos(response_ids: torch.Tensor, eos_ids: Sequence[int], valid: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask (B, T) of the tokens up to and including the first EOS, and whether an EOS was found (B,).

    ``valid`` (B, T), optional, marks the columns that were generated at all (e.g. shorter rows of a batch).
    ``[[5, 1, 7]]`` with EOS 1 -> mask ``[[1, 1, 0]]``, terminated ``[True]``.
    """
    is_eos = torch.zeros_like(response_ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= response_ids == e
    if valid is not None:
        is_eos &= valid.bool()
    # number of EOS strictly before column t; a token counts while no EOS came before it
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = before == 0
    if valid is not None:
        mask &= valid.bool()
    return mask.long(), is_eos.any(dim=1)


def repad(t: torch.Tensor, width: int, value: int | float, *, left: bool) -> torch.Tensor:
    """``t`` (B, W) padded with ``value`` to ``width`` columns, on the left or on the right."""
    extra = width - t.shape[1]
    if extra == 0:
        return t
    pad = torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t] if left else [t, pad], dim=1)


__all__ = ["left_pad", "repad", "response_mask_from_eos", "right_pad"]
