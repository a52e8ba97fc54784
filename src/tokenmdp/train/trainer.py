"""The training loop: one on-policy loop for every algorithm of the family.

Each step takes the step's prompts from :func:`prompt_stream` (a function of the seed only), rolls out groups of
``G`` responses with the run's engine, scores them with the task's verifier, and hands the batch to the update of
the algorithm's kind: policy gradient (:mod:`tokenmdp.train.pg`: REINFORCE, RLOO, the GRPO family, PPO), filtered
iterative SFT or DPO (:mod:`tokenmdp.train.supervised`). A run folder records everything (module
:mod:`tokenmdp.train.run_dir`); ``resume=True`` continues from the newest checkpoint and, on a CPU, ends with the
same parameters as an uninterrupted run. With ``rollout.max_staleness = k > 0`` the batches come from a sampler that
runs ahead of the learner (module :mod:`tokenmdp.train.async_rollout`: the batch of step ``t`` sampled with the
weights of step ``max(0, t - 1 - k)``, exactly); ``k = 0`` is the synchronous loop.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable

from tokenmdp.errors import TokenMDPError
from tokenmdp.locks import exclusive
from tokenmdp.train.async_rollout import AsyncSampler, load_in_flight
from tokenmdp.train.batch import batch_metrics, collect, reduce_over_processes, sample_rows
from tokenmdp.train.checkpoint import latest_checkpoint
from tokenmdp.train.config import TrainConfig, validate
from tokenmdp.train.data import load_pairs, pair_stream, prompt_stream
from tokenmdp.train.evaluation import eval_problems, held_out
from tokenmdp.train.log import MetricsLogger, SampleLogger
from tokenmdp.train.pg import pg_update
from tokenmdp.train.run_dir import finish_run, open_run, save_step
from tokenmdp.train.setup import Components, build_components
from tokenmdp.train.sharding import full_weights
from tokenmdp.train.supervised import dpo_update, isft_update

__all__ = ["train", "prompt_stream", "run_step"]


def _callbacks(callbacks: Iterable[Any] | None) -> tuple[list, list]:
    """Split callbacks into ``on_batch(c, batch, step) -> dict | None`` (before the update) and
    ``on_step(step, record, c)`` (after logging); a plain callable is an ``on_step``."""
    before, after = [], []
    for cb in callbacks or []:
        if hasattr(cb, "on_batch"):
            before.append(cb.on_batch)
        if hasattr(cb, "on_step"):
            after.append(cb.on_step)
        elif callable(cb) and not hasattr(cb, "on_batch"):
            after.append(cb)
    return before, after


def _shard(items: list, c: Components) -> list:
    """This process's share of the step's prompts (every process rolls out and trains on its own share)."""
    acc = c.accelerator
    return items if acc.num_processes == 1 else items[acc.process_index :: acc.num_processes]


def run_step(c: Components, items: list, step: int, *, samples: SampleLogger | None = None,
             before: list[Callable] = (), sampler: AsyncSampler | None = None) -> dict:
    """One training step on ``items`` (problems, or offline DPO pairs); returns the step's metrics. With a
    ``sampler`` (``rollout.max_staleness > 0``) the batch is the one it sampled ahead, and the weights after the
    update go to it."""
    t0 = time.perf_counter()
    spec, record = c.spec, {}
    offline = spec.trains_on_pairs(c.config.task.dpo_data)
    batch = None
    if not offline:
        if sampler is None:
            with full_weights(c.fsdp):  # a sharded policy is whole while it samples
                batch = collect(c, _shard(items, c), step=step)
        else:
            batch, info = sampler.batch(step)
            record.update(info)
        record.update(batch_metrics(batch, c))
        record.update(batch.times)
        if samples is not None and c.config.run.log_samples:  # every process: the rows are gathered
            rows = sample_rows(batch, step=step, algo=c.config.algo.name, seed=c.config.run.seed, c=c)
            samples.add(rows)
    for hook in before:
        record.update(hook(c, batch, step) or {})
    record["lr"] = c.scheduler.get_last_lr()[0]
    skipped_before = int(c.state.get("nonfinite_steps", 0))
    t1 = time.perf_counter()
    if spec.kind == "pg":
        update = pg_update(c, batch, step=step)
    elif spec.kind == "isft":
        update = isft_update(c, batch, step=step)
    else:
        update = dpo_update(c, batch, step=step, pairs=_shard(items, c) if offline else None)
    record.update(reduce_over_processes(c, update))
    record["update/nonfinite_steps"] = int(c.state.get("nonfinite_steps", 0)) - skipped_before
    _schedule_step(c)
    c.engine.sync_weights(c.unwrapped())
    record["time/update"] = time.perf_counter() - t1
    if sampler is not None:
        sampler.after_update(step)
    record["time/step"] = time.perf_counter() - t0
    return record


def _check_nonfinite(c: Components, path: Path, step: int) -> None:
    """Stop the run when ``optim.max_nonfinite_steps`` optimizer steps in a row were skipped for a NaN or Inf
    loss or gradient: the parameters are still those before the first of them (skipped steps change nothing), and
    the checkpoints already written are intact."""
    limit, in_row = c.config.optim.max_nonfinite_steps, int(c.state.get("nonfinite_in_row", 0))
    if limit and in_row >= limit:
        ckpt = latest_checkpoint(path / "checkpoints", verify=False)
        last = f"the last checkpoint, step {ckpt.step}, is intact" if ckpt else "no checkpoint was written yet"
        raise TokenMDPError(f"{in_row} optimizer steps in a row had a non-finite loss or gradient (up to training "
                            f"step {step}; config field 'optim.max_nonfinite_steps' is {limit}): the run stops "
                            f"without using them; {last} ({path}); lower optim.lr or check the rewards")


def _schedule_step(c: Components) -> None:
    """Advance the learning-rate schedule by one training step, whether or not the step updated the model (an
    iterative-SFT step with no kept response, a DPO step with no pair); torch warns about a scheduler step before
    the first optimizer step, which here is by design: the schedule counts training steps, not updates."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        c.scheduler.step()


def _stream(c: Components) -> list[list]:
    """The prompts (or offline pairs) of every step; with overlapped rollouts also of the ``k`` steps past the end
    (sampled ahead so that the last checkpoint extends exactly; the stream is prefix-stable)."""
    cfg = c.config
    if c.spec.trains_on_pairs(cfg.task.dpo_data):
        pairs = load_pairs(cfg.task.dpo_data)
        return pair_stream(pairs, seed=cfg.run.seed, steps=cfg.run.steps, pairs_per_step=cfg.rollout.prompts_per_step)
    return prompt_stream(c.task, seed=cfg.run.seed, steps=cfg.run.steps + cfg.rollout.max_staleness,
                         prompts_per_step=cfg.rollout.prompts_per_step, split=cfg.task.train_split)


def _sampler(c: Components, run, stream: list[list], start: int) -> AsyncSampler | None:
    """The sampler of overlapped rollouts (None for the synchronous loop, ``rollout.max_staleness = 0``)."""
    k = c.config.rollout.max_staleness
    if k == 0:
        return None
    in_flight = None
    if run.checkpoint is not None:
        in_flight = load_in_flight(run.checkpoint.path, start, k, c.config.run.steps + k)
    return AsyncSampler(c, stream, start=start, in_flight=in_flight)


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
    more ``run.steps`` is extended). ``callbacks``: objects with ``on_batch(c, batch, step) -> dict | None``
    (called before each update; returned metrics are logged) and/or ``on_step(step, record, c)`` (after each
    step is logged), or plain callables ``fn(step, record, c)``.
    """
    validate(config)
    with exclusive(config.run_dir(), what="run folder"):
        return _train(config, resume=resume, progress=progress, callbacks=callbacks)


def _train(config: TrainConfig, *, resume: bool, progress: bool, callbacks: Iterable[Any] | None) -> Path:
    run = open_run(config, resume=resume)
    if run.already_done:
        return run.path
    c = build_components(config, run.path, resume_from=run.checkpoint_path)
    start = run.restore(c)
    stream = _stream(c)
    held = eval_problems(c) if config.run.eval_every > 0 else None
    run.begin(c)
    main = c.accelerator.is_main_process
    metrics = MetricsLogger(run.path / "metrics.jsonl", resume_step=start if run.resumed else None,
                            trackers=c.accelerator if config.run.report_to != "none" else None) if main else None
    samples = SampleLogger(run.path / "samples.parquet", resume_step=start if run.resumed else None,
                           enabled=config.run.log_samples and main)
    before, after = _callbacks(callbacks)
    label = f"train {config.algo.name} seed {config.run.seed}"
    if held is not None and config.run.eval_before and start == 0 and not run.resumed:  # the start policy
        # (a resumed run with no checkpoint kept its logged step 0)
        record = held_out(c, held, step=0)
        if metrics is not None:
            metrics.log(0, record)
    sampler = _sampler(c, run, stream, start)
    extra = sampler.in_flight if sampler is not None else None
    try:
        with _progress(progress and main, config.run.steps, start, label) as advance:
            for step in range(start + 1, config.run.steps + 1):
                record = run_step(c, stream[step - 1], step, samples=samples, before=before, sampler=sampler)
                if _eval_due(config, step):
                    record.update(held_out(c, held, step=step))
                if metrics is not None:
                    record = metrics.log(step, record)
                for hook in after:
                    hook(step, record, c)
                _check_nonfinite(c, run.path, step)
                if config.run.save_every and step % config.run.save_every == 0 and step < config.run.steps:
                    save_step(c, run.path, step, samples, extra_objects=extra(step) if extra else None)
                advance(_info(record))
        finish_run(c, run.path, samples, started=run.started, extra_objects=extra)
    finally:
        if sampler is not None:
            sampler.close()
    return run.path
