"""The learner: the trained model with its optimizer, and everything that wraps the algorithm's math from outside.

An algorithm (:mod:`tokenmdp.train.algorithms`) says how a batch becomes a loss; the :class:`Learner` runs it on
the hardware: teacher-forced forward passes (mixed precision by ``accelerate``'s autocast, one prompt pass per
chunk of groups with ``optim.shared_prompt``, through the FSDP root when the policy is sharded), micro-batches cut
by rows and tokens (processes kept in lockstep under sharding), the backward pass, and the optimizer step (gradients
averaged over processes, clipped, a non-finite step skipped and counted in :class:`TrainerState`). None of these
branches inside an algorithm.

Exact gradient accumulation: a minibatch of rows is cut into micro-batches; every micro-batch loss is computed
with the normalisers of the whole minibatch (``num_seqs``, ``num_tokens``, :mod:`tokenmdp.algos.core`) and the
micro-batch gradients are summed, so the update equals the one of the whole minibatch in one pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from tokenmdp.algos.core import kl_penalty
from tokenmdp.policy.adapters import adapter_disabled
from tokenmdp.policy.logprobs import counted_logprobs, sequence_logprobs, split_causal_lm
from tokenmdp.policy.shared_prompt import PromptPass, backbone_support, grouped_sequence_logprobs, prompt_groups
from tokenmdp.rollout.types import Rollout
from tokenmdp.train.meter import MetricMeter, gather_parts, total_over_processes
from tokenmdp.train.micro import micro_batches, prompt_chunks, row_lengths
from tokenmdp.train.sharding import Sharding, grad_norm

@dataclass
class TrainerState:
    """The learner's running counters, saved in every checkpoint (``trainer_state.json``, key ``trainer``).

    ``nonfinite_steps``: optimizer steps skipped for a NaN or Inf loss or gradient; ``nonfinite_in_row``: how
    many of the latest were in a row (a finite step resets it); ``baseline``: REINFORCE's moving-average baseline.
    """

    nonfinite_steps: int = 0
    nonfinite_in_row: int = 0
    baseline: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict | None) -> TrainerState:
        data = data or {}
        return cls(int(data.get("nonfinite_steps", 0)), int(data.get("nonfinite_in_row", 0)), data.get("baseline"))


@contextmanager
def update_mode(model: nn.Module) -> Iterator[None]:
    """Inside the block, the switches of a loss's forward pass that the trainer's eval mode keeps off: the LoRA
    adapter's dropout, and gradient checkpointing of the decoder layers (transformers checkpoints a layer only
    in training mode). Only those modules are switched, never the model's own dropout, so sampling, the behaviour
    log-probs and the loss see the same base network. A no-op without gradients (nothing to recompute)."""
    if not torch.is_grad_enabled():
        yield
        return
    switched = [m for name, m in model.named_modules()
                if (isinstance(m, nn.Dropout) and "lora_dropout" in name and m.p > 0)
                or getattr(m, "gradient_checkpointing", False) is True]
    for m in switched:
        m.training = True  # this module only, not its children
    try:
        yield
    finally:
        for m in switched:
            m.training = False


def rows_of(rollout: Rollout, rows: torch.Tensor) -> Rollout:
    """The rows ``rows`` of ``rollout``, trimmed of all-padding response columns."""
    return rollout.select(rows.to(rollout.device)).trimmed()


def approx_kl(old_logprobs: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over valid tokens of ``rho - 1 - log rho`` with ``rho = pi / pi_old`` (k3 of KL(pi_old || pi))."""
    kl = kl_penalty(old_logprobs.detach(), logprobs.detach(), estimator="k3")
    m = mask.bool()
    return float(kl[m].mean()) if m.any() else 0.0


def zero_missing_grads(model) -> None:
    """Give every trainable parameter without a gradient a zero one, so that the optimizer step (AdamW's moments
    and weight decay) and the cross-process gradient average treat it as a zero gradient, not as absent."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def _sync_gradients(accelerator, params) -> None:
    """Average gradients over processes (the model is not wrapped in DDP: forward passes bypass ``forward``)."""
    if accelerator.num_processes <= 1:
        return
    for p in params:  # every parameter, a zero gradient where this process has none: the same calls everywhere
        p.grad = accelerator.reduce(p.grad if p.grad is not None else torch.zeros_like(p), reduction="mean")


@dataclass
class Learner:
    """The trained policy (``model``, as prepared by accelerate; under LoRA the HF model with its adapter layers,
    ``adapter`` the peft wrapper), its optimizer and schedule, the frozen reference, PPO's critic, and how the
    passes are cut and run (from the config's ``optim`` and ``rollout.temperature``)."""

    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    accelerator: Any
    temperature: float = 1.0
    micro_batch_size: int = 16
    micro_batch_tokens: int | None = None
    shared_prompt: bool = False
    max_grad_norm: float | None = 1.0
    needs_reference: bool = False
    ref_model: Any = None
    adapter: Any = None
    critic: Any = None
    critic_optimizer: torch.optim.Optimizer | None = None
    fsdp: Sharding | None = None
    grad_share: Any = None  # rollout.async_grad_share: the sampler's part of the gradient (train.grad_share)
    state: TrainerState = field(default_factory=TrainerState)
    _prompt_once: bool | None = field(default=None, repr=False)  # prompt_runs_once, found at the first batch
    _scoring: tuple | None = field(default=None, repr=False)  # (model, PromptPass, slots): the next forward's prompts

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def saveable(self):
        """What a checkpoint's ``model/`` and ``final/`` save: the adapter alone under LoRA, else the model."""
        return self.adapter if self.adapter is not None else self.unwrapped()

    # -- passes --------------------------------------------------------------------------------------------------

    def batch_order(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(lengths, groups, prompt_lengths)`` for :func:`micro_batches` over the rows of ``rollout``: the row
        lengths, and with ``optim.shared_prompt`` the distinct prompt of each row (rows of equal prompt ids and
        mask) and the prompt's length (a group's prompt runs once, so the token budget counts it once)."""
        if not self.shared_prompt:
            return row_lengths(rollout), None, None
        groups = prompt_groups(rollout.prompt_ids, rollout.prompt_mask)[1]
        once = rollout.prompt_mask.sum(dim=1) if self.prompt_runs_once() else None
        return row_lengths(rollout), groups, once

    def prompt_runs_once(self) -> bool:
        """Whether ``optim.shared_prompt`` does run each prompt once with this model (a backbone that cannot take
        the prompt's cache is scored by the padded pass, whose token budget then counts every row's prompt)."""
        if self._prompt_once is None:
            try:
                self._prompt_once = backbone_support(split_causal_lm(self.unwrapped()).backbone)[0] is not None
            except TypeError:
                self._prompt_once = False
        return self._prompt_once

    def forward(self, model, sub: Rollout, *, entropy: bool = False, entropy_grad: bool = True):
        """Teacher-forced ``(logprobs, entropy)`` (B, T) of ``sub``'s responses at the rollout temperature; with
        ``optim.shared_prompt`` each distinct prompt of ``sub`` goes through the model once. ``entropy_grad=False``:
        the entropy is a metric only (no gradient, no softmax kept for the backward pass)."""
        context = {} if sub.observation_mask is None else {"context_mask": sub.context_mask}  # multi-turn episodes
        if self._scoring is not None and self._scoring[0] is model:  # a micro-batch of a chunk (micro_passes)
            _, prompts, slots = self._scoring
            self._scoring = None
            if len(slots) != len(sub):
                raise RuntimeError(f"Learner.forward: {len(sub)} rows for a micro-batch of {len(slots)}")
            with self.accelerator.autocast(), update_mode(model):
                hidden, where = prompts.states(slots, sub.response_ids, sub.response_mask, **context)
                return counted_logprobs(hidden, where, sub.response_ids, split_causal_lm(model),
                                        temperature=self.temperature if self.temperature > 0 else 1.0,
                                        return_entropy=entropy, chunk_size=None, entropy_grad=entropy_grad)
        score = grouped_sequence_logprobs if self.shared_prompt else sequence_logprobs
        run = partial(score, model)
        if self.fsdp is not None and model is self.model:  # through the FSDP root: it gathers embeddings and head
            run = partial(self.fsdp.root, score)
        with self.accelerator.autocast(), update_mode(model):
            return run(sub.prompt_ids, sub.prompt_mask, sub.response_ids, sub.response_mask,
                       temperature=self.temperature, return_entropy=entropy, entropy_grad=entropy_grad, **context)

    def critic_values(self, critic, sub: Rollout) -> torch.Tensor:
        """(B, T) critic values V(s_t) of ``sub``'s response tokens (shared prompts as in :meth:`forward`)."""
        context = {} if sub.observation_mask is None else {"context_mask": sub.context_mask}
        with self.accelerator.autocast():
            return critic.values(sub.prompt_ids, sub.prompt_mask, sub.response_ids, sub.response_mask,
                                 shared_prompt=self.shared_prompt, **context)

    @torch.no_grad()
    def logprobs_all(self, model, rollout: Rollout) -> torch.Tensor:
        """(B, T) log-probs of every response under ``model``, micro-batch by micro-batch, without gradients."""
        out = torch.zeros_like(rollout.logprobs)
        rows = torch.arange(len(rollout), device=rollout.device)
        for micro in self.micro_passes(rows, self.batch_order(rollout), joined=model is self.model, rollout=rollout,
                                       model=model):
            sub = rows_of(rollout, micro)
            lp, _ = self.forward(model, sub)
            out[micro, : lp.shape[1]] = lp.float()
        return out

    def reference_logprobs(self, rollout: Rollout) -> torch.Tensor | None:
        """(B, T) log-probs under the frozen reference policy, or None when the algorithm has none: the separate
        reference model, or under LoRA the trained model with its adapter disabled (the base, bit for bit)."""
        if self.ref_model is not None:
            return self.logprobs_all(self.ref_model, rollout)
        if self.adapter is not None and self.needs_reference:
            with adapter_disabled(self.adapter):
                return self.logprobs_all(self.model, rollout)
        return None

    @torch.no_grad()
    def values_all(self, rollout: Rollout) -> torch.Tensor:
        """(B, T) critic values V(s_t) of every response token, without gradients."""
        out = torch.zeros_like(rollout.logprobs)
        rows = torch.arange(len(rollout), device=rollout.device)
        critic = self.accelerator.unwrap_model(self.critic)
        for micro in micro_batches(rows, self.micro_batch_size, *self.batch_order(rollout),
                                   max_tokens=self.micro_batch_tokens):
            sub = rows_of(rollout, micro)
            v = self.critic_values(critic, sub)
            out[micro, : v.shape[1]] = v.float() * sub.response_mask
        return out

    def micro_passes(self, rows: torch.Tensor, order: tuple, *, joined: bool = True, rollout: Rollout | None = None,
                     model=None) -> Iterator[torch.Tensor]:
        """This process's micro-batches of ``rows`` (``optim.micro_batch_size`` rows, ``optim.micro_batch_tokens``
        tokens, in ``order`` = :meth:`batch_order`), each to be scored by one :meth:`forward` of ``model`` (the
        policy by default). With a sharded policy (and ``joined``), the passes that other processes run beyond
        this one's count are joined here with zero loss after the last (:meth:`lockstep`).

        With ``optim.shared_prompt`` and the rows' ``rollout``, each chunk of groups (:func:`prompt_chunks`) runs
        its distinct prompts once before its micro-batches, which are then cut by response length across groups,
        and sends their gradients through the prompt pass after the chunk's last micro-batch (the caller's
        backward passes run in between: :class:`PromptPass`). Not under sharding or with a critic (whose own
        pass runs each micro-batch's prompts)."""
        model = self.model if model is None else model
        parts = self._prompt_chunk_parts(model) if rollout is not None and order[2] is not None else None
        if parts is None:
            micros = list(micro_batches(rows, self.micro_batch_size, *order, max_tokens=self.micro_batch_tokens))
            yield from self.lockstep(micros) if joined else micros
            return
        lengths, _, prompt_lengths = order
        response_lengths, budget = lengths - prompt_lengths, self.micro_batch_tokens
        for chunk in prompt_chunks(rows, *order, max_tokens=budget):
            part = rows_of(rollout, chunk)
            with self.accelerator.autocast(), update_mode(model):
                prompts = PromptPass(*parts, part.prompt_ids, part.prompt_mask, detach=True)
            slot = dict(zip(chunk.tolist(), prompts.inverse.tolist()))
            left = None if budget is None else max(1, budget - prompts.tokens)
            for micro in micro_batches(chunk, self.micro_batch_size, response_lengths, max_tokens=left):
                self._scoring = (model, prompts, torch.tensor([slot[r] for r in micro.tolist()],
                                                              device=part.prompt_ids.device))
                yield micro
                self._scoring = None
            prompts.backward()

    def _prompt_chunk_parts(self, model) -> tuple | None:
        """``(backbone, cache kwarg)`` when :meth:`micro_passes` runs prompts once per chunk with ``model``."""
        if not self.shared_prompt or self.fsdp is not None or self.critic is not None:
            return None
        try:
            backbone = split_causal_lm(model).backbone
        except TypeError:
            return None
        kwarg = backbone_support(backbone)[0]
        return None if kwarg is None else (backbone, kwarg)

    def lockstep(self, micros: list) -> Iterator:
        """``micros`` (this process's micro-batches of a minibatch), and with a sharded policy a zero-loss pass
        (:meth:`dummy_pass`) for each micro-batch another process runs beyond this one's count, so every process
        runs as many scoring passes (collectives) as the others."""
        most = len(micros)
        if self.fsdp is not None:  # counted before any pass: the gather is a collective too
            most = max(int(p["n"]) for p in gather_parts(self.accelerator, {"n": len(micros)}))
        yield from micros
        for _ in range(most - len(micros)):
            self.dummy_pass()

    def dummy_pass(self) -> None:
        """A forward (and, with gradients on, backward) pass of zero loss through the sharded policy (one token): it
        takes part in the collectives of a scoring pass and adds exactly zero to every gradient."""
        one = torch.ones(1, 1, dtype=torch.long, device=self.device)
        with self.accelerator.autocast(), update_mode(self.model):
            lp, _ = self.fsdp.root(sequence_logprobs, one, one, one, one, temperature=self.temperature)
        if torch.is_grad_enabled():
            self.accelerator.backward(lp.sum() * 0.0)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    # -- steps ---------------------------------------------------------------------------------------------------

    def nothing_to_train(self, count: int, *, epochs: int) -> bool:
        """Whether this process's share of the step has no row to train on (``count == 0``): the caller then
        returns. Every process calls it once per update; a process with no row while others have some takes part
        in their optimizer steps with zero gradients, one per epoch, so the parameters stay in step."""
        total = total_over_processes(self.accelerator, count)
        if count == 0 and total > 0:
            meter = MetricMeter()
            for _ in range(epochs):
                for _ in self.lockstep([]):  # a sharded policy: the others' scoring passes, with zero loss
                    pass
                zero_missing_grads(self.model)
                if self.critic is not None:
                    zero_missing_grads(self.critic)
                self.step(meter)
        return count == 0

    def step(self, meter: MetricMeter) -> None:
        """Average gradients over processes, clip, step the policy (and critic) optimizer, clear gradients.

        A sharded policy has its gradients averaged by FSDP in the backward pass already; its norm is that of the
        whole gradient. A gradient that is not finite skips the step of every optimizer (parameters and moments
        stay as they were) and is counted in :attr:`state`; every process sees the same averaged gradient, so all
        skip together. Under fp16's grad scaler the step always runs (the scaler skips an overflow itself).
        """
        max_norm = self.max_grad_norm
        pairs = [(self.model, self.optimizer, "policy/grad_norm")]
        if self.critic is not None:
            pairs.append((self.critic, self.critic_optimizer, "value/grad_norm"))
        norms = []
        for model, _, _ in pairs:
            params = [p for p in model.parameters() if p.requires_grad]
            if self.fsdp is not None and model is self.model:
                norms.append(float(grad_norm(params, max_norm)))
                continue
            _sync_gradients(self.accelerator, params)
            if max_norm is not None and max_norm > 0:
                norm = self.accelerator.clip_grad_norm_(params, max_norm)
            else:
                norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
            norms.append(float(norm))
        finite = all(math.isfinite(n) for n in norms)
        scaled = getattr(self.accelerator, "scaler", None) is not None
        for (_, optimizer, key), norm in zip(pairs, norms):
            if finite:
                meter.add({key: norm}, 1.0)
            if finite or scaled:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finite = finite or scaled  # an fp16 overflow while the scale calibrates is not a fault of the run
        self.state.nonfinite_in_row = 0 if finite else self.state.nonfinite_in_row + 1
        if not finite:
            self.state.nonfinite_steps += 1


__all__ = ["Learner", "TrainerState", "approx_kl", "rows_of", "update_mode", "zero_missing_grads"]
