"""What every update shares: minibatch and micro-batch iteration, teacher-forced forward passes, the optimizer
step, and the averaging of loss metrics across micro-batches.

Exact gradient accumulation: a minibatch of rows is cut into micro-batches of ``optim.micro_batch_size`` rows;
every micro-batch loss is computed with the normalisers of the whole minibatch (``num_seqs``, ``num_tokens``, see
:mod:`tokenmdp.algos.losses`) and the micro-batch gradients are summed, so the update equals the one of the whole
minibatch in one pass. One optimizer step is taken per minibatch.
"""

from __future__ import annotations

import math
from functools import partial
from collections import defaultdict
from typing import TYPE_CHECKING, Iterator

import torch

from tokenmdp.algos.losses import kl_penalty
from tokenmdp.policy.adapters import adapter_disabled, update_mode
from tokenmdp.policy.logprobs import sequence_logprobs
from tokenmdp.policy.shared_prompt import grouped_sequence_logprobs, prompt_groups
from tokenmdp.rollout.types import Rollout
from tokenmdp.train.batch import gather_parts, total_over_processes
from tokenmdp.train.sharding import grad_norm

if TYPE_CHECKING:
    from tokenmdp.train.setup import Components

SUMMED = ("policy/loss", "policy/pg_loss", "value/loss", "isft/loss", "dpo/loss", "update/loss")


class MetricMeter:
    """Averages metrics over micro-batches and minibatches.

    Keys in :data:`SUMMED` are summed within a minibatch (micro-batch losses add up to the minibatch loss) and
    averaged over minibatches; ``*_min`` / ``*_max`` keys keep the extreme; every other key is a mean weighted by
    the micro-batch's token count.
    """

    def __init__(self) -> None:
        self.weighted: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)
        self.extremes: dict[str, float] = {}
        self.current: dict[str, float] = defaultdict(float)
        self.summed: dict[str, list[float]] = defaultdict(list)

    def add(self, metrics: dict[str, float], weight: float) -> None:
        for key, value in metrics.items():
            if value is None:
                continue
            if key in SUMMED:
                self.current[key] += value
            elif key.endswith("_min"):
                self.extremes[key] = min(value, self.extremes.get(key, value))
            elif key.endswith("_max"):
                self.extremes[key] = max(value, self.extremes.get(key, value))
            else:
                self.weighted[key] += value * weight
                self.weights[key] += weight

    def end_minibatch(self, **extra: float) -> None:
        for key, value in {**self.current, **extra}.items():
            self.summed[key].append(value)
        self.current = defaultdict(float)

    def result(self) -> dict[str, float]:
        out = {k: self.weighted[k] / self.weights[k] for k in self.weighted if self.weights[k] > 0}
        out.update(self.extremes)
        out.update({k: sum(v) / len(v) for k, v in self.summed.items() if v})
        return out


def minibatches(rows: torch.Tensor, size: int | None, *, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``rows`` shuffled by ``generator`` and cut into chunks of ``size`` (None: one chunk, unshuffled)."""
    if size is None or size >= len(rows):
        yield rows
        return
    order = rows[torch.randperm(len(rows), generator=generator)]
    for start in range(0, len(order), size):
        yield order[start : start + size]


def micro_batches(rows: torch.Tensor, size: int, lengths: torch.Tensor | None = None,
                  groups: torch.Tensor | None = None, *, max_tokens: int | None = None) -> Iterator[torch.Tensor]:
    """``rows`` cut into chunks of ``size``; with ``lengths`` (per row of the batch), longest rows first, so that
    each micro-batch holds rows of similar length and little padding (the result does not depend on the order:
    the normalisers are those of the whole minibatch). With ``groups`` (a group id per row of the batch), the rows
    of a group are kept next to each other (groups longest first), so that a micro-batch holds whole groups
    where ``size`` allows (``optim.shared_prompt`` then runs each group's prompt once). With ``max_tokens`` (and
    ``lengths``) a micro-batch also holds at most that many padded tokens, its rows times its longest row (a row
    longer than the budget goes alone): ``lengths [9, 5, 4, 2]``, ``size 4``, ``max_tokens 12`` ->
    ``[9], [5, 4], [2]``."""
    if (len(rows) > size or max_tokens is not None) and (lengths is not None or groups is not None):
        rows = rows[_order(rows, lengths, groups).to(rows.device)]
    if max_tokens is None or lengths is None:
        for start in range(0, len(rows), size):
            yield rows[start : start + size]
        return
    length = lengths.index_select(0, rows.to(lengths.device)).cpu().tolist()
    start, longest = 0, 0
    for i, n in enumerate(length):
        longest_with = max(longest, n)
        if i > start and (i - start >= size or (i - start + 1) * longest_with > max_tokens):
            yield rows[start:i]
            start, longest_with = i, n
        longest = longest_with
    if start < len(rows):
        yield rows[start:]


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


def batch_order(c: Components, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(lengths, groups)`` for :func:`micro_batches` over the rows of ``rollout``: the row lengths, and with
    ``optim.shared_prompt`` the distinct prompt of each row (rows of equal prompt ids and mask)."""
    groups = prompt_groups(rollout.prompt_ids, rollout.prompt_mask)[1] if c.config.optim.shared_prompt else None
    return row_lengths(rollout), groups


def rows_of(rollout: Rollout, rows: torch.Tensor) -> Rollout:
    """The rows ``rows`` of ``rollout``, trimmed of all-padding response columns."""
    return rollout.select(rows.to(rollout.device)).trimmed()


def forward(c: Components, model, sub: Rollout, *, entropy: bool = False):
    """Teacher-forced ``(logprobs, entropy)`` (B, T) of ``sub``'s responses at the rollout temperature; with
    ``optim.shared_prompt`` each distinct prompt of ``sub`` goes through the model once."""
    temperature = c.config.rollout.temperature or 1.0
    score = grouped_sequence_logprobs if c.config.optim.shared_prompt else sequence_logprobs
    run = partial(score, model)
    if c.fsdp is not None and model is c.model:  # through the FSDP root: it gathers the embeddings and head
        run = partial(c.fsdp.root, score)
    context = {} if sub.observation_mask is None else {"context_mask": sub.context_mask}  # multi-turn episodes
    with c.accelerator.autocast(), update_mode(model):
        return run(sub.prompt_ids, sub.prompt_mask, sub.response_ids, sub.response_mask,
                   temperature=temperature, return_entropy=entropy, **context)


def critic_values(c: Components, critic, sub: Rollout) -> torch.Tensor:
    """(B, T) critic values V(s_t) of ``sub``'s response tokens (shared prompts as in :func:`forward`)."""
    context = {} if sub.observation_mask is None else {"context_mask": sub.context_mask}
    with c.accelerator.autocast():
        return critic.values(sub.prompt_ids, sub.prompt_mask, sub.response_ids, sub.response_mask,
                             shared_prompt=c.config.optim.shared_prompt, **context)


@torch.no_grad()
def logprobs_all(c: Components, model, rollout: Rollout) -> torch.Tensor:
    """(B, T) log-probs of every response under ``model``, micro-batch by micro-batch, without gradients."""
    out = torch.zeros_like(rollout.logprobs)
    rows = torch.arange(len(rollout), device=rollout.device)
    for micro in micro_passes(c, rows, batch_order(c, rollout), joined=model is c.model):
        sub = rows_of(rollout, micro)
        lp, _ = forward(c, model, sub)
        out[micro, : lp.shape[1]] = lp.float()
    return out


def reference_logprobs(c: Components, rollout: Rollout) -> torch.Tensor | None:
    """(B, T) log-probs under the frozen reference policy, or None when the algorithm has none: the separate
    reference model, or under LoRA the trained model with its adapter disabled (the base, bit for bit)."""
    if c.ref_model is not None:
        return logprobs_all(c, c.ref_model, rollout)
    if c.adapter is not None and c.spec.needs_reference:
        with adapter_disabled(c.adapter):
            return logprobs_all(c, c.model, rollout)
    return None


@torch.no_grad()
def values_all(c: Components, rollout: Rollout) -> torch.Tensor:
    """(B, T) critic values V(s_t) of every response token, without gradients."""
    out = torch.zeros_like(rollout.logprobs)
    rows = torch.arange(len(rollout), device=rollout.device)
    critic = c.accelerator.unwrap_model(c.critic)
    for micro in micro_batches(rows, c.config.optim.micro_batch_size, *batch_order(c, rollout),
                               max_tokens=c.config.optim.micro_batch_tokens):
        sub = rows_of(rollout, micro)
        v = critic_values(c, critic, sub)
        out[micro, : v.shape[1]] = v.float() * sub.response_mask
    return out


def micro_passes(c: Components, rows: torch.Tensor, order: tuple, *, joined: bool = True) -> Iterator[torch.Tensor]:
    """This process's micro-batches of ``rows`` (``optim.micro_batch_size`` rows, ``optim.micro_batch_tokens``
    tokens, in ``order`` = :func:`batch_order`). With a sharded policy (and ``joined``), the passes that other
    processes run beyond this one's count are joined here with zero loss after the last (:func:`lockstep`): a token
    budget or filtered rows can cut the processes' shares into unequal numbers of micro-batches."""
    micros = list(micro_batches(rows, c.config.optim.micro_batch_size, *order,
                                max_tokens=c.config.optim.micro_batch_tokens))
    for micro in lockstep(c, micros) if joined else micros:
        if micro is None:
            dummy_pass(c)
            continue
        yield micro


def lockstep(c: Components, micros: list) -> list:
    """``micros`` (this process's micro-batches of a minibatch), padded with ``None`` up to the largest count of
    any process when the policy is sharded: each ``None`` is a :func:`dummy_pass`, so every process runs as many
    scoring passes (collectives) as the others. Unchanged for an unsharded policy."""
    if c.fsdp is None:
        return micros
    most = max(int(p["n"]) for p in gather_parts(c, {"n": len(micros)}))
    return micros + [None] * (most - len(micros))


def dummy_pass(c: Components) -> None:
    """A forward (and, with gradients on, backward) pass of zero loss through the sharded policy (one token): it
    takes part in the collectives of a scoring pass and adds exactly zero to every gradient."""
    one = torch.ones(1, 1, dtype=torch.long, device=c.device)
    temperature = c.config.rollout.temperature or 1.0
    with c.accelerator.autocast(), update_mode(c.model):
        lp, _ = c.fsdp.root(sequence_logprobs, one, one, one, one, temperature=temperature)
    if torch.is_grad_enabled():
        c.accelerator.backward(lp.sum() * 0.0)


def _sync_gradients(accelerator, params) -> None:
    """Average gradients over processes (the model is not wrapped in DDP: forward passes bypass ``forward``)."""
    if accelerator.num_processes <= 1:
        return
    for p in params:  # every parameter, a zero gradient where this process has none: the same calls everywhere
        p.grad = accelerator.reduce(p.grad if p.grad is not None else torch.zeros_like(p), reduction="mean")


def zero_missing_grads(model) -> None:
    """Give every trainable parameter without a gradient a zero one, so that the optimizer step (AdamW's moments
    and weight decay) and the cross-process gradient average treat it as a zero gradient, not as absent."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def nothing_to_train(c: Components, count: int, *, epochs: int) -> bool:
    """Whether this process's share of the step has no row to train on (``count == 0``): the caller then returns.

    Every process calls it once per update (it counts the rows of all processes). A process with no row while
    others have some takes part in their optimizer steps with zero gradients, one per epoch (one minibatch per
    epoch: :func:`tokenmdp.train.setup.check_processes`), so that the cross-process gradient average and the
    parameters stay in step.
    """
    total = total_over_processes(c, count)
    if count == 0 and total > 0:
        meter = MetricMeter()
        for _ in range(epochs):
            for _ in lockstep(c, []):  # a sharded policy: the others' scoring passes, with zero loss
                dummy_pass(c)
            zero_missing_grads(c.model)
            if c.critic is not None:
                zero_missing_grads(c.critic)
            optimizer_step(c, meter)
    return count == 0


def optimizer_step(c: Components, meter: MetricMeter) -> None:
    """Average gradients over processes, clip, step the policy (and critic) optimizer, clear gradients.

    A sharded policy (``run.fsdp``) has its gradients averaged by FSDP in the backward pass already; its norm is
    that of the whole gradient (over every process's shard).

    A gradient that is not finite (a NaN or Inf loss, or an overflow) skips the step of every optimizer: the
    parameters and the optimizers' moments stay as they were. ``c.state`` counts such steps (``nonfinite_steps``,
    and ``nonfinite_in_row``, reset by a finite step); every process sees the same averaged gradient, so all skip
    together.
    """
    max_norm = c.config.optim.max_grad_norm
    pairs = [(c.model, c.optimizer, "policy/grad_norm")]
    if c.critic is not None:
        pairs.append((c.critic, c.critic_optimizer, "value/grad_norm"))
    norms = []
    for model, optimizer, key in pairs:
        params = [p for p in model.parameters() if p.requires_grad]
        if c.fsdp is not None and model is c.model:
            norms.append(float(grad_norm(params, max_norm)))
            continue
        _sync_gradients(c.accelerator, params)
        if max_norm is not None and max_norm > 0:
            norm = c.accelerator.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        norms.append(float(norm))
    finite = all(math.isfinite(n) for n in norms)
    scaled = getattr(c.accelerator, "scaler", None) is not None  # fp16: the grad scaler skips and recalibrates
    for (model, optimizer, key), norm in zip(pairs, norms):
        if finite:
            meter.add({key: norm}, 1.0)
        if finite or scaled:  # under a scaler the step must run: it skips an overflow itself and updates the scale
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    finite = finite or scaled  # an fp16 overflow while the scale calibrates is not a fault of the run
    c.state["nonfinite_in_row"] = 0 if finite else int(c.state.get("nonfinite_in_row", 0)) + 1
    if not finite:
        c.state["nonfinite_steps"] = int(c.state.get("nonfinite_steps", 0)) + 1


def approx_kl(old_logprobs: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over valid tokens of ``rho - 1 - log rho`` with ``rho = pi / pi_old`` (k3 of KL(pi_old || pi))."""
    kl = kl_penalty(old_logprobs.detach(), logprobs.detach(), estimator="k3")
    m = mask.bool()
    return float(kl[m].mean()) if m.any() else 0.0
