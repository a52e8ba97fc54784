"""Part of each update's gradient computed by the overlapped sampler (``rollout.async_grad_share = f > 0``).

With overlapped rollouts (:mod:`tokenmdp.train.async_rollout`) on two cores the sampler process is idle for part of
every step: sampling the next batch takes G seconds, the update U > G, so a step takes U. The sampler holds the
learner's own weights while the learner updates (those published after the previous update: it samples the next
batch with them), so it can compute the gradient of part of the batch exactly as the learner would. The learner
hands it whole prompt groups worth about a fraction ``f`` of the batch's tokens (the last groups of the batch),
computes the gradient of the rest, adds the sampler's and takes the optimizer step: data parallelism inside the
overlap. A step then takes about ``max((1 - f) U, G + f U)``.

The update equals the one without a share up to float rounding (its micro-batches are cut differently and their
gradients summed in another order), and a run stays deterministic and resumes exactly: the split depends on the
batch alone, each side runs one thread, the sum has a fixed order. The update's metrics include the sampler's
micro-batches. Only for one optimizer step per batch of a policy-gradient update without a critic, in float32
(:func:`tokenmdp.train.checks.validate` refuses the rest).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import numpy as np
import torch

from tokenmdp.policy import fused_layers
from tokenmdp.policy.shared_prompt import prompt_groups
from tokenmdp.rollout.types import pack_rollout, unpack_rollout
from tokenmdp.train.algorithms import TrainBatch
from tokenmdp.train.learner import Learner
from tokenmdp.train.meter import MetricMeter


def split_rows(rows: torch.Tensor, groups: torch.Tensor, tokens: torch.Tensor, share: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mine, theirs)``: ``rows`` split between whole groups (``groups[r]``: the group of row ``r``), ``theirs``
    the last groups in ``rows``' order whose ``tokens`` (per row) come nearest ``share`` of the total, the first
    group always the learner's."""
    if len(rows) == 0 or share <= 0:
        return rows, rows[:0]
    g = groups[rows].tolist()
    t = tokens[rows].tolist()
    order = list(dict.fromkeys(g))  # the groups, in the rows' order
    size = dict.fromkeys(order, 0)
    for gi, ti in zip(g, t):
        size[gi] += ti
    target, taken, theirs = share * sum(size.values()), 0, set()
    for group in reversed(order[1:]):
        if taken + size[group] / 2 > target:
            break
        taken += size[group]
        theirs.add(group)
    pick = torch.tensor([gi in theirs for gi in g], dtype=torch.bool)
    return rows[~pick], rows[pick]


def _numpy(t: torch.Tensor | None):
    return None if t is None else t.detach().cpu().numpy()


def pack_batch(tb) -> dict:
    """A :class:`~tokenmdp.train.algorithms.TrainBatch` as plain data (it crosses to the sampler's process)."""
    return {f.name: (pack_rollout(tb.rollout) if f.name == "rollout" else _numpy(getattr(tb, f.name)))
            for f in dataclasses.fields(tb)}


def unpack_batch(data: dict, device):
    """The :class:`~tokenmdp.train.algorithms.TrainBatch` of :func:`pack_batch`."""
    kw = {k: (unpack_rollout(v, device) if k == "rollout" else None if v is None else torch.from_numpy(v).to(device))
          for k, v in data.items()}
    return TrainBatch(**kw)


class _Recorder:
    """Stands for the update's meter in the sampler: keeps every ``add`` (the learner replays them into its own)."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict, float]] = []

    def add(self, metrics: dict[str, float], weight: float) -> None:
        self.calls.append((dict(metrics), float(weight)))


class _Local:
    """What a :class:`~tokenmdp.train.learner.Learner` asks of accelerate, for one float32 process."""

    device = torch.device("cpu")
    num_processes = 1

    @staticmethod
    def autocast():
        return contextlib.nullcontext()

    @staticmethod
    def backward(loss: torch.Tensor) -> None:
        loss.backward()

    @staticmethod
    def unwrap_model(model):
        return model


class ShareWorker:
    """The sampler's side: the gradient of the rows it is handed, at the weights its model holds.

    ``settings``: the algorithm (its ``loss``) and the learner's pass settings (:meth:`GradShare.settings`)."""

    def __init__(self, model: torch.nn.Module, settings: dict):
        self.model, self.algorithm = model, settings["algorithm"]
        self.learner = Learner(model=model, optimizer=None, scheduler=None, accelerator=_Local(), max_grad_norm=None,
                               **settings["passes"])
        why = fused_layers.enable(model) if settings["fused_layers"] else None
        if why:  # the learner's own enable succeeded at set-up: the same machine, the same model
            raise RuntimeError(f"optim.fused_layers in the sampler's process: {why}")

    def gradient(self, job: dict) -> dict:
        """``{"grads": {name: array}, "metrics": [(metrics, weight)]}`` of the rows of ``job["batch"]`` with the
        minibatch's normalisers ``job["n_tok"]``, ``job["n_seq"]``."""
        tb = unpack_batch(job["batch"], torch.device("cpu"))
        learner, meter = self.learner, _Recorder()
        rows = torch.arange(len(tb))
        for micro in learner.micro_passes(rows, learner.batch_order(tb.rollout), rollout=tb.rollout):
            learner.backward(self.algorithm.loss(learner, tb.select(micro), job["n_tok"], job["n_seq"], meter))
        grads = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                grads[name] = None if p.grad is None else p.grad.numpy().copy()
                p.grad = None
        return {"grads": grads, "metrics": meter.calls}


class GradShare:
    """The learner's side: hands the sampler ``share`` of each update's rows and adds back their gradient.

    ``sampler``: the run's :class:`~tokenmdp.train.async_rollout.AsyncSampler` (its queue carries the jobs)."""

    def __init__(self, sampler, share: float):
        self.sampler, self.share = sampler, share
        self.pending = False
        self.rows, self.seconds, self.wait = 0, 0.0, 0.0  # of the last update (:meth:`metrics`)

    @staticmethod
    def settings(learner, algorithm, *, fused_layers: bool) -> dict[str, Any]:
        """What :class:`ShareWorker` needs of the run (picklable: the algorithm without its task callback)."""
        passes = {"temperature": learner.temperature, "micro_batch_size": learner.micro_batch_size,
                  "micro_batch_tokens": learner.micro_batch_tokens, "shared_prompt": learner.shared_prompt}
        return {"algorithm": dataclasses.replace(algorithm, process_rewards=None), "passes": passes,
                "fused_layers": fused_layers}

    def submit(self, tb, work: torch.Tensor, order: tuple, n_tok, n_seq) -> torch.Tensor:
        """Send the sampler its rows of ``work`` (of ``tb``, cut as :meth:`Learner.batch_order` says: ``order``);
        return the learner's own rows."""
        ro = tb.rollout
        groups = prompt_groups(ro.prompt_ids, ro.prompt_mask)[1].cpu()
        lengths, _, once = order
        tokens = lengths.cpu().double()
        if once is not None:  # a group's prompt runs once: its tokens spread over the group's rows
            rows_in = torch.bincount(groups)[groups].double()
            tokens += once.cpu().double() * (1.0 / rows_in - 1.0)
        mine, theirs = split_rows(work.cpu(), groups, tokens, self.share)
        self.rows, self.seconds, self.wait = len(theirs), 0.0, 0.0
        if len(theirs):
            self.sampler.ask_gradient({"batch": pack_batch(tb.select(theirs)), "n_tok": n_tok, "n_seq": n_seq})
            self.pending = True
        return mine

    def collect(self, learner, meter: MetricMeter) -> None:
        """Wait for the sampler's gradient, add it to the learner's and its metrics to ``meter``."""
        if not self.pending:
            return
        self.pending = False
        t0 = time.perf_counter()
        result, self.seconds = self.sampler.gradient()
        self.wait = time.perf_counter() - t0
        params = dict(learner.unwrapped().named_parameters())
        for name, grad in result["grads"].items():
            if grad is None:
                continue
            p, g = params[name], torch.from_numpy(np.asarray(grad)).to(params[name].device)
            p.grad = g if p.grad is None else p.grad.add_(g)
        for metrics, weight in result["metrics"]:
            meter.add(metrics, weight)

    def metrics(self) -> dict[str, float]:
        """The last update's rows given to the sampler, the sampler's seconds for their gradient and the learner's
        wait for it (long waits: lower the share; none at all: the sampler may idle, raise it)."""
        return {"update/sampler_rows": float(self.rows), "time/sampler_grad": self.seconds,
                "time/sampler_grad_wait": self.wait}


__all__ = ["GradShare", "ShareWorker", "split_rows", "pack_batch", "unpack_batch"]
