"""How a batch is cut into micro-batches (``optim.micro_batch_size`` rows, ``optim.micro_batch_tokens`` tokens of
forward pass): longest rows first, a shared prompt's group kept together, and the ``auto`` token budget that keeps
one micro-batch's saved activations within a share of the device's memory. The update does not depend on the
cut (the normalisers are the minibatch's); its memory does."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch import nn

from tokenmdp.rollout.types import Rollout


def micro_batches(rows: torch.Tensor, size: int, lengths: torch.Tensor | None = None,
                  groups: torch.Tensor | None = None, prompt_lengths: torch.Tensor | None = None, *,
                  max_tokens: int | None = None) -> Iterator[torch.Tensor]:
    """``rows`` cut into chunks of ``size``; with ``lengths`` (per row of the batch), longest rows first, so that
    each micro-batch holds rows of similar length and little padding (the result does not depend on the order:
    the normalisers are those of the whole minibatch). With ``groups`` (a group id per row of the batch), the rows
    of a group are kept next to each other (groups longest first), so that a micro-batch holds whole groups
    where ``size`` allows (``optim.shared_prompt`` then runs each group's prompt once). With ``max_tokens`` (and
    ``lengths``) a micro-batch also holds at most that many tokens of forward pass (:func:`_pass_tokens`: its rows
    times its longest row; with ``groups`` and ``prompt_lengths``, each group's prompt once), a row longer than
    the budget alone: ``lengths [9, 5, 4, 2]``, ``size 4``, ``max_tokens 12`` -> ``[9], [5, 4], [2]``. Rows that
    fit one micro-batch stay in their order (a budget that does not bind changes nothing, bit for bit)."""
    shared = groups is not None and prompt_lengths is not None
    if max_tokens is not None and lengths is not None and len(rows) <= size:
        if _pass_tokens(*_per_row(rows, lengths, groups, prompt_lengths, shared), shared) <= max_tokens:
            max_tokens = None  # one micro-batch as it is
    if (len(rows) > size or max_tokens is not None) and (lengths is not None or groups is not None):
        rows = rows[_order(rows, lengths, groups).to(rows.device)]
    if max_tokens is None or lengths is None:
        for start in range(0, len(rows), size):
            yield rows[start : start + size]
        return
    length, prompt, group = _per_row(rows, lengths, groups, prompt_lengths, shared)
    start = 0
    while start < len(rows):
        end = _cut_end(start, length, prompt, group, size, max_tokens, shared)
        yield rows[start:end]
        start = end


def prompt_chunks(rows: torch.Tensor, lengths: torch.Tensor, groups: torch.Tensor, prompt_lengths: torch.Tensor, *,
                  max_tokens: int | None = None) -> Iterator[torch.Tensor]:
    """``rows`` cut into chunks of whole groups whose distinct prompts run in one pass (``optim.shared_prompt``,
    :class:`tokenmdp.policy.shared_prompt.PromptPass`), groups longest first: all of them in one chunk without
    ``max_tokens``; with it, as many groups as keep the prompt pass (distinct prompts x the longest prompt) within
    half of ``max_tokens``, the other half left to the chunk's response micro-batches (a group whose prompt alone
    is longer is a chunk by itself). Groups ``[a a b b c c]``, prompts ``[4 4 3 3 5 5]``, ``max_tokens 20`` ->
    ``[a a b b], [c c]`` (2 x 4 = 8 <= 10; 3 x 5 = 15 > 10)."""
    if len(rows) == 0:
        return
    rows = rows[_order(rows, lengths, groups).to(rows.device)]
    if max_tokens is None:
        yield rows
        return
    _, prompt, group = _per_row(rows, lengths, groups, prompt_lengths, True)
    start, seen, longest = 0, set(), 0
    for i, (g, p) in enumerate(zip(group, prompt)):
        if g not in seen and seen and (len(seen) + 1) * max(longest, p) > max_tokens // 2:
            yield rows[start:i]
            start, seen, longest = i, set(), 0
        seen.add(g)
        longest = max(longest, p)
    yield rows[start:]


def _per_row(rows: torch.Tensor, lengths: torch.Tensor, groups: torch.Tensor | None,
             prompt_lengths: torch.Tensor | None, shared: bool) -> tuple[list, list, list]:
    """``(length, prompt length, group)`` of each of ``rows``, as lists (prompts 0 and every row its own group
    unless ``shared``)."""
    idx = rows.to(lengths.device)
    length = lengths.index_select(0, idx).cpu().tolist()
    if not shared:
        return length, [0] * len(length), list(range(len(length)))
    prompt = prompt_lengths.to(lengths.device).index_select(0, idx).cpu().tolist()
    return length, prompt, groups.to(lengths.device).index_select(0, idx).cpu().tolist()


def _cut_end(start: int, length: list, prompt: list, group: list, size: int, max_tokens: int, shared: bool) -> int:
    """Where the micro-batch that begins at row ``start`` ends: rows are added while the pass stays within
    ``size`` rows and ``max_tokens`` tokens (:func:`_pass_tokens`); a group the token budget would split is left
    whole for the next micro-batch when the micro-batch holds another one before it and the group fits one."""
    seen, long_p, long_r, end, by_tokens = set(), 0, 0, start, False
    for i in range(start, len(length)):
        with_seen = len(seen | {group[i]}) if shared else i - start + 1
        with_p, with_r = max(long_p, prompt[i]), max(long_r, length[i] - prompt[i])
        if i > start and i - start >= size:
            break
        if i > start and with_seen * with_p + (i - start + 1) * with_r > max_tokens:
            by_tokens = True
            break
        seen.add(group[i])
        long_p, long_r, end = with_p, with_r, i + 1
    if shared and by_tokens and group[end] == group[end - 1]:
        first = next(j for j in range(end - 1, start - 1, -1) if j == start or group[j - 1] != group[j])
        after = next((j for j in range(end, len(length)) if group[j] != group[first]), len(length))
        alone = _pass_tokens(length[first:after], prompt[first:after], group[first:after], shared)
        if first > start and after - first <= size and alone <= max_tokens:
            end = first  # the split group starts after a whole one and fits a micro-batch: it goes there whole
    return end


#: Float values one token keeps for the backward pass in one Llama-family block (attention, SwiGLU MLP, the
#: norms; LoRA or full fine-tuning): about 14 x hidden + 9 x intermediate, counted on SmolLM2-135M-Instruct
#: (9.4 GiB for 16 rows of 234 tokens, 30 layers; benchmarks/RESULTS.md, "Where the update's memory goes")
SAVED_PER_HIDDEN, SAVED_PER_INTERMEDIATE = 14, 9
#: ``optim.micro_batch_tokens: auto`` lets one micro-batch's saved activations take this share of the device's
#: memory (a CUDA device's, else the machine's RAM)
AUTO_MEMORY_SHARE = 1 / 8


def auto_micro_batch_tokens(model: nn.Module, device: torch.device | str, *, half: bool = False,
                            checkpointing: bool = False) -> int | None:
    """``optim.micro_batch_tokens: auto``: the tokens of forward pass whose saved activations fill
    :data:`AUTO_MEMORY_SHARE` of the device's memory, from the model's config (layers, hidden and intermediate
    sizes; 2 bytes a value under ``half`` precision, else 4; with gradient checkpointing each layer keeps only
    its input, and one layer's activations live at a time: ``checkpointing``). None (no cap) for a config
    without those sizes."""
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not (isinstance(layers, int) and isinstance(hidden, int)):
        return None
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
    block = SAVED_PER_HIDDEN * hidden + SAVED_PER_INTERMEDIATE * inter
    per_token = (layers * hidden + block if checkpointing else layers * block) * (2 if half else 4)
    device = torch.device(device)
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, int(memory * AUTO_MEMORY_SHARE // per_token))


def _pass_tokens(length: list, prompt: list, group: list, shared: bool) -> int:
    """Tokens the forward pass of a micro-batch of these rows runs, padding included: rows x the longest row; with
    the shared prompt, the distinct prompts x the longest prompt + rows x the longest response. (:func:`_cut_end`
    adds up the same sum row by row.)"""
    if not length:
        return 0
    if not shared:
        return len(length) * max(length)
    return len(set(group)) * max(prompt) + len(length) * max(n - p for n, p in zip(length, prompt))


def _order(rows: torch.Tensor, lengths: torch.Tensor | None, groups: torch.Tensor | None) -> torch.Tensor:
    """Positions of ``rows`` in micro-batch order: by length, descending; with ``groups``, group after group, each
    group at the length of its longest row (ties: first seen first; a group's rows in their order)."""
    n = len(rows)
    length = torch.zeros(n, dtype=torch.long) if lengths is None else lengths.index_select(
        0, rows.to(lengths.device)).cpu().long()
    if groups is None:
        return torch.argsort(length, descending=True, stable=True)
    group = groups.index_select(0, rows.to(groups.device)).cpu().long()
    longest = torch.zeros(int(group.max()) + 1, dtype=torch.long).scatter_reduce(0, group, length, reduce="amax")
    order = torch.argsort(group, stable=True)
    return order[torch.argsort(longest[group[order]], descending=True, stable=True)]


def row_lengths(rollout: Rollout) -> torch.Tensor:
    """Prompt plus response tokens of each row (B,): the cost of its forward pass."""
    return rollout.prompt_mask.sum(dim=1) + rollout.context_mask.sum(dim=1)


__all__ = ["AUTO_MEMORY_SHARE", "auto_micro_batch_tokens", "micro_batches", "prompt_chunks", "row_lengths"]
