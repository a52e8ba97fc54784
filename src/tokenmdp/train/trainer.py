"""The training loop, and one step of it, for every algorithm of the family.

Each step takes the step's prompts from :func:`prompt_stream` (a function of the seed only), rolls out groups of
``G`` responses with the run's engine and scores them with the task's verifier (:class:`Rollouts`), and hands the
batch to the algorithm's unit (:mod:`tokenmdp.train.algorithms`: policy gradient, filtered SFT or DPO), which
takes its optimizer steps through the :class:`~tokenmdp.train.learner.Learner`. A run folder records everything
(:mod:`tokenmdp.train.run_dir`); ``resume=True`` continues from the newest checkpoint and, on a CPU, ends with the
same parameters as an uninterrupted run. With ``rollout.max_staleness = k > 0`` the batches come from a sampler
that runs ahead of the learner (:mod:`tokenmdp.train.async_rollout`: the batch of step ``t`` sampled with the
weights of step ``max(0, t - 1 - k)``, exactly); ``k = 0`` is the synchronous loop. The route of one GRPO step,
file by file, is in ``docs/design.md`` (section 5).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenmdp.errors import TokenMDPError
from tokenmdp.locks import exclusive

from tokenmdp.train.algorithms import Algorithm
from tokenmdp.train.async_rollout import AsyncSampler, load_in_flight
from tokenmdp.train.batch import Batch, base_kl_metrics, batch_metrics, sample_rows
from tokenmdp.train.checkpoint import latest_checkpoint
from tokenmdp.train.config import TrainConfig, validate
from tokenmdp.train.data import load_pairs, pair_stream, prompt_stream, render_prompts
from tokenmdp.train.environment import RunEnvironment, collect_episodes
from tokenmdp.train.evaluation import eval_problems, held_out
from tokenmdp.train.grad_share import GradShare
from tokenmdp.train.learner import Learner
from tokenmdp.train.meter import reduce_over_processes
from tokenmdp.train.log import MetricsLogger, SampleLogger
from tokenmdp.train.run_dir import finish_run, open_run, save_step
from tokenmdp.train.setup import build_run
from tokenmdp.train.sharding import full_weights
from tokenmdp.train.trackers import Trackers, requested

__all__ = ["Rollouts", "build_step", "make_rollouts", "prompt_stream", "run_step", "step_seed", "train"]


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of training step ``step`` (1-based): a function of the run seed and the step only."""
    return (int(seed) * 1_000_003 + int(step) * 7_919) % (2**31 - 1)


@dataclass
class Rollouts:
    """The experience of a step: prompts rendered, ``G`` responses each sampled by the run's ``engine``, and
    every response scored by the task's verifier (or, with ``env``, ``G`` episodes of a multi-turn environment)."""

    task: Any
    tokenizer: Any
    engine: Any
    group_size: int
    max_new_tokens: int
    seed: int
    device: torch.device
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    template: str | None = None
    chat_template: bool = False
    env: RunEnvironment | None = None

    def render(self, problems: list) -> list[str]:
        """The prompt text of each problem (the task's template, wrapped in the chat template when asked)."""
        return render_prompts(self.task, problems, template=self.template, tokenizer=self.tokenizer,
                              chat=self.chat_template)

    def sampling(self, step: int) -> dict:
        """The keyword arguments of ``engine.generate`` for training step ``step`` (its seed included)."""
        return dict(n=self.group_size, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                    top_p=self.top_p, top_k=self.top_k, seed=step_seed(self.seed, step))

    def score(self, problems: list, rollout, times: dict) -> Batch:
        """Score every response of ``rollout`` (sampled for ``problems``, ``G`` rows each) with the task's
        verifier; ``times`` gets the scoring time as ``time/score``."""
        group = self.group_size
        t1 = time.perf_counter()
        rows = [p for p in problems for _ in range(group)]
        scores = [self.task.score(p, text) for p, text in zip(rows, rollout.responses)]
        t2 = time.perf_counter()
        return Batch(
            rollout=rollout,
            problems=rows,
            scores=scores,
            rewards=torch.tensor([s.reward for s in scores], dtype=torch.float32, device=self.device),
            correct=torch.tensor([s.correct for s in scores], dtype=torch.bool, device=self.device),
            formatted=torch.tensor([s.formatted for s in scores], dtype=torch.bool, device=self.device),
            group_size=group,
            times={**times, "time/score": t2 - t1},
        )

    def collect(self, problems: list, *, step: int) -> Batch:
        """Render ``problems``, sample ``G`` responses each, and score every response."""
        if self.env is not None:
            return collect_episodes(self.env, self.engine, self.tokenizer, problems, self.render(problems),
                                    self.sampling(step), self.device)
        t0 = time.perf_counter()
        rollout = self.engine.generate(self.render(problems), **self.sampling(step)).to(self.device)
        return self.score(problems, rollout, {"time/rollout": time.perf_counter() - t0})


def make_rollouts(config: TrainConfig, settings, task, tokenizer, engine, env: RunEnvironment | None,
                  device) -> Rollouts:
    """The run's :class:`Rollouts` from its config, resolved settings (:func:`tokenmdp.train.setup.
    resolve_settings`) and built parts."""
    r = config.rollout
    return Rollouts(task=task, tokenizer=tokenizer, engine=engine, group_size=r.group_size,
                    max_new_tokens=settings.max_new_tokens, seed=config.run.seed, device=device,
                    temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, template=settings.template,
                    chat_template=config.task.chat_template, env=env)


def build_step(config: TrainConfig, run_dir: Path) -> tuple[Learner, Algorithm, Rollouts]:
    """The three parts of a training step built from ``config``, for scripts and tests that drive steps by hand:
    ``algorithm.update(learner, rollouts.collect(problems, step=s), step=s)``."""
    parts = build_run(config, run_dir)
    rollouts = make_rollouts(config, parts.settings, parts.task, parts.tokenizer, parts.engine, parts.env,
                             parts.learner.device)
    return parts.learner, parts.algorithm, rollouts


def _callbacks(callbacks: Iterable[Any] | None) -> tuple[list, list]:
    """Split callbacks into ``on_batch(learner, batch, step) -> dict | None`` (before the update) and
    ``on_step(step, record, learner)`` (after logging); a plain callable is an ``on_step``."""
    before, after = [], []
    for cb in callbacks or []:
        if hasattr(cb, "on_batch"):
            before.append(cb.on_batch)
        if hasattr(cb, "on_step"):
            after.append(cb.on_step)
        elif callable(cb) and not hasattr(cb, "on_batch"):
            after.append(cb)
    return before, after


def _share(items: list, accelerator) -> list:
    """This process's share of the step's prompts (every process rolls out and trains on its own share)."""
    n = accelerator.num_processes
    return items if n == 1 else items[accelerator.process_index :: n]


def run_step(learner: Learner, algorithm: Algorithm, rollouts: Rollouts, items: list, step: int, *,
             samples: SampleLogger | None = None, before: list[Callable] = (),
             sampler: AsyncSampler | None = None, offline: bool = False, label: tuple[str, int] = ("", 0)) -> dict:
    """One training step on ``items`` (problems, or offline DPO pairs when ``offline``); returns the step's
    metrics. The batch comes from ``rollouts`` (a sharded policy is whole while it samples), or with a ``sampler``
    (``rollout.max_staleness > 0``) it is the one sampled ahead, and the weights after the update go to it.
    ``samples``: the run's sample log when ``run.log_samples`` (None: no rows); ``label``: the run's algorithm name
    and seed, written beside each row of it."""
    t0 = time.perf_counter()
    acc, record = learner.accelerator, {}
    batch = None
    if not offline:
        if sampler is None:
            with full_weights(learner.fsdp):
                batch = rollouts.collect(_share(items, acc), step=step)
        else:
            batch, info = sampler.batch(step)
            record.update(info)
        record.update(batch_metrics(batch, acc))
        record.update(batch.times)
        if samples is not None:  # run.log_samples, on every process: the rows are gathered
            samples.add(sample_rows(batch, step=step, algo=label[0], seed=label[1], accelerator=acc))
    for hook in before:
        record.update(hook(learner, batch, step) or {})
    record["lr"] = learner.scheduler.get_last_lr()[0]
    skipped_before = learner.state.nonfinite_steps
    t1 = time.perf_counter()
    pairs = {"pairs": _share(items, acc)} if offline else {}
    record.update(reduce_over_processes(acc, algorithm.update(learner, batch, step=step, **pairs)))
    if learner.grad_share is not None:
        record.update(learner.grad_share.metrics())
    record["update/nonfinite_steps"] = learner.state.nonfinite_steps - skipped_before
    _schedule_step(learner.scheduler)
    rollouts.engine.sync_weights(learner.unwrapped())
    record["time/update"] = time.perf_counter() - t1
    if sampler is not None:
        sampler.after_update(step)
    record["time/step"] = time.perf_counter() - t0
    return record


def _check_nonfinite(learner: Learner, limit: int, path: Path, step: int) -> None:
    """Stop the run when ``optim.max_nonfinite_steps`` optimizer steps in a row were skipped for a NaN or Inf
    loss or gradient: the parameters are still those before the first of them (skipped steps change nothing), and
    the checkpoints already written are intact."""
    in_row = learner.state.nonfinite_in_row
    if limit and in_row >= limit:
        ckpt = latest_checkpoint(path / "checkpoints", verify=False)
        last = f"the last checkpoint, step {ckpt.step}, is intact" if ckpt else "no checkpoint was written yet"
        raise TokenMDPError(f"{in_row} optimizer steps in a row had a non-finite loss or gradient (up to training "
                            f"step {step}; config field 'optim.max_nonfinite_steps' is {limit}): the run stops "
                            f"without using them; {last} ({path}); lower optim.lr or check the rewards")


def _schedule_step(scheduler) -> None:
    """Advance the learning-rate schedule by one training step, whether or not the step updated the model (an
    iterative-SFT step with no kept response, a DPO step with no pair); torch warns about a scheduler step before
    the first optimizer step, which here is by design: the schedule counts training steps, not updates."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        scheduler.step()


def _stream(config: TrainConfig, task, offline: bool) -> list[list]:
    """The prompts (or offline pairs) of every step; with overlapped rollouts also of the ``k`` steps past the end
    (sampled ahead so that the last checkpoint extends exactly; the stream is prefix-stable)."""
    if offline:
        pairs = load_pairs(config.task.dpo_data)
        return pair_stream(pairs, seed=config.run.seed, steps=config.run.steps,
                           pairs_per_step=config.rollout.prompts_per_step)
    return prompt_stream(task, seed=config.run.seed, steps=config.run.steps + config.rollout.max_staleness,
                         prompts_per_step=config.rollout.prompts_per_step, split=config.task.train_split)


def _sampler(config: TrainConfig, learner: Learner, algorithm: Algorithm, rollouts: Rollouts, run,
             stream: list[list], start: int) -> AsyncSampler | None:
    """The sampler of overlapped rollouts (None for the synchronous loop, ``rollout.max_staleness = 0``); with
    ``rollout.async_grad_share`` it computes part of each update's gradient too (``learner.grad_share``)."""
    k = config.rollout.max_staleness
    if k == 0:
        return None
    in_flight = None
    if run.checkpoint is not None:
        in_flight = load_in_flight(run.checkpoint.path, start, k, config.run.steps + k)
    fraction = config.rollout.async_grad_share
    share = GradShare.settings(learner, algorithm, fused_layers=config.optim.fused_layers) if fraction else None
    sampler = AsyncSampler(rollouts, learner.unwrapped(), stream, start=start, max_staleness=k,
                           last=config.run.steps + k, worker=config.rollout.async_worker,
                           engine=config.rollout.engine, engine_options=config.rollout.engine_options,
                           threads=config.run.threads, in_flight=in_flight, share=share)
    learner.grad_share = GradShare(sampler, fraction) if fraction else None
    return sampler


@contextmanager
def _progress(enabled: bool, total: int, done: int, label: str):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.progress import TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=Console(stderr=True), disable=not enabled) as bar:
        task_id = bar.add_task(label, total=total, completed=done, info="")
        yield lambda info: bar.update(task_id, advance=1, info=info)


def _info(record: dict) -> str:
    parts = []
    for key, short in (("reward/mean", "reward"), ("reward/accuracy", "acc"), ("eval/accuracy", "eval")):
        if record.get(key) is not None:
            parts.append(f"{short} {record[key]:.3f}")
    return " ".join(parts)


def _eval_due(config: TrainConfig, step: int) -> bool:
    every = config.run.eval_every
    return every > 0 and (step % every == 0 or step == config.run.steps)


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True,
          callbacks: Iterable[Any] | None = None) -> Path:
    """Train as ``config`` says; returns the run folder (see :mod:`tokenmdp.train.run_dir` for its files).

    ``resume=True`` continues the run in ``config.run_dir()`` from its newest checkpoint (a finished run with
    more ``run.steps`` is extended). ``callbacks``: objects with ``on_batch(learner, batch, step) -> dict | None``
    (called before each update; returned metrics are logged) and/or ``on_step(step, record, learner)`` (after
    each step is logged), or plain callables ``fn(step, record, learner)``; ``learner`` is the run's
    :class:`~tokenmdp.train.learner.Learner`.
    """
    validate(config)
    with exclusive(config.run_dir(), what="run folder"):
        return _train(config, resume=resume, progress=progress, callbacks=callbacks)


def _train(config: TrainConfig, *, resume: bool, progress: bool, callbacks: Iterable[Any] | None) -> Path:
    run = open_run(config, resume=resume)
    if run.already_done:
        return run.path
    parts = build_run(config, run.path, resume_from=run.checkpoint_path)
    learner, algorithm = parts.learner, parts.algorithm
    rollouts = make_rollouts(config, parts.settings, parts.task, parts.tokenizer, parts.engine, parts.env,
                             learner.device)
    start = run.restore(learner)
    offline = parts.spec.trains_on_pairs(config.task.dpo_data)
    stream = _stream(config, rollouts.task, offline)
    held = eval_problems(rollouts.task, config) if config.run.eval_every > 0 else None
    run.begin(learner.accelerator)
    main = learner.accelerator.is_main_process
    names = requested(config.run.report_to)
    trackers = Trackers(learner.accelerator, names, config.run.steps) if names and main else None
    metrics = MetricsLogger(run.path / "metrics.jsonl", resume_step=start if run.resumed else None,
                            trackers=trackers) if main else None
    samples = SampleLogger(run.path / "samples.parquet", resume_step=start if run.resumed else None,
                           enabled=config.run.log_samples and main)
    before, after = _callbacks(callbacks)
    if config.run.kl_to_base:
        before.append(base_kl_metrics)
    label = f"train {config.algo.name} seed {config.run.seed}"
    evaluate = (lambda step: held_out(learner, rollouts, config.run, held, step=step)) if held is not None else None
    if evaluate is not None and config.run.eval_before and start == 0 and not run.resumed:  # the start policy
        # (a resumed run with no checkpoint kept its logged step 0)
        record = evaluate(0)
        if metrics is not None:
            metrics.log(0, record)
    sampler = _sampler(config, learner, algorithm, rollouts, run, stream, start)
    extra = sampler.in_flight if sampler is not None else None
    save = dict(tokenizer=rollouts.tokenizer, config=config, meta_file=parts.settings.meta_file)
    try:
        with _progress(progress and main, config.run.steps, start, label) as advance:
            for step in range(start + 1, config.run.steps + 1):
                record = run_step(learner, algorithm, rollouts, stream[step - 1], step,
                                  samples=samples if config.run.log_samples else None, before=before,
                                  sampler=sampler, offline=offline, label=(config.algo.name, config.run.seed))
                if _eval_due(config, step):
                    record.update(evaluate(step))
                if metrics is not None:
                    record = metrics.log(step, record)
                if trackers is not None and config.run.log_samples and trackers.table_due(step):
                    trackers.log_completions(samples.rows_of_step(step), step)
                for hook in after:
                    hook(step, record, learner)
                _check_nonfinite(learner, config.optim.max_nonfinite_steps, run.path, step)
                if config.run.save_every and step % config.run.save_every == 0 and step < config.run.steps:
                    save_step(learner, run.path, step, samples, **save,
                              extra_objects=extra(step) if extra else None)
                advance(_info(record))
        finish_run(learner, run.path, samples, started=run.started, extra_objects=extra, **save)
    finally:
        if sampler is not None:
            learner.grad_share = None
            sampler.close()
    return run.path
