"""The run folder: creating it without overwriting anything, resuming it, checkpointing it, finishing it.

Layout (``docs/interfaces.md``)::

    config.yaml          the full config (what ``--resume`` checks the new config against)
    metrics.jsonl        one JSON object a step
    samples.parquet      prompt, completion, reward, correct, length, step, group, algo, seed
    checkpoints/step-N/  model/ (save_pretrained + tokenizer), optimizer, scheduler, RNG and trainer state
    final/               the last policy: save_pretrained model + tokenizer + tokenmdp.json of the base model
    DONE                 written last (JSON: steps, algo, seed, seconds)

A folder that exists is never reused silently: without ``resume`` it is an error unless ``run.overwrite`` is set,
and then it is only deleted once the model, task and engine have been built (bad input loses nothing). A run that
stops early has no ``DONE`` and no ``final/``: it cannot be mistaken for a finished one.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from tokenmdp.atomic import is_leftover, remove_leftovers, write_folder
from tokenmdp.errors import TokenMDPError
from tokenmdp.train.checkpoint import Checkpoint, latest_checkpoint, save_checkpoint, save_model
from tokenmdp.policy.adapters import trainable_state
from tokenmdp.policy.model import META_FILE, read_meta
from tokenmdp.train.config import TrainConfig, save_config
from tokenmdp.train.learner import Learner, TrainerState
from tokenmdp.train.sharding import full_state_dict, load_optimizer_state, optimizer_state
from tokenmdp.train.trackers import PROJECT, init_kwargs, requested, run_name

#: config fields that may change when a run is resumed (everything else must match config.yaml)
RESUMABLE_CHANGES = {"run.steps", "run.save_every", "run.keep_last", "run.eval_every", "run.eval_n", "run.eval_greedy",
                     "run.eval_k", "run.eval_temperature", "run.log_samples", "run.overwrite", "run.out",
                     "run.report_to", "run.equivalence", "run.kl_to_base", "run.eval_before", "model.cache_dir",
                     "rollout.async_worker"}


#: files that mark a folder as a run folder (only such a folder is ever deleted by run.overwrite)
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "DONE")


def _section_fields(data: dict, prefix: str = "") -> dict:
    """The config's fields under ``section.field`` keys (one level deep: a mapping-valued field stays whole)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and prefix.count(".") < 1:
            out.update(_section_fields(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _scalar_leaves(data: dict, prefix: str = "") -> dict:
    """Every scalar leaf of a nested dict under its dotted key (the trackers' hyperparameters)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_scalar_leaves(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            out[f"{prefix}{key}"] = value
    return out


def check_same_run(config: TrainConfig, path: Path) -> None:
    """A resumed run must be the same run: every field outside :data:`RESUMABLE_CHANGES` equals config.yaml's."""
    file = path / "config.yaml"
    if not file.is_file():
        raise TokenMDPError(f"cannot resume {path}: it has no config.yaml (not a run folder)")
    saved = TrainConfig.from_dict(yaml.safe_load(file.read_text()) or {}, source=str(file))
    old, new = _section_fields(saved.to_dict()), _section_fields(config.to_dict())
    if old.get("model.path") is None and new.get("model.path") and read_meta(new["model.path"], required=False):
        old["model.path"] = new["model.path"]  # a run folder from before the commands filled in the embedded base
    for key in sorted(set(old) | set(new)):
        if key not in RESUMABLE_CHANGES and old.get(key) != new.get(key):
            raise TokenMDPError(f"cannot resume {path}: config field {key!r} is {new.get(key)!r} here but "
                                f"{old.get(key)!r} in {file}")


@dataclass
class RunHandle:
    """Where a run stands before its loop starts."""

    config: TrainConfig
    path: Path
    resumed: bool
    checkpoint: Checkpoint | None = None
    already_done: bool = False
    started: float = field(default_factory=time.perf_counter)

    @property
    def checkpoint_path(self) -> Path | None:
        return self.checkpoint.path if self.checkpoint is not None else None

    def restore(self, learner: Learner) -> int:
        """Load optimizer, scheduler, critic-optimizer, RNG and trainer state; returns the steps already done."""
        if self.checkpoint is None:
            return 0
        sharded = learner.fsdp is not None
        self.checkpoint.load_into(optimizer=None if sharded else learner.optimizer, scheduler=learner.scheduler,
                                  critic_optimizer=learner.critic_optimizer)
        if sharded:  # the full moments, each process keeping its shard
            load_optimizer_state(learner.model, learner.optimizer, torch.load(
                self.checkpoint.path / "optimizer.pt", map_location="cpu", weights_only=False))
        learner.state = TrainerState.from_dict(self.checkpoint.state.get("trainer"))
        return self.checkpoint.step

    def begin(self, accelerator) -> None:
        """Create (or reopen) the folder once everything is built: config.yaml written, DONE and final/ removed;
        the trackers (``run.report_to``) start on ``accelerator``."""
        if not accelerator.is_main_process:
            return
        if not self.resumed and self.path.exists():
            shutil.rmtree(self.path)  # only reached with run.overwrite (open_run refuses otherwise)
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in (self.path / "DONE", self.path / "final"):
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.exists():
                stale.unlink()
        save_config(self.config, self.path / "config.yaml")
        names = requested(self.config.run.report_to)
        if names:  # after the folder is (re)created, so the trackers' files survive
            accelerator.init_trackers(PROJECT, config=_scalar_leaves(self.config.to_dict()),
                                      init_kwargs=init_kwargs(names, self.path, run_name(self.path)))


def nothing_done(path: Path) -> bool:
    """Whether a run folder holds nothing of a run: absent, empty, or only the hidden temporary folders of a write
    that was killed (a run killed in its first seconds, before it wrote ``config.yaml``)."""
    path = Path(path)
    if not path.exists():
        return True
    return path.is_dir() and all(is_leftover(child) for child in path.iterdir())


def open_run(config: TrainConfig, *, resume: bool) -> RunHandle:
    """Check the run folder against ``resume`` / ``run.overwrite`` before anything is built or written.

    ``resume`` on an existing folder that holds nothing of a run (:func:`nothing_done`: killed before it wrote
    anything) starts the run from step 0; a folder that does not exist is an error here (a mistyped path), which
    ``tokenmdp train --resume`` turns into a fresh start."""
    path = config.run_dir()
    if resume and path.is_dir() and nothing_done(path):
        resume = False  # the hidden leftovers of a killed write are cleared below; anything else stays
    if not resume:
        if path.exists() and not path.is_dir():
            raise TokenMDPError(f"run folder {path} is a file")
        if path.is_dir() and nothing_done(path):
            remove_leftovers(path)  # hidden leftovers of a write that was killed: not a run
        if path.exists() and any(path.iterdir()):
            if not config.run.overwrite:
                raise TokenMDPError(f"run folder {path} already exists; pass --resume to continue it, --overwrite "
                                    "to replace it, or choose another --out")
            if not any((path / name).exists() for name in RUN_MARKERS):
                raise TokenMDPError(f"--overwrite: {path} is not a run folder (no {' or '.join(RUN_MARKERS)}); "
                                    "refusing to delete it")
        return RunHandle(config, path, resumed=False)
    if not path.is_dir():
        raise TokenMDPError(f"cannot resume {path}: no such run folder")
    check_same_run(config, path)
    remove_leftovers(path)  # a kill inside the final/ write left its temporary folder here
    ckpt = latest_checkpoint(path / "checkpoints")
    if ckpt is not None and ckpt.step > config.run.steps:
        raise TokenMDPError(f"cannot resume {path} with run.steps={config.run.steps}: it already has a checkpoint "
                            f"at step {ckpt.step}")
    done = (path / "DONE").exists() and ckpt is not None and ckpt.step == config.run.steps
    return RunHandle(config, path, resumed=True, checkpoint=ckpt, already_done=done)


def checkpoint_state(learner: Learner, config: TrainConfig) -> dict:
    """The trainer part of ``trainer_state.json``: the learner's running counters and the run's identity."""
    return {"trainer": learner.state.to_dict(), "algo": config.algo.name, "seed": config.run.seed}


def gathered(learner: Learner) -> tuple[dict | None, dict | None]:
    """A sharded policy's full state dict and full optimizer state on the main process (every process calls it:
    they are gathered); ``(None, None)`` for an unsharded one."""
    if learner.fsdp is None:
        return None, None
    main = learner.accelerator.is_main_process
    return full_state_dict(learner.model, main=main), optimizer_state(learner.model, learner.optimizer)


def save_step(learner: Learner, path: Path, step: int, samples, *, tokenizer, config: TrainConfig,
              meta_file: Path | None, states: tuple[dict | None, dict | None] | None = None,
              extra_objects: dict | None = None) -> Path | None:
    """Flush the samples and write ``checkpoints/step-<step>`` (main process; others wait). A sharded policy's
    state is gathered first (every process), unless ``states`` holds what :func:`gathered` returned;
    ``meta_file``: the base model's ``tokenmdp.json``, copied beside the weights; ``extra_objects``: files written
    with ``torch.save`` into it (the in-flight batches of overlapped rollouts)."""
    model_state, optim_state = gathered(learner) if states is None else states
    out = None
    acc = learner.accelerator
    if acc.is_main_process:
        if samples is not None:
            samples.flush()
        critic = acc.unwrap_model(learner.critic) if learner.critic is not None else None
        if critic is not None and learner.adapter is not None:  # under LoRA: the critic's adapter and head only
            critic = trainable_state(critic)
        out = save_checkpoint(
            path / "checkpoints", step, model=learner.saveable(), tokenizer=tokenizer,
            optimizer=optim_state if learner.fsdp is not None else learner.optimizer, model_state=model_state,
            scheduler=learner.scheduler, critic=critic, critic_optimizer=learner.critic_optimizer,
            state=checkpoint_state(learner, config), keep_last=config.run.keep_last,
            extra_files={"tokenmdp.json": meta_file}, extra_objects=extra_objects,
        )
    acc.wait_for_everyone()
    return out


def finish_run(learner: Learner, path: Path, samples, *, started: float, tokenizer, config: TrainConfig,
               meta_file: Path | None, extra_objects=None) -> None:
    """Last checkpoint (so the run can be extended), ``final/`` (atomically), samples, then ``DONE``.
    ``extra_objects``: a function of the step giving the checkpoint's extra files (see :func:`save_step`)."""
    steps = config.run.steps
    ckpt = latest_checkpoint(path / "checkpoints", verify=False)  # written by this process: no need to re-hash
    # every process has looked before the main one writes the last checkpoint: a slower process that looked after
    # it would skip save_step's barrier, finish one barrier early and leave the main process waiting alone
    learner.accelerator.wait_for_everyone()
    model_state, optim_state = gathered(learner)
    if ckpt is None or ckpt.step != steps:
        save_step(learner, path, steps, samples, tokenizer=tokenizer, config=config, meta_file=meta_file,
                  states=(model_state, optim_state), extra_objects=extra_objects(steps) if extra_objects else None)
    acc = learner.accelerator
    if acc.is_main_process:
        write_folder(path / "final", lambda tmp: save_model(tmp, learner.saveable(), tokenizer,
                                                            {META_FILE: meta_file}, state_dict=model_state),
                     replace=True)
        if samples is not None:
            samples.flush()
        done = {"steps": steps, "algo": config.algo.name, "seed": config.run.seed,
                "seconds": round(time.perf_counter() - started, 2)}
        (path / "DONE").write_text(json.dumps(done) + "\n")
    if requested(config.run.report_to):
        acc.end_training()
    acc.wait_for_everyone()
