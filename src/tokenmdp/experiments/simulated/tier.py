"""The simulated tier: sampled training on the enumerable token MDP of :mod:`.types`, many seeds at once, next to
the exact infinite-batch path from the same start.

**A run** of preset ``v`` at learning rate ``lr`` and group size G trains ``seeds`` tabular softmax policies
``theta_b`` (S, V) from one start ``theta_0``. Each step draws one group of G responses from every ``theta_b``
(one generator for the configuration: the seeds are independent draws, reproducible for a given seed count), and
takes the update of the project's own loss code (:class:`GroupBatch`: ``compute_advantages`` + ``policy_loss``, or
``isft_loss``, on the group's token log-probs, on-policy) with the trainers' optimizer (Adam; or plain SGD, whose
small-lr mean path is the exact one). The loss of a step is the sum of the seeds' group losses, and each
``theta_b`` enters only its own, so one backward gives every seed its update.

**The exact path** takes the expected update ``U(theta)`` of :class:`TypeUpdate` (every group of G, weighted by its
probability) into the same optimizer: the infinite-batch dynamics, and the limit the sampled mean approaches as
``lr -> 0`` under SGD (tested).

Presets with a baseline take it per group: ``reinforce``'s moving average is not kept here (``b = 0``, as the
exact tier's ``reinforce``).

**Recorded every step, per seed** (exact functions of ``theta_b``, no sampling noise): ``P(correct)``,
``E[length | incorrect]`` and the sequence entropy ``H = -sum_y p(y) log p(y)`` (nats). A seed *collapses* at the
first step where ``P(correct)`` falls below ``collapse_fraction`` (C3's 0.5) times the start's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from tokenmdp.errors import TokenMDPError
from tokenmdp.experiments.exact.groups import Groups
from tokenmdp.experiments.exact.updates import GroupBatch, Variant, check_supported, theta_free, variants
from tokenmdp.experiments.simulated.types import (check_group_size, logits, plain_point, response_types, sim_table,
                                                  start_params, type_update)
from tokenmdp.mdp.enumerate import SequenceTable

Tensor = torch.Tensor
OPTIMIZERS = ("adam", "sgd")
COLLAPSE_FRACTION = 0.5
START_SEED = 3  # the start policy's seed: P(correct) 0.31 and E[length | incorrect] 3.0, like the tiny LM's ~0.3


@dataclass
class SimRun:
    """One configuration's record: ``curves[name]`` (steps + 1, seeds) of ``p_correct``, ``len_incorrect``,
    ``entropy``; ``exact[name]`` (steps + 1,) the exact path's (``None`` without one); ``seconds``."""

    preset: str
    lr: float
    group_size: int
    optimizer: str
    curves: dict[str, np.ndarray]
    exact: dict[str, np.ndarray] | None
    seconds: float


def response_logprobs(theta: Tensor, table: SequenceTable) -> Tensor:
    """``log p(y)`` (B, N) of every response under each policy of the logit tables ``theta`` (B, S, V)."""
    logp_tok = torch.log_softmax(theta, dim=-1)[:, table.prefix_index, table.tokens]  # (B, N, T)
    return torch.where(table.mask, logp_tok, torch.zeros((), dtype=theta.dtype)).sum(-1)


def policy_curves(theta: Tensor, table: SequenceTable, logp: Tensor | None = None) -> dict[str, Tensor]:
    """``p_correct``, ``len_incorrect``, ``entropy`` of every policy of the logit tables ``theta`` (B, S, V), each
    (B,); ``logp``: their :func:`response_logprobs`, when the caller has them already."""
    logp = response_logprobs(theta, table) if logp is None else logp
    p = logp.exp()
    correct = table.rewards > 0.5
    # E[length | incorrect] from the incorrect responses' own log-probs: exact however close P(correct) is to 1
    given_inc = torch.softmax(logp.masked_fill(correct, -torch.inf), dim=-1)
    return {"p_correct": p @ correct.to(theta.dtype), "len_incorrect": given_inc @ table.lengths.to(theta.dtype),
            "entropy": -(p * logp).sum(-1)}


def _optimizer(name: str, params: list[Tensor], lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise TokenMDPError(f"simulate: optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def sampled_grad(v: Variant, params: Tensor, table: SequenceTable, rows: Tensor, ref, tied: bool = False) -> Tensor:
    """The loss gradient of every seed's group (``rows`` (B, G) response indices, ``params`` (B, ...) as
    :func:`logits` reads them): the project's loss on the groups' token log-probs, each from its own seed's
    policy; ``ref`` the reference :class:`Point` (the start policy, for a KL)."""
    b, g = rows.shape
    groups = Groups(table, g, rows, torch.zeros(b, dtype=torch.float64))
    batch = GroupBatch(groups, ref)
    leaf = params.detach().requires_grad_(True)
    flat = rows.reshape(-1)
    seed_of = torch.arange(b).repeat_interleave(g)
    logp = torch.log_softmax(logits(leaf, tied), dim=-1)[seed_of.unsqueeze(-1), table.prefix_index[flat],
                                                         table.tokens[flat]]
    lp = torch.where(table.mask[flat], logp, torch.zeros((), dtype=logp.dtype))
    loss = batch.pg_loss(v, lp, None) if v.spec.kind == "pg" else batch.isft_loss(v, lp)
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad


def check_variant(v: Variant) -> None:
    """Raise :class:`TokenMDPError` unless the simulated tier can run ``v``: pg or isft without a critic (a KL is
    allowed), and nothing that reads across groups (a batch-wide std, whitening, a batch-mean baseline), which
    would couple the seeds that share a loss call."""
    s = v.spec
    if s.kind not in ("pg", "isft") or s.critic or v.oracle_critic:
        raise TokenMDPError(f"simulate: preset {v.name!r} ({s.kind}{', a critic' if s.critic else ''}) is not "
                            "simulated: the tier runs the policy-gradient and ISFT presets without a critic")
    try:
        check_supported(v)
    except TokenMDPError as exc:
        raise TokenMDPError(str(exc).replace("exact tier", "simulated tier").replace("exact:", "simulate:")) from None


def resolve(preset: str) -> Variant:
    """The :class:`Variant` of ``preset``, checked by :func:`check_variant`."""
    catalogue = variants()
    if preset not in catalogue:
        raise TokenMDPError(f"simulate: unknown preset {preset!r}; choose from {', '.join(catalogue)}")
    check_variant(catalogue[preset])
    return catalogue[preset]


def simulate(preset: str, *, lr: float, group_size: int, steps: int, seeds: int, optimizer: str = "adam",
             seed: int = 0, start_seed: int = START_SEED, init_scale: float = 1.0, tied: bool = False,
             table: SequenceTable | None = None, exact: bool = True, progress=None) -> SimRun:
    """Train ``seeds`` policies of ``preset`` for ``steps`` (module docstring) and, with ``exact``, the exact path
    beside them; ``tied`` adds a token bias shared by every state (:func:`logits`). ``progress(n)`` is called with
    the steps done (a progress bar's advance)."""
    v = resolve(preset)
    check_group_size(group_size)
    for name, value, low in (("group_size", group_size, 2), ("steps", steps, 1), ("seeds", seeds, 1)):
        if int(value) < low:
            raise TokenMDPError(f"simulate: {name} must be >= {low}, got {value}")
    if not lr > 0:
        raise TokenMDPError(f"simulate: lr must be > 0, got {lr}")
    t0 = time.perf_counter()
    table = sim_table() if table is None else table
    params0 = start_params(table, seed=start_seed, scale=init_scale, tied=tied)
    ref = plain_point(logits(params0, tied), table)
    params = params0.expand(seeds, *params0.shape).clone().requires_grad_(True)
    opt = _optimizer(optimizer, [params], lr)
    gen = torch.Generator().manual_seed(seed)
    curves: dict[str, list] = {k: [] for k in ("p_correct", "len_incorrect", "entropy")}
    for step in range(steps + 1):
        with torch.no_grad():
            theta = logits(params, tied)
            logp = response_logprobs(theta, table)
            stats = policy_curves(theta, table, logp)
            p = logp.exp()  # the sampling distribution over whole responses
        for k, x in stats.items():
            curves[k].append(x.numpy().copy())
        if step == steps:
            break
        rows = torch.multinomial(p, group_size, replacement=True, generator=gen)
        params.grad = sampled_grad(v, params, table, rows, ref, tied)
        opt.step()
        if progress is not None:
            progress(1)
    exact_curves = exact_path(v, table, params0, lr=lr, group_size=group_size, steps=steps, optimizer=optimizer,
                              tied=tied) if exact and theta_free(v) else None
    return SimRun(preset, lr, group_size, optimizer, {k: np.stack(x) for k, x in curves.items()}, exact_curves,
                  time.perf_counter() - t0)


def exact_path(v: Variant, table: SequenceTable, params0: Tensor, *, lr: float, group_size: int, steps: int,
               optimizer: str, tied: bool = False) -> dict[str, np.ndarray]:
    """The infinite-batch path: ``steps`` of the optimizer fed the exact expected update (the loss gradient is
    ``-U``)."""
    tu = type_update(v, response_types(table), group_size, logits(params0, tied))
    params = params0.clone().unsqueeze(0).requires_grad_(True)
    opt = _optimizer(optimizer, [params], lr)
    out: dict[str, list] = {k: [] for k in ("p_correct", "len_incorrect", "entropy")}
    for step in range(steps + 1):
        with torch.no_grad():
            for k, x in policy_curves(logits(params, tied), table).items():
                out[k].append(float(x[0]))
        if step == steps:
            break
        params.grad = -tu.update(params[0].detach(), tied).unsqueeze(0)
        opt.step()
    return {k: np.asarray(x) for k, x in out.items()}


def collapse_steps(p_correct: np.ndarray, fraction: float = COLLAPSE_FRACTION) -> np.ndarray:
    """Per seed (columns of ``p_correct`` (steps + 1, seeds)), the first step with ``P(correct)`` below
    ``fraction`` times the start's; -1 where it never falls that far."""
    below = p_correct < fraction * p_correct[0]
    first = below.argmax(axis=0)
    return np.where(below.any(axis=0), first, -1)


__all__ = ["COLLAPSE_FRACTION", "OPTIMIZERS", "START_SEED", "SimRun", "check_variant", "collapse_steps", "exact_path",
           "policy_curves", "resolve", "response_logprobs", "sampled_grad", "simulate"]
