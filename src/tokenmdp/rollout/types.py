"""The `Rollout` batch that every engine returns, the engine interface and the engines' shared helpers
(padding is :mod:`tokenmdp.rollout.padding`).

A rollout holds ``B`` episodes of the token MDP: the prompt ``x`` (left-padded), the sampled response ``y``
(right-padded), the behaviour policy's log-probabilities ``log pi_old(y_t | x, y_<t)`` of the sampled tokens under
``logits / temperature``, and how each episode ended: ``terminated`` (EOS sampled; the EOS token is part of the
response and of its mask) or ``truncated`` (``max_new_tokens`` reached without EOS). Row ``i * n + j`` is sample
``j`` of prompt ``i``, so the groups of group-relative methods are contiguous.

A multi-turn episode (:mod:`tokenmdp.mdp.env`, :mod:`tokenmdp.rollout.multiturn`) is still one row: its response
is the policy's turns and the environment's observation tokens in order, ``response_mask`` is 1 on the policy's
tokens only (the actions: every loss, advantage and normaliser counts them and nothing else) and
``observation_mask`` is 1 on the environment's tokens (in the context the model attends to, never in a loss;
``logprobs`` are 0 there). ``context_mask = response_mask | observation_mask`` is the response's attention mask.
A single-turn rollout has ``observation_mask = None`` (no observation anywhere).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from collections.abc import Sequence

import numpy as np
import torch

from tokenmdp.errors import TokenMDPError
from tokenmdp.rollout.padding import left_pad, repad, response_mask_from_eos

_TENSORS = (
    "prompt_ids",
    "prompt_mask",
    "response_ids",
    "response_mask",
    "logprobs",
    "terminated",
    "truncated",
)


@dataclass
class Rollout:
    """A batch of ``B`` sampled episodes (see the module docstring); all tensors on one device.

    ``pad_token_id`` is only used to pad ids when rollouts are concatenated.
    """

    prompt_ids: torch.Tensor  # (B, P) long, left-padded
    prompt_mask: torch.Tensor  # (B, P) long
    response_ids: torch.Tensor  # (B, T) long, right-padded
    response_mask: torch.Tensor  # (B, T) long, 1 on generated tokens (EOS included)
    logprobs: torch.Tensor  # (B, T) float32, 0 on padding
    terminated: torch.Tensor  # (B,) bool
    truncated: torch.Tensor  # (B,) bool
    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    pad_token_id: int = 0
    observation_mask: torch.Tensor | None = None  # (B, T) long, 1 on environment tokens (multi-turn), else None

    def __post_init__(self) -> None:
        b = self.prompt_ids.shape[0]
        if self.observation_mask is not None:
            if self.observation_mask.shape != self.response_ids.shape:
                raise ValueError("Rollout.observation_mask must have the shape of response_ids")
            if bool((self.observation_mask.bool() & self.response_mask.bool()).any()):
                raise ValueError("Rollout.observation_mask and response_mask overlap: a token is either the "
                                 "policy's action or the environment's observation")
        for name in _TENSORS:
            t = getattr(self, name)
            if t.shape[0] != b:
                raise ValueError(f"Rollout.{name} has {t.shape[0]} rows, prompt_ids has {b}")
        if self.response_ids.shape != self.response_mask.shape or self.logprobs.shape != self.response_ids.shape:
            raise ValueError("Rollout.response_ids, response_mask and logprobs must have the same shape")
        if self.prompt_ids.shape != self.prompt_mask.shape:
            raise ValueError("Rollout.prompt_ids and prompt_mask must have the same shape")
        for name in ("prompts", "responses"):
            if len(getattr(self, name)) not in (0, b):
                raise ValueError(f"Rollout.{name} has {len(getattr(self, name))} entries for {b} rows")

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def device(self) -> torch.device:
        return self.response_ids.device

    @property
    def lengths(self) -> torch.Tensor:
        """Number of counted response tokens of each row (B,), EOS included (the policy's tokens only)."""
        return self.response_mask.sum(dim=1)

    @property
    def context_mask(self) -> torch.Tensor:
        """(B, T) attention mask of the response: the policy's tokens and the environment's observations."""
        if self.observation_mask is None:
            return self.response_mask
        return self.response_mask | self.observation_mask.to(self.response_mask.dtype)

    def _extent(self) -> torch.Tensor:
        """(B,) index past the last token (policy or observation) of each row's response."""
        ctx = self.context_mask.bool()
        cols = torch.arange(1, ctx.shape[1] + 1, device=ctx.device).expand_as(ctx)
        return torch.where(ctx, cols, torch.zeros_like(cols)).amax(dim=1) if ctx.shape[1] else ctx.sum(1)

    def select(self, index: torch.Tensor | Sequence[int] | slice) -> Rollout:
        """The rows ``index`` (a slice, a list of ints, an index tensor or a boolean mask), as a new rollout."""
        if isinstance(index, slice):
            rows = list(range(len(self)))[index]
        else:
            idx = torch.as_tensor(index)
            if idx.dtype == torch.bool:
                idx = idx.nonzero(as_tuple=True)[0]
            rows = idx.tolist()
        ix = torch.tensor(rows, dtype=torch.long, device=self.device)
        kw = {name: getattr(self, name).index_select(0, ix) for name in _TENSORS}
        return Rollout(
            **kw,
            prompts=[self.prompts[i] for i in rows] if self.prompts else [],
            responses=[self.responses[i] for i in rows] if self.responses else [],
            pad_token_id=self.pad_token_id,
            observation_mask=None if self.observation_mask is None else self.observation_mask.index_select(0, ix),
        )

    def to(self, device: torch.device | str) -> Rollout:
        """A copy with every tensor on ``device``."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in _TENSORS:
            kw[name] = kw[name].to(device)
        if self.observation_mask is not None:
            kw["observation_mask"] = self.observation_mask.to(device)
        return Rollout(**kw)

    def full_sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[prompt | response]`` ids and attention mask, (B, P + T) each."""
        ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        mask = torch.cat([self.prompt_mask, self.response_mask], dim=1)
        return ids, mask

    def trimmed(self) -> Rollout:
        """Drop prompt columns that are padding in every row and response columns past the longest response."""
        p_keep = int(self.prompt_mask.sum(1).max().item()) if len(self) else 0
        t_keep = int(self._extent().max().item()) if len(self) else 0
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        p0 = self.prompt_ids.shape[1] - p_keep
        kw["prompt_ids"], kw["prompt_mask"] = self.prompt_ids[:, p0:], self.prompt_mask[:, p0:]
        for name in ("response_ids", "response_mask", "logprobs"):
            kw[name] = getattr(self, name)[:, :t_keep]
        if self.observation_mask is not None:
            kw["observation_mask"] = self.observation_mask[:, :t_keep]
        return Rollout(**kw)


def concat_rollouts(rollouts: Sequence[Rollout]) -> Rollout:
    """Stack rollouts row-wise, re-padding prompts on the left and responses on the right to common widths."""
    if not rollouts:
        raise ValueError("concat_rollouts needs at least one rollout")
    pad = rollouts[0].pad_token_id
    p = max(r.prompt_ids.shape[1] for r in rollouts)
    t = max(r.response_ids.shape[1] for r in rollouts)

    def cat(name: str, width: int, value: int | float, left: bool) -> torch.Tensor:
        return torch.cat([repad(getattr(r, name), width, value, left=left) for r in rollouts])

    observed = any(r.observation_mask is not None for r in rollouts)
    obs = None
    if observed:
        obs = torch.cat([repad(r.observation_mask if r.observation_mask is not None
                                else torch.zeros_like(r.response_mask), t, 0, left=False) for r in rollouts])
    has_text = all(len(r.prompts) == len(r) for r in rollouts)
    has_resp = all(len(r.responses) == len(r) for r in rollouts)
    return Rollout(
        prompt_ids=cat("prompt_ids", p, pad, True),
        prompt_mask=cat("prompt_mask", p, 0, True),
        response_ids=cat("response_ids", t, pad, False),
        response_mask=cat("response_mask", t, 0, False),
        logprobs=cat("logprobs", t, 0.0, False),
        terminated=torch.cat([r.terminated for r in rollouts]),
        truncated=torch.cat([r.truncated for r in rollouts]),
        prompts=[s for r in rollouts for s in r.prompts] if has_text else [],
        responses=[s for r in rollouts for s in r.responses] if has_resp else [],
        pad_token_id=pad,
        observation_mask=obs,
    )


def pack_rollout(rollout: Rollout) -> dict:
    """A rollout as plain data (numpy arrays, lists): it crosses processes and goes into checkpoints by value."""
    return {f.name: (v.detach().cpu().numpy() if isinstance(v := getattr(rollout, f.name), torch.Tensor) else v)
            for f in fields(rollout)}


def unpack_rollout(data: dict, device) -> Rollout:
    """The :class:`Rollout` of :func:`pack_rollout` on ``device``."""
    kw = {k: (torch.from_numpy(np.array(v)).to(device) if isinstance(v, np.ndarray) else v) for k, v in data.items()}
    return Rollout(**kw)


def check_sampling(*, n: int, max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    """Raise :class:`TokenMDPError` naming the first invalid sampling argument."""
    if int(n) < 1:
        raise TokenMDPError(f"n must be >= 1, got {n}")
    if int(max_new_tokens) < 1:
        raise TokenMDPError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise TokenMDPError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise TokenMDPError(f"top_p must be in (0, 1], got {top_p}")
    if int(top_k) < 0:
        raise TokenMDPError(f"top_k must be >= 0 (0 = off), got {top_k}")


def eos_token_ids(model: torch.nn.Module, tokenizer, eos: int | Sequence[int] | None = None) -> list[int]:
    """The token ids that end an episode: ``eos`` if given, else the model's generation config, else the
    tokenizer's EOS. A chat model may have several (e.g. ``<|im_end|>`` and ``<|endoftext|>``)."""
    if eos is None:
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise TokenMDPError("the tokenizer has no eos_token and no eos_token_id was given to the engine")
    ids = [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, falling back to its EOS id."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad) if pad is not None else 0


def encode_prompts(tokenizer, prompts: Sequence[str], *, n: int = 1, device: torch.device | str = "cpu",
                   add_special_tokens: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize ``prompts``, left-pad them and repeat each ``n`` times (row ``i * n + j``): (ids, mask), (B, P).

    ``add_special_tokens=None`` adds the tokenizer's special tokens (e.g. a BOS) unless the prompt text already
    starts with the BOS token (a rendered chat template).
    """
    if isinstance(prompts, str):
        raise TokenMDPError("prompts must be a list of strings, got a single string")
    if len(prompts) == 0:
        raise TokenMDPError("prompts is empty")
    bos = getattr(tokenizer, "bos_token", None)
    rows = []
    for i, text in enumerate(prompts):
        add = add_special_tokens if add_special_tokens is not None else not (bos and text.startswith(bos))
        ids = tokenizer(text, add_special_tokens=add)["input_ids"]
        if len(ids) == 0:
            raise TokenMDPError(f"prompt {i} is empty after tokenization")
        rows.append(ids)
    ids = left_pad(rows, pad_token_id(tokenizer), dtype=torch.long)
    mask = left_pad([[1] * len(r) for r in rows], 0, dtype=torch.long)
    if n > 1:
        ids, mask = ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)
    return ids.to(device), mask.to(device)


def build_rollout(tokenizer, prompts: Sequence[str], n: int, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                  response_ids: torch.Tensor, logprobs: torch.Tensor, eos_ids: Sequence[int],
                  valid: torch.Tensor | None = None) -> Rollout:
    """Assemble a :class:`Rollout` from raw sampled ids: mask after the first EOS, zero the padding, decode.

    ``valid`` (B, T) marks the columns actually generated for each row (default: all).
    """
    pad = pad_token_id(tokenizer)
    mask, terminated = response_mask_from_eos(response_ids, eos_ids, valid)
    ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad))
    lps = (logprobs.float() * mask).contiguous()
    texts = tokenizer.batch_decode(
        [row[: int(m.sum())].tolist() for row, m in zip(ids.cpu(), mask.cpu())],
        skip_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=ids,
        response_mask=mask,
        logprobs=lps,
        terminated=terminated,
        truncated=~terminated,
        prompts=[p for p in prompts for _ in range(n)],
        responses=texts,
        pad_token_id=pad,
    )


class Engine(ABC):
    """A sampler of rollouts: ``generate(prompts, n=..., ...) -> Rollout``.

    Temperature 0 is greedy decoding; the returned log-probs are then those of the untempered logits.
    """

    name: str = "engine"

    @abstractmethod
    def generate(
        self,
        prompts: list[str],
        *,
        n: int = 1,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> Rollout:
        """Sample ``n`` responses for each prompt; row ``i * n + j`` is sample ``j`` of prompt ``i``."""

    def sample_ids(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, n: int = 1, max_new_tokens: int,
                   temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                   stop_ids: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``n`` continuations of each row of left-padded token ids; raw ids and log-probs (B * n, steps),
        each row stopped at its first EOS or ``stop_ids`` token. The turns of multi-turn episodes
        (:mod:`tokenmdp.rollout.multiturn`) need it; an engine without it cannot run them."""
        raise TokenMDPError(f"the {self.name!r} rollout engine cannot sample from token ids, so it cannot run a "
                            f"multi-turn environment (config field 'task.env.kind'): use rollout.engine 'fast' or 'hf'")

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights (a no-op for in-process engines)."""
        self.model = model


__all__ = [
    "Rollout",
    "Engine",
    "concat_rollouts",
    "pack_rollout",
    "unpack_rollout",
    "check_sampling",
    "eos_token_ids",
    "pad_token_id",
    "encode_prompts",
    "build_rollout",
]
