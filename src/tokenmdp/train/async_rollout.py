"""Rollouts overlapped with updates (``rollout.max_staleness = k > 0``): one-step-off asynchronous training.

While the learner updates on the batch of step ``t``, a sampler (a spawned process, or a thread) samples the
batch of a later step with older weights. Sampling is a pure function of (weights, prompts, seed) and the prompts
and seeds of every step are known in advance (:func:`tokenmdp.train.data.prompt_stream`,
:func:`tokenmdp.train.trainer.step_seed`), so the schedule is fixed rather than "whatever weights are newest":

* **contract**: the batch of step ``t`` is sampled with the weights after step ``b(t) = max(0, t - 1 - k)``
  (0: the initial weights), its staleness is exactly ``t - 1 - b(t) = min(k, t - 1)`` updates;
* right after the update of step ``t`` the learner publishes its weights and asks for the batch of step
  ``t + 1 + k``; at the start it asks for steps ``1 .. k + 1`` with the initial weights. The sampler serves the
  requests in order, one at a time, with one torch thread (on 2 cores it takes the idle one);
* a run is therefore deterministic (two runs are bitwise equal) and a checkpoint at step ``t`` carries the
  batches ``t + 1 .. t + k`` already sampled (``async_batches.pt``, as the sampler returned them), so ``--resume``
  continues bit for bit whatever ``run.save_every`` is, and with any engine; batches are sampled up to step
  ``run.steps + k`` so that the final checkpoint extends exactly too (its last ``k`` batches are otherwise unused).

The correction of the stale batch is the update's (:class:`tokenmdp.train.algorithms.PolicyGradient` with
``stale``, truncated importance sampling). ``k = 0`` never builds a sampler: the loop is the synchronous one, unchanged.

Logged each step: ``async/staleness``, ``time/wait`` (seconds the learner waited for the batch), ``time/rollout``
(the sampler's own seconds for it) and, from the update, ``async/is_ratio_mean`` / ``_max`` / ``async/tis_clip_frac``.

With ``rollout.async_grad_share`` the sampler process also computes part of each update's gradient, in the part
of the step it would otherwise wait (:mod:`tokenmdp.train.grad_share`).
"""

from __future__ import annotations

import copy
import queue
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from tokenmdp.errors import TokenMDPError
from tokenmdp.rollout import get_engine
from tokenmdp.rollout.types import pack_rollout, unpack_rollout
from tokenmdp.train.batch import Batch
from tokenmdp.train.grad_share import ShareWorker

IN_FLIGHT_FILE = "async_batches.pt"


def behaviour_step(step: int, max_staleness: int) -> int:
    """The step whose weights sample the batch of ``step``: ``max(0, step - 1 - max_staleness)``."""
    return max(0, step - 1 - max_staleness)


def staleness(step: int, max_staleness: int) -> int:
    """Updates between the sampling weights and the learner's at ``step``: ``min(max_staleness, step - 1)``."""
    return step - 1 - behaviour_step(step, max_staleness)


def trained_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters the learner trains (all of them, or the LoRA adapter's): what changes per step."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load(model, sampler, weights: dict | None) -> None:
    """The published trained weights (None: unchanged) into the sampler's model and its engine."""
    if weights is None:
        return
    _, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise RuntimeError(f"weights the sampler's model does not have: {unexpected[:3]}")
    sampler.sync_weights(model)  # vllm: into its own model, checked by its probe; in-process: a no-op


def _serve(model, tokenizer, engine: str, engine_options: dict, threads: int | None, requests, results,
           share: dict | None = None) -> None:
    """The sampler's loop: ``(step, weights or None, prompts, sampling)`` in, ``(step, packed rollout, seconds)``
    out, in order; with ``share`` (:mod:`tokenmdp.train.grad_share`) also ``("grad", weights or None, job)`` in,
    ``("grad", gradient, seconds)`` out; ``None`` stops it; an error is sent back as ``("error", traceback, 0)``."""
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        sampler = get_engine(engine, model, tokenizer, **engine_options)
        worker = None
        while True:
            request = requests.get()
            if request is None:
                return
            if request[0] == "grad":
                _, weights, job = request
                _load(model, sampler, weights)
                if worker is None:
                    worker = ShareWorker(model, share)
                t0 = time.perf_counter()
                results.put(("grad", worker.gradient(job), time.perf_counter() - t0))
                continue
            step, weights, prompts, sampling = request
            _load(model, sampler, weights)
            t0 = time.perf_counter()
            rollout = sampler.generate(prompts, **sampling)
            results.put((step, pack_rollout(rollout), time.perf_counter() - t0))
    except BaseException:  # noqa: BLE001 - reported to the learner, which raises it
        results.put(("error", traceback.format_exc(), 0.0))


class AsyncSampler:
    """The sampler of a run with ``rollout.max_staleness = k > 0`` (see the module docstring).

    ``rollouts``: the run's :class:`tokenmdp.train.trainer.Rollouts` (prompts rendered, sampling arguments,
    scoring); ``model``: the learner's model (copied for the sampler; its trained weights are published after each
    update); ``stream``: the prompts of every step up to ``last = run.steps + k``; ``start``: the steps already
    done; ``in_flight``: the batches of steps ``start + 1 .. start + k`` of the checkpoint resumed from (packed);
    ``share``: what the sampler needs to compute part of each update's gradient (``rollout.async_grad_share``,
    :meth:`tokenmdp.train.grad_share.GradShare.settings`), or None.
    """

    def __init__(self, rollouts, model, stream: list[list], *, start: int, max_staleness: int, last: int,
                 worker: str = "process", engine: str = "fast", engine_options: dict | None = None,
                 threads: int | None = None, in_flight: dict[int, dict] | None = None, share: dict | None = None):
        self.rollouts, self.learner_model, self.stream = rollouts, model, stream
        self.k = max_staleness
        self.last = last
        self.ready: dict[int, tuple[dict, float]] = {s: (r, 0.0) for s, r in (in_flight or {}).items()}
        self.asked: set[int] = set(self.ready)
        self.sent: dict[int | str, Any] = {}  # what was handed over, kept alive until its result is back
        self.current = True  # whether the sampler holds the learner's weights (it starts from a copy of them)
        self.mode = worker
        copy_ = copy.deepcopy(model).eval()  # the sampler's own copy (the learner trains its original)
        args = (copy_, rollouts.tokenizer, engine, dict(engine_options or {}))
        if self.mode == "process":
            import torch.multiprocessing as mp

            ctx = mp.get_context("spawn")
            self.requests, self.results = ctx.Queue(), ctx.Queue()
            self.worker = ctx.Process(target=_serve, args=(*args, threads or 1, self.requests, self.results, share),
                                      daemon=True, name="tokenmdp-sampler")
        else:  # torch's thread count is per process: the thread shares the learner's
            self.requests, self.results = queue.Queue(), queue.Queue()
            self.worker = threading.Thread(target=_serve, args=(*args, None, self.requests, self.results, share),
                                           daemon=True, name="tokenmdp-sampler")
        self._model = copy_  # kept alive while the sampler shares its memory
        self.worker.start()
        for step in range(start + 1, start + self.k + 2):  # sampled with the current weights: the model copied
            if step not in self.asked:
                self._ask(step, None)

    def _ask(self, step: int, weights: dict | None) -> None:
        if step > self.last or step in self.asked:
            return
        problems = self.stream[step - 1]
        self.requests.put((step, weights, self.rollouts.render(problems), self.rollouts.sampling(step)))
        self.asked.add(step)
        if weights is not None:
            self.sent[step] = weights

    def after_update(self, step: int) -> None:
        """Publish the weights after the update of ``step`` and ask for the batch of ``step + 1 + k``."""
        self.current = step + 1 + self.k <= self.last
        if self.current:
            self._ask(step + 1 + self.k, trained_weights(self.learner_model))

    def ask_gradient(self, job: dict) -> None:
        """Ask for the gradient of ``job`` (:class:`tokenmdp.train.grad_share.GradShare`) at the learner's weights
        (sent along when the last ones published are not those)."""
        weights = None if self.current else trained_weights(self.learner_model)
        self.current = True
        self.requests.put(("grad", weights, job))
        self.sent["grad"] = (weights, job)

    def gradient(self) -> tuple[dict, float]:
        """The gradient asked for by :meth:`ask_gradient` (waiting for the sampler) and the sampler's seconds."""
        self._wait_for("grad")
        return self.ready.pop("grad")

    def _wait_for(self, step: int | str) -> None:
        while step not in self.ready:
            try:
                got, packed, seconds = self.results.get(timeout=1.0)
            except queue.Empty:
                if not self.worker.is_alive():
                    hint = ("; a spawned process re-imports the main script: guard a script's code with "
                            "`if __name__ == '__main__':`, or set rollout.async_worker=thread") \
                        if self.mode == "process" else ""
                    what = "its share of the update's gradient" if step == "grad" else f"step {step}"
                    raise TokenMDPError(f"the rollout sampler ({self.mode}) stopped without a result for {what} "
                                        f"(rollout.max_staleness = {self.k}){hint}") from None
                continue
            if got == "error":
                raise TokenMDPError(f"the rollout sampler ({self.mode}) failed:\n{packed}")
            self.ready[got] = (packed, seconds)
            self.sent.pop(got, None)

    def batch(self, step: int) -> tuple[Batch, dict]:
        """The scored batch of ``step`` (waiting for the sampler if need be) and its ``async/`` and ``time/``
        metrics."""
        t0 = time.perf_counter()
        self._wait_for(step)
        wait = time.perf_counter() - t0
        packed, seconds = self.ready.pop(step)
        rollout = unpack_rollout(packed, self.rollouts.device)
        batch = self.rollouts.score(self.stream[step - 1], rollout, {"time/rollout": seconds})
        return batch, {"time/wait": wait, "async/staleness": staleness(step, self.k)}

    def in_flight(self, step: int) -> dict[str, Any]:
        """What a checkpoint at ``step`` carries: ``{file name: the packed batches of steps step + 1 .. step + k}``
        (waiting for the sampler to finish them)."""
        steps = [s for s in range(step + 1, step + self.k + 1) if s <= self.last]
        for s in steps:
            self._wait_for(s)
        return {IN_FLIGHT_FILE: {"max_staleness": self.k, "batches": {s: self.ready[s][0] for s in steps}}}

    def close(self) -> None:
        """Stop the sampler (it finishes the batch it is sampling)."""
        self.requests.put(None)
        self.worker.join(timeout=30)
        if self.mode == "process" and self.worker.is_alive():
            self.worker.terminate()
            self.worker.join(timeout=5)


def load_in_flight(checkpoint: Path, step: int, max_staleness: int, last: int) -> dict[int, dict]:
    """The batches of steps ``step + 1 .. step + k`` that the checkpoint at ``step`` carries (packed)."""
    file = Path(checkpoint) / IN_FLIGHT_FILE
    if not file.is_file():
        raise TokenMDPError(f"checkpoint {checkpoint} has no {IN_FLIGHT_FILE}: it cannot continue a run with config "
                            f"field 'rollout.max_staleness' = {max_staleness} exactly (the batches sampled ahead "
                            "are missing)")
    data = torch.load(file, map_location="cpu", weights_only=False)
    batches = {int(s): b for s, b in data.get("batches", {}).items()}
    wanted = [s for s in range(step + 1, step + max_staleness + 1) if s <= last]
    if data.get("max_staleness") != max_staleness or sorted(batches) != wanted:
        raise TokenMDPError(f"{file} holds the batches of steps {sorted(batches)} for rollout.max_staleness = "
                            f"{data.get('max_staleness')}; this run needs steps {wanted} "
                            f"(rollout.max_staleness = {max_staleness})")
    return batches


__all__ = ["AsyncSampler", "behaviour_step", "staleness", "load_in_flight", "trained_weights", "IN_FLIGHT_FILE"]
