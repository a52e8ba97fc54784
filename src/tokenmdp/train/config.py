"""The training configuration: nested dataclasses, YAML files and ``--set key=value`` overrides.

A :class:`TrainConfig` has six sections (``model``, ``task``, ``rollout``, ``algo``, ``optim``, ``run``); its
defaults train the embedded tiny base model on Countdown with GRPO on a CPU. ``load_config`` reads a YAML file,
applies dotted overrides (``--set optim.lr=3e-4``, values parsed as YAML scalars) and validates every field:
a wrong name or value raises one :class:`~tokenmdp.errors.TokenMDPError` naming the field (and the file).

The ``algo`` section is a preset name plus overrides of :class:`tokenmdp.algos.presets.AlgoSpec` fields::

    algo:
      name: grpo
      kl_coef: 0.04      # any AlgoSpec field

Every section, the algorithm's included, goes through the project's one coercer and unknown-field check
(:mod:`tokenmdp.schema`); :func:`resolve_algo` builds the spec through ``tokenmdp.algos.presets.get_algo``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tokenmdp.errors import TokenMDPError
from tokenmdp.schema import Where, build, check_fields, hints, literal_choices
from tokenmdp.train.checks import resolve_algo, validate  # noqa: F401 (resolve_algo: part of this module's API)
from tokenmdp.values import parse_assignment


@dataclass
class LoraConfig:
    """A LoRA adapter through ``peft`` (:mod:`tokenmdp.policy.adapters`): only the adapter trains, the reference
    policy of a KL term is the base with the adapter disabled, and checkpoints hold the adapter alone (``tokenmdp
    merge`` writes the full model). ``target_modules``: ``"all-linear"`` (every linear layer but the output head) or
    a list of layer names (``[q_proj, v_proj]``); ``dropout`` acts in the loss's forward passes only. Setting any of
these without ``enabled`` turns LoRA on; ``enabled: false`` beside a value other than its default is an error."""

    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list | str = "all-linear"


@dataclass
class ModelConfig:
    """The policy model. ``path=None`` means the embedded tiny base model: the commands (``tokenmdp train``,
    ``compare``) fill in its folder, the shipped copy, or with ``cache_dir`` set the one in that cache (built there
    on first use); ``train()`` itself is always handed a path."""

    path: str | None = None
    cache_dir: str | None = None  # None: the shipped copy, else $TOKENMDP_CACHE or ~/.cache/tokenmdp
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gguf_file: str | None = None
    critic_path: str | None = None  # PPO critic initialisation; None = the policy's own weights
    lora: LoraConfig = field(default_factory=LoraConfig)
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward (memory for time)


@dataclass
class EnvConfig:
    """A multi-turn environment around the task (:mod:`tokenmdp.mdp.env`; ``kind="none"``: the plain token MDP).

    ``single_turn``: the token MDP run through the multi-turn driver (the same rollouts as ``none``);
    ``calculator``: a tool writes the value of each ``a op b =`` step (:mod:`tokenmdp.rollout.calculator`), for
    ``max_turns`` turns of ``turn_tokens`` tokens and ``max_tokens`` in all (None: ``rollout.max_new_tokens``);
    ``two_llm_hint`` / ``two_llm_alternate``: a frozen base model is the environment (:mod:`tokenmdp.rollout.
    two_llm`): the policy writes a hint line and the base answers, or they alternate lines for ``max_turns`` policy
    turns. ``base_path``: the frozen base model (None: the policy's start model, ``model.path``, so the policy
    starts as a copy of the base). ``turn_tokens``: tokens per policy turn; ``base_tokens``: per base turn (None:
    ``rollout.max_new_tokens``); ``max_tokens``: response tokens of an episode in all, policy and base (None:
    ``max_turns x (turn_tokens + base_tokens)``); ``module``: the task's environment module
    (``task.name=env:<module>``, :mod:`tokenmdp.tasks.env_module`) answers each turn, for ``max_turns`` turns
    (``max_tokens`` None: ``max_turns x turn_tokens`` plus room for its answers)."""

    kind: Literal["none", "single_turn", "calculator", "two_llm_hint", "two_llm_alternate", "module"] = "none"
    base_path: str | None = None
    max_turns: int = 3
    turn_tokens: int = 16
    base_tokens: int | None = None
    max_tokens: int | None = None
    base_temperature: float = 1.0
    turn_stop: str | None = None  # kind "module": text of one token that ends a policy turn (e.g. "\n"); None: a
    # turn ends at EOS (which ends the episode) or at turn_tokens


@dataclass
class TaskConfig:
    """The verifiable task. ``options`` go to ``get_task(name, **options)``; ``template=None`` is the default."""

    name: str = "countdown"
    template: str | None = None
    options: dict = field(default_factory=dict)
    train_split: str = "train"
    eval_split: str = "test"
    dpo_data: str | None = None  # JSONL of {"prompt", "chosen", "rejected"}; None = on-policy pairs
    step_reward: float = 0.1  # credit "process": +/- this on the token ending each correct / wrong step
    chat_template: bool = False  # wrap each prompt as a user turn of the tokenizer's chat template (instruct models)
    env: EnvConfig = field(default_factory=EnvConfig)  # a multi-turn environment (kind "none": the token MDP)


@dataclass
class RolloutConfig:
    """Sampling: ``prompts_per_step`` prompts x ``group_size`` samples per training step."""

    engine: Literal["hf", "fast", "vllm"] = "fast"  # tokenmdp.rollout.ENGINES (tests/test_config.py checks)
    prompts_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int | None = None  # None = the model folder's tokenmdp.json value, else 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # pi_old recomputed by the trained model, and the loss weighted against the sampler's own log-probs (algo.tis_*):
    # for an inference engine whose numerics differ from the trainer's (vllm, bf16)
    recompute_logprobs: bool = False
    engine_options: dict = field(default_factory=dict)
    # rollouts overlapped with updates (tokenmdp.train.async_rollout): the batch of step t is sampled, while the
    # learner updates, with the weights of step t - 1 - max_staleness (exactly; staleness min(k, t - 1)) and
    # corrected by truncated importance sampling (algo.tis_cap). 0 = the synchronous loop (the default)
    max_staleness: int = 0
    # where the sampler runs with max_staleness > 0: a spawned process (its own interpreter: no GIL shared with
    # the learner) or a thread of the learner's process
    async_worker: Literal["process", "thread"] = "process"
    # with max_staleness > 0, the fraction of each update's tokens whose gradient the sampler process computes
    # while the learner computes the rest (tokenmdp.train.grad_share): for the idle part of the sampler's core
    async_grad_share: float = 0.0


@dataclass
class AlgoConfig:
    """A preset of :data:`tokenmdp.algos.presets.PRESETS` plus overrides of its ``AlgoSpec`` fields."""

    name: str = "grpo"
    overrides: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (stepped once per training step).

    ``minibatch_size`` sequences make one optimizer update (``None``: the whole batch of the step);
    ``micro_batch_size`` sequences go through one forward/backward (gradients accumulated exactly).
    """

    lr: float = 2e-4
    critic_lr: float | None = None  # None = 5 x lr
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    minibatch_size: int | None = None
    micro_batch_size: int = 16
    # and at most this many tokens of forward pass per micro-batch (rows x the longest row's prompt + response;
    # with shared_prompt each group's prompt once); None: no limit. Memory of the update follows tokens, not rows.
    # "auto": as many as keep one micro-batch's saved activations within 1/8 of the device's memory, estimated from
    # the model's sizes (tokenmdp.train.micro.auto_micro_batch_tokens: no cut for the embedded tiny model; 5
    # rows of SmolLM2's 234-token chat rows on a 24 GiB machine, where 16 rows held 9.4 GiB). It follows the
    # machine's memory: give a number where a run must cut alike on another machine (the update then differs by
    # float rounding only, but a resumed run is bit-exact only on the same cut)
    micro_batch_tokens: int | Literal["auto"] | None = "auto"
    # rows whose advantage is 0 on every token skip the forward/backward (exact: they add no gradient; only when
    # the loss has no KL term, entropy bonus or critic; see PolicyGradient.skips_zero_advantage in
    # tokenmdp.train.algorithms). Off by default: policy/entropy, clip_frac and approx_kl are then means over the
    # rows that ran only, which would make them incomparable between algorithms that skip and algorithms that do not
    skip_zero_advantage: bool = False
    # the update's forward passes run each distinct prompt once and the G responses of its group on its KV cache
    # (exact: the same log-probs and gradients up to float summation order; tokenmdp.policy.shared_prompt): the
    # prompts of a chunk of groups run once ahead of its micro-batches, which are then cut by response length
    # across groups (Learner.micro_passes; with a critic or sharded, micro-batches hold whole groups instead). Off
    # by default: it moves a seeded run by float rounding
    shared_prompt: bool = False
    # the update's passes run RMSNorm, the rotary embedding and the SwiGLU of a Llama-family model as fused C++
    # kernels, forward and backward (tokenmdp.policy.fused_layers; the same log-probs and gradients up to float
    # rounding). CPU, float32 only; built with the machine's compiler on first use. Off by default: it moves a
    # seeded run by float rounding
    fused_layers: bool = False
    # an optimizer step whose loss or gradient is NaN or Inf is skipped (the parameters and the optimizer's moments
    # stay as they were; counted as update/nonfinite_steps); this many skipped in a row stop the run with one error
    # (0: never stop)
    max_nonfinite_steps: int = 3


@dataclass
class RunConfig:
    """Where and how long: the run folder, seed, checkpoints, evaluation and logging."""

    out: str | None = None  # None = runs/<algo>-seed<seed>
    seed: int = 0
    steps: int = 20
    save_every: int = 10
    keep_last: int = 2
    eval_every: int = 0  # 0 = no periodic evaluation; otherwise also at the end
    eval_before: bool = False  # with eval_every > 0: also evaluate the start policy, logged as step 0 (verl's
    # val_before_train), so every held-out curve starts at the base model
    eval_n: int = 100
    eval_greedy: bool = True
    eval_k: int = 4  # sampled responses per eval problem (sampled pass@1 and pass@k)
    eval_temperature: float = 1.0
    log_samples: bool = True
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: int | None = None  # torch CPU threads (None: torch's default); 1 is fastest for the tiny model
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    equivalence: bool = False  # log the GRPO / weighted-SFT gradient cosine each step (equiv/*)
    kl_to_base: bool = False  # log policy/kl_base each step: the KL from the sampler to the start model on the
    # step's responses (one forward pass of the base a step; loaded beside the policy unless LoRA or a KL has it)
    report_to: (Literal["none", "tensorboard", "trackio", "wandb", "mlflow"]
                | list[Literal["tensorboard", "trackio", "wandb", "mlflow"]]) = "none"  # one tracker or a
    # list (tokenmdp.train.trackers); each writes inside the run folder (wandb offline unless WANDB_MODE says)
    overwrite: bool = False
    fsdp: bool = False  # shard the policy's parameters, gradients and optimizer state over the processes (FSDP2;
    # tokenmdp.train.sharding): for a model that outgrows one device; needs 2+ processes


@dataclass
class TrainConfig:
    """Everything one training run needs; ``to_dict`` / ``from_dict`` round-trip through ``config.yaml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        """A plain dict (YAML-ready); the algo overrides sit next to ``name`` as in the file format."""
        data = dataclasses.asdict(self)
        algo = data.pop("algo")
        data = {k: data[k] for k in ("model", "task", "rollout")} | {
            "algo": {"name": algo["name"], **algo["overrides"]},
            "optim": data["optim"],
            "run": data["run"],
        }
        return data

    @classmethod
    def from_dict(cls, data: dict, *, source: str | None = None) -> TrainConfig:
        """Validate ``data`` (the YAML layout) into a config; errors name the field and ``source``."""
        return _build_config(data, source)

    def run_dir(self) -> Path:
        """The run folder: ``run.out`` or ``runs/<algo>-seed<seed>``."""
        if self.run.out:
            return Path(self.run.out).expanduser()
        return Path("runs") / f"{self.algo.name}-seed{self.run.seed}"


SECTIONS = ("model", "task", "rollout", "algo", "optim", "run")


def _build_config(data: Any, source: str | None) -> TrainConfig:
    """The config of the YAML layout ``data``: every section through the one coercer (:mod:`tokenmdp.schema`),
    the ``algo`` section's overrides against :class:`tokenmdp.algos.presets.AlgoSpec`'s fields."""
    from tokenmdp.algos.presets import RENAMED, AlgoSpec

    where = Where(source=source)
    if isinstance(data, dict) and isinstance(data.get("algo"), dict):
        algo = dict(data["algo"])
        if isinstance(algo.get("overrides"), dict):  # the dataclass layout, also accepted
            algo = {**algo.pop("overrides"), **algo}
        name = algo.pop("name", AlgoConfig.name)
        if not isinstance(name, str):
            raise TokenMDPError(f"{where('algo.name')} must be a preset name (a string)")
        overrides = check_fields(AlgoSpec, algo, where, prefix="algo.", renamed=RENAMED)
        data = {**data, "algo": {"name": name, "overrides": overrides}}
    data = _lora_switch(data, where)
    return build(TrainConfig, data, where)


def _lora_switch(data: Any, where: Where) -> Any:
    """A ``model.lora`` section that sets the adapter (``rank``, ``alpha``, ...) without saying ``enabled`` turns
    LoRA on, as a LoRA rank does in verl and a peft config in TRL; one that says ``enabled: false`` beside values
    other than the defaults is a contradiction, and an error (such values would be silently ignored)."""
    lora = data.get("model", {}).get("lora") if isinstance(data, dict) and isinstance(data.get("model"), dict) \
        else None
    if not isinstance(lora, dict):
        return data
    defaults = dataclasses.asdict(LoraConfig())
    settings = {k: v for k, v in lora.items() if k != "enabled"}
    if "enabled" not in lora:
        if settings:
            data = {**data, "model": {**data["model"], "lora": {**lora, "enabled": True}}}
        return data
    if lora["enabled"] is False:
        changed = sorted(k for k, v in settings.items() if k in defaults and v != defaults[k])
        if changed:
            raise TokenMDPError(f"{where('model.lora.' + changed[0])} is {lora[changed[0]]!r} but "
                                f"model.lora.enabled is false: set model.lora.enabled=true to train an adapter, or "
                                f"drop model.lora.{changed[0]}")
    return data


def _set(data: dict, key: str, value: Any) -> None:
    """Put ``value`` at the dotted ``key`` of the nested dict ``data``."""
    parts = key.split(".")
    if not all(parts):
        raise TokenMDPError(f"--set {key!r}: empty part in the dotted field name")
    if parts[0] not in SECTIONS:
        raise TokenMDPError(f"--set {key!r}: unknown config section {parts[0]!r}; expected one of "
                            f"{', '.join(SECTIONS)}")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise TokenMDPError(f"--set {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 0.0003)`` (:func:`tokenmdp.values.parse_value`)."""
    return parse_assignment(item, option="--set", example="optim.lr=3e-4")


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing file or bad YAML is a TokenMDPError naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise TokenMDPError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise TokenMDPError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TokenMDPError(f"{path}: a config file must be a mapping of sections ({', '.join(SECTIONS)})")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read ``path`` (YAML, or the defaults when None), apply ``key=value`` overrides, validate.

    The algo preset and its overrides are checked against the presets (:func:`resolve_algo`).
    """
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else None
    for item in overrides or []:
        key, value = parse_override(item)
        _set(data, key, value)
    if overrides:
        source = f"{source} (with --set)" if source else "--set"
    config = TrainConfig.from_dict(data, source=source)
    validate(config, source=source)
    return config


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write ``config`` as YAML (the run folder's ``config.yaml``)."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def config_choices(section: str, field: str) -> tuple:
    """The allowed values of a ``Literal`` config field (``config_choices("rollout", "engine")``), for help texts
    that must not go stale."""
    return tuple(literal_choices(hints(hints(TrainConfig)[section])[field]))

