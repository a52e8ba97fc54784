"""Building what a run needs from its config: the task, the policy and its engine, the frozen reference, the
critic, the optimizers and schedule, all placed by ``accelerate``.

The model folder's ``tokenmdp.json`` (written by ``tokenmdp pretrain``) supplies defaults that the config leaves
open: the task options, the prompt template and ``max_new_tokens`` of the embedded tiny base model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from tokenmdp.algos.presets import AlgoSpec
from tokenmdp.errors import TokenMDPError
from tokenmdp.policy import fused_layers
from tokenmdp.policy.model import ModelDefaults, model_defaults
from tokenmdp.train.algorithms import Algorithm, make_algorithm
from tokenmdp.train.batch import step_rewards
from tokenmdp.train.config import TrainConfig, resolve_algo
from tokenmdp.train.environment import RunEnvironment, build_environment
from tokenmdp.train.learner import Learner
from tokenmdp.train.micro import auto_micro_batch_tokens
from tokenmdp.train.trackers import accelerator_kwargs, requested

if TYPE_CHECKING:
    from accelerate import Accelerator

    from tokenmdp.train.sharding import Sharding


def resolve_model_path(config: TrainConfig) -> str:
    """``model.path``: a local folder or file (expanded), else taken as a hub id. ``train/`` is handed a model; it
    never builds one (the commands fill in the embedded base model, :func:`tokenmdp.base.store.ensure_tiny_base`)."""
    if not config.model.path:
        raise TokenMDPError("config field 'model.path' is empty: name a model folder, a .gguf file or a hub id "
                            "(`tokenmdp train` fills in the embedded base model)")
    path = Path(config.model.path).expanduser()
    return str(path) if path.exists() else config.model.path  # a hub id when not a local path


@dataclass(frozen=True)
class Settings:
    """Config values after the model folder's defaults are filled in (:func:`tokenmdp.policy.model.
    model_defaults`, the same resolution ``compare`` and ``eval`` use)."""

    model_path: str
    task_options: dict
    template: str | None
    max_new_tokens: int
    meta_file: Path | None


def resolve_settings(config: TrainConfig) -> Settings:
    """Fill the open config values from the model folder's ``tokenmdp.json`` (same task only)."""
    model_path = resolve_model_path(config)
    d: ModelDefaults = model_defaults(model_path, config.task.name, config.task.options, config.task.template,
                                      config.rollout.max_new_tokens)
    return Settings(model_path, d.task_options, d.template, d.max_new_tokens, d.meta_file)


def check_fit(spec: AlgoSpec, config: TrainConfig, max_new_tokens: int) -> None:
    """Settings of the algorithm that must fit the rollout settings (checked before anything is written)."""
    if spec.group_based and not spec.trains_on_pairs(config.task.dpo_data) and config.rollout.group_size < 2:
        raise TokenMDPError(f"algo {spec.name!r} compares responses within a group: rollout.group_size must be at "
                            f"least 2, got {config.rollout.group_size}")
    if config.rollout.max_staleness > 0 and spec.trains_on_pairs(config.task.dpo_data):
        raise TokenMDPError(f"config field 'rollout.max_staleness' is {config.rollout.max_staleness}, but offline "
                            f"DPO (task.dpo_data) samples no rollouts to overlap: set rollout.max_staleness=0")
    if spec.overlong_buffer > max_new_tokens:
        raise TokenMDPError(f"config field 'algo.overlong_buffer' is {spec.overlong_buffer}, more than "
                            f"rollout.max_new_tokens = {max_new_tokens}")


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the base learning rate at training step ``s`` (0-based): linear warmup over ``warmup`` steps,
    then constant, linear decay to 0, or cosine decay to 0 over the remaining ``total - warmup`` steps.

    Example: warmup 2, total 6, cosine: ``[0.5, 1.0, 1.0, 0.854, 0.5, 0.146]``.
    """

    def fn(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def check_processes(config: TrainConfig, spec: AlgoSpec, num_processes: int) -> None:
    """Settings a run in several processes needs: every process takes the same number of optimizer steps (the
    gradients are averaged at each), so the prompts of a step split evenly, and a process whose share keeps fewer
    rows (filtered SFT, DPO pairs, dynamic sampling) must not cut them into a different number of minibatches."""
    if config.run.fsdp and num_processes <= 1:
        raise TokenMDPError("config field 'run.fsdp' is true but the run has one process: sharding needs two or more "
                            "(accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes N ..., or "
                            "set run.fsdp=false)")
    if num_processes <= 1:
        return
    if config.rollout.max_staleness > 0:
        raise TokenMDPError(f"config field 'rollout.max_staleness' is {config.rollout.max_staleness}: overlapped "
                            f"rollouts run in a single process (its sampler uses the idle core), not in "
                            f"{num_processes}; set rollout.max_staleness=0")
    if config.rollout.prompts_per_step % num_processes:
        raise TokenMDPError(f"config field 'rollout.prompts_per_step' ({config.rollout.prompts_per_step}) must be a "
                            f"multiple of the number of processes ({num_processes})")
    uneven = spec.kind in ("isft", "dpo") or spec.filter_groups or spec.keep != "all"
    if uneven and config.optim.minibatch_size is not None:
        raise TokenMDPError(f"config field 'optim.minibatch_size' must be null (one minibatch a step) for "
                            f"{spec.name!r} in {num_processes} processes: their shares keep unequal numbers of rows")


def make_accelerator(config: TrainConfig, run_dir: Path) -> Accelerator:
    """An ``accelerate.Accelerator`` for the run's device and mixed precision (trackers when asked)."""
    from accelerate import Accelerator

    device = config.run.device
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise TokenMDPError("config field 'run.device' is 'cuda' but no CUDA device is available")
    kwargs: dict[str, Any] = {"mixed_precision": config.run.mixed_precision, "cpu": cpu}
    kwargs.update(accelerator_kwargs(requested(config.run.report_to), run_dir))
    try:
        accelerator = Accelerator(**kwargs)
    except ValueError as exc:
        raise TokenMDPError(f"config field 'run.mixed_precision': {exc}") from None
    if accelerator.distributed_type.value == "FSDP":
        raise TokenMDPError("accelerate's own FSDP (distributed_type: FSDP) wraps the model's forward, which the "
                            "trainer never calls: launch with configs/accelerate/fsdp.yaml (distributed_type: "
                            "MULTI_GPU) and set config field 'run.fsdp' to true, which shards with the same FSDP2")
    return accelerator


def _load(path: str, config: TrainConfig, device, *, trainable: bool):
    from tokenmdp.policy.model import load_policy

    policy = load_policy(path, dtype=config.model.dtype, device=device, gguf_file=config.model.gguf_file)
    policy.model.eval()  # no dropout: behaviour and teacher-forced log-probs agree
    if not trainable:
        policy.model.requires_grad_(False)
    return policy


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing of every decoder layer, non-reentrant; it acts in the loss's forward
    passes only (:func:`tokenmdp.train.learner.update_mode`): the model stays in eval mode."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.eval()


def _base_record(config: TrainConfig, settings: Settings) -> str:
    """What an adapter records as its base (``tokenmdp merge`` loads it): the model path, with ``model.gguf_file``
    joined to it when the GGUF file was named apart from its folder."""
    if config.model.gguf_file and not settings.model_path.endswith(".gguf"):
        return str(Path(settings.model_path) / config.model.gguf_file)
    return settings.model_path


def _policy(config: TrainConfig, settings: Settings, device, resume_from: Path | None):
    """The trained policy and, under LoRA, its peft wrapper: the base model frozen with a fresh adapter (seeded by
    ``run.seed``), or on resume the checkpoint's adapter; without LoRA the model itself (the checkpoint's on
    resume)."""
    lora = config.model.lora
    if not lora.enabled:
        policy = _load(str(resume_from / "model") if resume_from is not None else settings.model_path, config,
                       device, trainable=True)
        adapter = None
    else:
        from tokenmdp.policy.adapters import add_lora, load_adapter

        policy = _load(settings.model_path, config, device, trainable=False)
        if resume_from is not None:
            adapter = load_adapter(policy.model, resume_from / "model", trainable=True)
        else:
            adapter = add_lora(policy.model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                               target_modules=lora.target_modules, seed=config.run.seed, base=_base_record(config,
                                                                                                        settings))
        adapter.to(device)
        policy.model = adapter.get_base_model()  # the HF model with the LoRA layers in place
        policy.model.eval()
    if config.model.gradient_checkpointing:
        # active in the loss's forward passes only (tokenmdp.train.learner.update_mode)
        enable_checkpointing(policy.model)
    return policy, adapter


def _critic(config: TrainConfig, settings: Settings, device, resume_from: Path | None):
    """PPO's critic: the policy's backbone (or ``model.critic_path``'s) with a new value head; under LoRA the
    backbone is frozen and gets its own adapter (the value head and the adapter train). On resume its trained
    weights come from the checkpoint's ``critic.pt`` (under LoRA: the adapter and the head only)."""
    from tokenmdp.policy.value_head import ValueModel

    source = config.model.critic_path or settings.model_path
    critic = ValueModel.from_policy(source, dtype=config.model.dtype, seed=config.run.seed)
    lora = config.model.lora
    if lora.enabled:
        from tokenmdp.policy.adapters import inject_lora

        inject_lora(critic.backbone, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                    target_modules=lora.target_modules, seed=config.run.seed + 1)
        critic.value_head.requires_grad_(True)
    if resume_from is not None:
        file = resume_from / "critic.pt"
        if not file.is_file():
            raise TokenMDPError(f"checkpoint {resume_from} has no critic.pt (the run's algorithm needs a critic)")
        state = torch.load(file, map_location="cpu")
        missing, unexpected = critic.load_state_dict(state, strict=not lora.enabled)
        trained = {n for n, p in critic.named_parameters() if p.requires_grad}
        if unexpected or trained & set(missing):
            raise TokenMDPError(f"{file} does not fit the run's critic (missing {sorted(trained & set(missing))[:3]}, "
                                f"unexpected {sorted(unexpected)[:3]})")
    critic.eval()
    return critic.to(device)


class RunParts(NamedTuple):
    """What :func:`build_run` builds, each part with one job: the algorithm's spec and unit, the learner (model,
    optimizer, reference, critic), what the rollouts need (task, tokenizer, engine, environment; assembled by
    :func:`tokenmdp.train.trainer.make_rollouts`) and the resolved settings."""

    spec: AlgoSpec
    settings: Settings
    learner: Learner
    algorithm: Algorithm
    task: Any
    tokenizer: Any
    engine: Any
    env: RunEnvironment | None


def build_run(config: TrainConfig, run_dir: Path, *, resume_from: Path | None = None) -> RunParts:
    """Everything the loop needs. ``resume_from`` is a checkpoint folder (the policy and tokenizer load from its
    ``model/``; optimizer states are restored by :meth:`tokenmdp.train.run_dir.RunHandle.restore`)."""
    from tokenmdp.rollout import get_engine
    from tokenmdp.tasks import get_task

    spec = resolve_algo(config)
    if config.run.threads is not None:
        torch.set_num_threads(config.run.threads)
    settings = resolve_settings(config)
    check_fit(spec, config, settings.max_new_tokens)
    task = get_task(config.task.name, **settings.task_options)
    accelerator = make_accelerator(config, run_dir)
    check_processes(config, spec, accelerator.num_processes)
    policy, adapter = _policy(config, settings, accelerator.device, resume_from)
    ref_model = None
    needs_reference = spec.needs_reference or config.run.kl_to_base
    if needs_reference and adapter is None:  # under LoRA the reference is the base: the adapter disabled
        ref_model = _load(settings.model_path, config, accelerator.device, trainable=False).model
    sharding = None
    if config.run.fsdp:  # before the optimizer: it must hold the sharded parameters
        sharding = _shard(policy.model, accelerator)
    opt_kw = dict(betas=(config.optim.beta1, config.optim.beta2), eps=config.optim.eps,
                  weight_decay=config.optim.weight_decay)
    trainable = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.optim.lr, **opt_kw)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.optim.schedule, config.optim.warmup_steps, config.run.steps)
    )
    # the model is not wrapped (no DDP): forward passes go through its backbone and head directly
    # (tokenmdp.policy.logprobs), so gradients are averaged over processes by the learner's step
    model, optimizer = policy.model, accelerator.prepare(optimizer)
    critic = critic_optimizer = None
    if spec.critic:
        critic = _critic(config, settings, accelerator.device, resume_from)
        critic_lr = config.optim.critic_lr if config.optim.critic_lr is not None else 5 * config.optim.lr
        critic_optimizer = torch.optim.AdamW([p for p in critic.parameters() if p.requires_grad], lr=critic_lr,
                                             **opt_kw)
        critic_optimizer = accelerator.prepare(critic_optimizer)
    engine = get_engine(config.rollout.engine, accelerator.unwrap_model(model), policy.tokenizer,
                        **config.rollout.engine_options)
    env = build_environment(config, settings, task, policy.tokenizer, accelerator.device)
    learner = Learner(
        model=model, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator,
        temperature=config.rollout.temperature or 1.0, micro_batch_size=config.optim.micro_batch_size,
        micro_batch_tokens=_micro_batch_tokens(config, model, accelerator.device),
        shared_prompt=config.optim.shared_prompt,
        max_grad_norm=config.optim.max_grad_norm, needs_reference=needs_reference, ref_model=ref_model,
        adapter=adapter, critic=critic, critic_optimizer=critic_optimizer, fsdp=sharding,
    )
    if config.optim.fused_layers:
        why = fused_layers.enable(accelerator.unwrap_model(model))
        if why:
            raise TokenMDPError(f"config field 'optim.fused_layers' is true, but {why}; set it to false")
    process_rewards = None
    if spec.credit == "process":
        step_reward = config.task.step_reward

        def process_rewards(batch):
            return step_rewards(task, policy.tokenizer, batch, step_reward=step_reward)

    algorithm = make_algorithm(spec, config, max_new_tokens=settings.max_new_tokens, tokenizer=policy.tokenizer,
                               process_rewards=process_rewards)
    # the trackers (run.report_to) start in RunHandle.begin, once the run folder is (re)created
    return RunParts(spec, settings, learner, algorithm, task, policy.tokenizer, engine, env)


def _micro_batch_tokens(config: TrainConfig, model, device) -> int | None:
    """``optim.micro_batch_tokens`` as the learner takes it: "auto" resolved from the model's sizes and the
    device's memory (half precision under bf16 / fp16 autocast or half weights)."""
    tokens = config.optim.micro_batch_tokens
    if tokens != "auto":
        return tokens
    dtype = next(model.parameters()).dtype
    half = config.run.mixed_precision != "no" or dtype in (torch.float16, torch.bfloat16)
    return auto_micro_batch_tokens(model, device, half=half, checkpointing=config.model.gradient_checkpointing)


def _shard(model, accelerator) -> Sharding:
    """``run.fsdp``: the policy sharded over the processes, and one scoring pass without gradients on a token of
    every process, so that FSDP takes the scoring root as its root (the first unit to run forward)."""
    from tokenmdp.policy.logprobs import sequence_logprobs
    from tokenmdp.train.sharding import shard_model

    sharding = shard_model(model, accelerator.device, accelerator.num_processes)
    one = torch.ones(1, 1, dtype=torch.long, device=accelerator.device)
    with torch.no_grad():
        sharding.root(sequence_logprobs, one, one, one, one)
    return sharding
