"""The checks of a training config that its types cannot express: ranges, combinations that cannot work together,
the algorithm preset with its overrides (:func:`resolve_algo`), the trackers' packages. Every error names the
field (``config field 'optim.lr'``) and where it came from (a file, ``--set``).

:func:`tokenmdp.train.config.load_config` calls :func:`validate` on every config it builds; this module reads the
config's sections by name and never imports :mod:`tokenmdp.train.config` (which imports it).
"""

from __future__ import annotations

from typing import Any

from tokenmdp.algos.presets import PRESETS, AlgoSpec, get_algo
from tokenmdp.errors import TokenMDPError
from tokenmdp.schema import Where
from tokenmdp.train.trackers import check_installed, requested

TrainConfig = LoraConfig = Any  # tokenmdp.train.config's classes, which import this module: named, not imported


def where(name: str, source: str | None) -> str:
    """How an error names a config field: ``config field 'optim.lr' in FILE``."""
    return Where(source=source)(name)


def validate(config: TrainConfig, *, source: str | None = None) -> None:
    """Range checks that types cannot express, then the algo preset and overrides."""
    positive = {
        "rollout.prompts_per_step": config.rollout.prompts_per_step,
        "rollout.group_size": config.rollout.group_size,
        "optim.micro_batch_size": config.optim.micro_batch_size,
        "run.steps": config.run.steps,
        "run.keep_last": config.run.keep_last,
        "run.eval_k": config.run.eval_k,
    }
    if config.optim.minibatch_size is not None:
        positive["optim.minibatch_size"] = config.optim.minibatch_size
    if isinstance(config.optim.micro_batch_tokens, int):
        positive["optim.micro_batch_tokens"] = config.optim.micro_batch_tokens
    if config.run.threads is not None:
        positive["run.threads"] = config.run.threads
    if config.rollout.max_new_tokens is not None:
        positive["rollout.max_new_tokens"] = config.rollout.max_new_tokens
    for name, value in positive.items():
        if value < 1:
            raise TokenMDPError(f"{where(name, source)} must be at least 1, got {value}")
    non_negative = {
        "rollout.temperature": config.rollout.temperature,
        "rollout.max_staleness": config.rollout.max_staleness,
        "optim.lr": config.optim.lr,
        "optim.warmup_steps": config.optim.warmup_steps,
        "optim.max_nonfinite_steps": config.optim.max_nonfinite_steps,
        "run.save_every": config.run.save_every,
        "run.eval_every": config.run.eval_every,
        "run.eval_n": config.run.eval_n,
    }
    for name, value in non_negative.items():
        if value < 0:
            raise TokenMDPError(f"{where(name, source)} must be non-negative, got {value}")
    _validate_lora(config.model.lora, source)
    if config.model.gradient_checkpointing and config.model.lora.enabled and config.model.lora.dropout > 0:
        raise TokenMDPError(f"{where('model.lora.dropout', source)} must be 0 with "
                            "model.gradient_checkpointing: the backward recomputes each layer without the forward's "
                            "dropout masks")
    _validate_fsdp(config, source)
    _validate_fused_layers(config, source)
    _validate_grad_share(config, source)
    _validate_env(config, source)
    check_installed(requested(config.run.report_to))
    if not 0.0 < config.rollout.top_p <= 1.0:
        raise TokenMDPError(f"{where('rollout.top_p', source)} must be in (0, 1], got "
                            f"{config.rollout.top_p}")
    if config.rollout.max_staleness > 0 and config.rollout.engine == "vllm" and config.rollout.async_worker == "thread":
        raise TokenMDPError(f"{where('rollout.async_worker', source)} is 'thread', but overlapped "
                            "rollouts with the vllm engine need the sampler in its own process: a second in-process "
                            "vLLM engine shares the first one's global state (its weight sync failed the probe); "
                            "set rollout.async_worker=process")
    options = config.rollout.engine_options
    rounded = {"quantize": "an int8 copy of the policy",  # sampler switches whose log-probs are not pi_old's
               "kv_cache_dtype": "a policy whose keys and values are rounded"}
    for key, what in rounded.items():
        value = options.get(key)
        if value and value != "auto" and not config.rollout.recompute_logprobs:
            raise TokenMDPError(f"{where('rollout.engine_options', source)} asks for {key}={value!r}: the samples "
                                f"come from {what}, whose log-probs are not pi_old's; set "
                                "rollout.recompute_logprobs=true (pi_old recomputed in float32, the mismatch weighted "
                                "by truncated importance sampling)")
    spec = resolve_algo(config, source=source)
    if config.rollout.max_staleness == 0 and not config.rollout.recompute_logprobs:
        unused = [f for f in ("tis_cap", "tis_level", "tis_mode") if getattr(spec, f) != getattr(AlgoSpec(), f)]
        if unused:
            raise TokenMDPError(f"{where('algo.' + unused[0], source)} is set, but every batch is "
                                "sampled by pi_old itself, so no importance weight is taken: it needs "
                                "rollout.recompute_logprobs=true (an inference engine's numerics) or "
                                "rollout.max_staleness > 0")


def _validate_fsdp(config: TrainConfig, source: str | None) -> None:
    """What ``run.fsdp`` cannot be combined with (the number of processes is checked once they are known:
    :func:`tokenmdp.train.setup.check_processes`)."""
    if not config.run.fsdp:
        return
    clash = None
    if config.model.lora.enabled:
        clash = "model.lora.enabled (a LoRA adapter is small: train it unsharded)"
    elif config.run.equivalence:
        clash = "run.equivalence (its gradient passes bypass the sharded scoring)"
    elif config.rollout.engine not in ("fast", "hf"):
        clash = f"rollout.engine {config.rollout.engine!r} (sharded weights are gathered for the in-process engines " \
                "'fast' and 'hf' only)"
    elif resolve_algo(config, source=source).critic:
        clash = f"algo {config.algo.name!r} (its critic is not sharded)"
    if clash:
        raise TokenMDPError(f"{where('run.fsdp', source)} is true: it cannot be combined with {clash}")


def _validate_fused_layers(config: TrainConfig, source: str | None) -> None:
    """What ``optim.fused_layers`` (float32 kernels on the CPU) cannot be combined with; whether the model is a
    Llama-family decoder is checked once it is loaded (:func:`tokenmdp.train.setup.build_step`)."""
    if not config.optim.fused_layers:
        return
    clash = None
    if config.run.device in ("cuda", "mps"):
        clash = f"run.device {config.run.device!r} (its kernels are the CPU's)"
    elif config.model.dtype != "float32":
        clash = f"model.dtype {config.model.dtype!r} (its kernels are float32)"
    elif config.run.mixed_precision != "no":
        clash = f"run.mixed_precision {config.run.mixed_precision!r} (its kernels are float32)"
    elif config.run.fsdp:
        clash = "run.fsdp (sharded layers are run by FSDP's root)"
    elif config.model.gradient_checkpointing:
        clash = "model.gradient_checkpointing (its layers are not checkpointed)"
    if clash:
        raise TokenMDPError(f"{where('optim.fused_layers', source)} is true: it cannot be combined with {clash}")


def _validate_grad_share(config: TrainConfig, source: str | None) -> None:
    """``rollout.async_grad_share``: a fraction in [0, 1), and what the sampler's part of the gradient needs
    (:mod:`tokenmdp.train.grad_share`): one optimizer step per batch, of a policy-gradient loss the sampler can
    compute alone (no critic, no LoRA dropout masks), in float32, beside an in-process engine in its own process."""
    share = config.rollout.async_grad_share
    if not 0.0 <= share < 1.0:
        raise TokenMDPError(f"{where('rollout.async_grad_share', source)} must be in [0, 1), got {share}")
    if share == 0.0:
        return
    rollout, optim = config.rollout, config.optim
    spec = resolve_algo(config, source=source)
    rows = rollout.prompts_per_step * rollout.group_size
    clash = None
    if rollout.max_staleness == 0:
        clash = "rollout.max_staleness 0 (the sampler computes part of the gradient while it overlaps the update)"
    elif rollout.async_worker != "process":
        clash = f"rollout.async_worker {rollout.async_worker!r} (the sampler needs its own process and core)"
    elif rollout.engine not in ("fast", "hf"):
        clash = f"rollout.engine {rollout.engine!r} (only the in-process engines 'fast' and 'hf' hold a trainable "\
                "model)"
    elif spec.kind != "pg" or spec.critic:
        clash = f"algo {config.algo.name!r} (only a policy-gradient update without a critic is split)"
    elif spec.epochs != 1 or (optim.minibatch_size is not None and optim.minibatch_size < rows):
        clash = "more than one optimizer step per batch (algo.epochs, optim.minibatch_size): the sampler holds " \
                "the weights of the update's start only"
    elif config.run.mixed_precision != "no":
        clash = f"run.mixed_precision {config.run.mixed_precision!r} (the sampler's part runs in float32)"
    elif config.run.fsdp:
        clash = "run.fsdp"
    elif config.model.lora.enabled and config.model.lora.dropout > 0:
        clash = "model.lora.dropout > 0 (the sampler's dropout masks would not be the learner's)"
    if clash:
        raise TokenMDPError(f"{where('rollout.async_grad_share', source)} is {share}: it cannot be combined with "
                            f"{clash}")


def _validate_env(config: TrainConfig, source: str | None) -> None:
    """Ranges of ``task.env`` and what a multi-turn environment cannot be combined with (yet)."""
    env = config.task.env
    for name in ("max_turns", "turn_tokens", "base_tokens", "max_tokens"):
        value = getattr(env, name)
        if value is not None and value < 1:
            raise TokenMDPError(f"{where('task.env.' + name, source)} must be at least 1, got {value}")
    if env.base_temperature < 0:
        raise TokenMDPError(f"{where('task.env.base_temperature', source)} must be non-negative, got "
                            f"{env.base_temperature}")
    if env.turn_stop is not None and env.kind != "module":
        raise TokenMDPError(f"{where('task.env.turn_stop', source)} is set, but only task.env.kind "
                            f"'module' reads it (the kind is {env.kind!r})")
    if env.kind == "module" and not config.task.name.startswith("env:"):
        raise TokenMDPError(f"{where('task.env.kind', source)} is 'module': the task must be an "
                            f"environment module, task.name=env:<module>, not {config.task.name!r}")
    if env.kind == "module" and config.task.chat_template:
        raise TokenMDPError(f"{where('task.chat_template', source)} is true: environment modules "
                            "run their turns as plain text lines for now (a chat turn ends at the end-of-turn token, "
                            "which the episode driver reads as the end of the episode)")
    if env.kind == "none":
        return
    clash = None
    if config.rollout.engine not in ("fast", "hf"):
        clash = (f"rollout.engine {config.rollout.engine!r} (the turns are sampled from token ids by the in-process "
                 f"engines 'fast' and 'hf' only)")
    elif config.rollout.max_staleness > 0:
        clash = "rollout.max_staleness > 0 (overlapped rollouts sample single-turn batches only)"
    elif config.task.dpo_data:
        clash = "task.dpo_data (offline DPO pairs have no episodes)"
    elif config.algo.name in PRESETS and resolve_algo(config, source=source).credit == "process":
        clash = ("algo credit 'process' (an episode's step rewards are its environment's per-turn rewards: the "
                 "task's step verifier would score observations as the policy's steps)")
    if clash:
        raise TokenMDPError(f"{where('task.env.kind', source)} is {env.kind!r}: it cannot be combined "
                            f"with {clash}")


def _validate_lora(lora: LoraConfig, source: str | None) -> None:
    """Ranges of ``model.lora`` (checked whether or not it is enabled: a bad value in a file is a bad file)."""
    if lora.rank < 1:
        raise TokenMDPError(f"{where('model.lora.rank', source)} must be at least 1, got {lora.rank}")
    if lora.alpha <= 0:
        raise TokenMDPError(f"{where('model.lora.alpha', source)} must be positive, got {lora.alpha}")
    if not 0.0 <= lora.dropout < 1.0:
        raise TokenMDPError(f"{where('model.lora.dropout', source)} must be in [0, 1), got "
                            f"{lora.dropout}")
    targets = lora.target_modules
    ok = (isinstance(targets, str) and bool(targets)) or (
        isinstance(targets, list) and bool(targets) and all(isinstance(t, str) and t for t in targets))
    if not ok:
        raise TokenMDPError(f"{where('model.lora.target_modules', source)} must be 'all-linear' or a "
                            f"non-empty list of layer names, got {targets!r}")


def resolve_algo(config: TrainConfig, *, source: str | None = None):
    """The :class:`~tokenmdp.algos.presets.AlgoSpec` of ``config.algo`` (preset + overrides); errors name
    ``algo.<field>``."""
    algo = config.algo
    if algo.name not in PRESETS:
        raise TokenMDPError(f"{where('algo.name', source)} is {algo.name!r}; choose one of {', '.join(PRESETS)}")
    try:
        return get_algo(algo.name, **algo.overrides)
    except TokenMDPError as exc:
        raise TokenMDPError(f"config section {where('algo', source)}: {exc}") from None


__all__ = ["resolve_algo", "validate", "where"]
