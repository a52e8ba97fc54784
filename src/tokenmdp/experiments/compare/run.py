"""The pieces of one comparison (:mod:`tokenmdp.experiments.compare`): a job (train one run and evaluate its final
model on the held-out set, or evaluate the base model), runnable in this process or in a worker process, and the
fairness check on the logged prompt streams."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenmdp.errors import TokenMDPError
from tokenmdp.experiments.compare.extra_evals import extra_file, extra_spec, extra_units
from tokenmdp.experiments.compare.settings import CompareSettings, curve_every

# report(event, label, *args): ("start", name, total), ("advance", n, weight) or ("skip", units)
Report = Callable[..., None]


class FairnessError(RuntimeError):
    """The algorithms of one seed did not see the same prompts (a bug in the trainer or the data stream)."""


@dataclass
class Job:
    """One unit of a comparison: train ``algo`` on ``seed`` (unless a finished run can be reused) and evaluate its
    final model, or (``algo=None``) evaluate the base model. Plain data, so it can go to a worker process."""

    label: str
    settings: dict  # asdict(CompareSettings)
    max_new_tokens: int
    heldout: str  # heldout.jsonl
    model_dir: str
    out_json: str
    step_w: int
    algo: str | None = None
    seed: int | None = None
    config_path: str | None = None
    run_dir: str | None = None
    overwrite: bool = False
    overrides: list[str] | None = None  # the run's config overrides (None: the comparison's own)
    steps: int | None = None  # the run's steps (None: the comparison's)


def step_weight(s) -> int:
    """Overall-progress weight of one training step, in sampled completions: sampling and the update
    (``2 * prompts_per_step * group_size``) plus the step's share of the trainer's held-out curve."""
    every = curve_every(s)
    curve = (s.steps // every if every else 0) * min(s.eval_n, s.curve_n) * (s.curve_k + 1)
    return 2 * s.prompts_per_step * s.group_size + curve // s.steps


def eval_units(s) -> int:
    """Overall-progress weight of one model's held-out evaluations: their completions, ``eval_n * (k + 1)`` and
    the extra evaluations'."""
    return s.eval_n * (s.k + 1) + extra_units(s)


def execute(job: Job, report: Report) -> dict:
    """Run ``job``; returns ``{"label", "train_s", "eval_s", "train_cpu_s", "eval_cpu_s"}`` (wall and CPU seconds
    of this process; ``train_s`` None when a finished run was reused)."""
    from tokenmdp.tasks import get_task

    s = CompareSettings(**job.settings)
    task = get_task(s.task, **s.task_kwargs)
    problems = task.load_problems(job.heldout)
    cpu0 = time.process_time()
    t_train = _train(job, s, report) if job.algo is not None else None
    cpu1 = time.process_time()
    extra = {"algo": job.algo, "seed": job.seed} if job.algo is not None else {}
    reuse = t_train is None and not (job.algo is None and job.overwrite)
    t_eval = _evaluate(job, s, task, problems, report, extra=extra, reuse=reuse)
    for name, spec in s.extra_evals.items():
        t_eval += _evaluate(job, s, task, problems, report, extra=extra, reuse=reuse,
                            variant=(name, extra_spec(spec, s)))
    return {"label": job.label, "train_s": t_train, "eval_s": t_eval, "train_cpu_s": cpu1 - cpu0,
            "eval_cpu_s": time.process_time() - cpu1}


def _check_reusable(config, run_dir: Path) -> None:
    """A finished run may stand in for a new one only when its config and steps match."""
    from tokenmdp.train.run_dir import check_same_run

    try:
        check_same_run(config, run_dir)
        done = json.loads((run_dir / "DONE").read_text() or "{}")
        if done.get("steps", config.run.steps) != config.run.steps:
            raise TokenMDPError(f"{run_dir} was trained for run.steps={done['steps']}, not {config.run.steps}")
    except (TokenMDPError, json.JSONDecodeError) as exc:
        raise TokenMDPError(f"{exc}; pass --overwrite to retrain it, or choose another --out") from None


def run_config(job: Job, s):
    """The training config of ``job``'s run (its arm's overrides, its seed and folder)."""
    from tokenmdp.train.config import load_config

    overrides = list(s.overrides) if job.overrides is None else list(job.overrides)
    return load_config(job.config_path, overrides + [f"run.seed={job.seed}",
                                                     f"run.out={json.dumps(str(job.run_dir))}"])


def _train(job: Job, s, report: Report) -> float | None:
    """Train one (algorithm, seed) into ``job.run_dir``; seconds taken, or None when a finished run was reused."""
    from tokenmdp.train.trainer import train

    run_dir = Path(job.run_dir)
    config = run_config(job, s)
    steps = config.run.steps
    if not job.overwrite and (run_dir / "DONE").exists():
        _check_reusable(config, run_dir)
        report("skip", job.label, steps * job.step_w)
        return None
    report("start", job.label, "train", steps)
    start = time.perf_counter()
    train(config, progress=False, callbacks=[lambda step, record, c: report("advance", job.label, 1, job.step_w)])
    return time.perf_counter() - start


def eval_key(s, problems, max_new_tokens: int, env: dict | None = None) -> dict:
    """What an evaluation's numbers are a function of (besides the model): a saved evaluation with the same key
    is reused by a comparison run again in the same folder. ``env``: the run's environment (``task.env``), when
    it evaluates through one."""
    ids = hashlib.sha1("\n".join(p.id for p in problems).encode()).hexdigest()
    extra = {} if env is None else {"env": env}
    if getattr(s, "chat", False):  # only when on: the keys of earlier comparisons stay valid
        extra["chat"] = True
    return json.loads(json.dumps(extra | {
        "task": s.task, "task_kwargs": s.task_kwargs, "template": s.template, "problems": ids, "k": s.k,
        "temperature": s.eval_temperature, "max_new_tokens": max_new_tokens, "seed": s.heldout_seed,
        "batch_size": s.eval_batch_size, "engine": s.engine}, default=str))


def _evaluate(job: Job, s, task, problems: list, report: Report, *, extra: dict, reuse: bool,
              variant: tuple[str, dict] | None = None) -> float:
    """Evaluate ``job.model_dir`` on the held-out ``problems``; writes ``job.out_json`` and the records beside it.
    A saved evaluation with the same :func:`eval_key` is reused when ``reuse``. ``variant``: ``(name, spec)`` of
    an extra evaluation (:mod:`.extra_evals`): the first ``n`` problems, its ``k``, temperature and greedy, into
    ``eval-<name>.json``."""
    from tokenmdp.train.heldout import evaluate, save_eval
    from tokenmdp.policy.adapters import load_merged_policy

    out_json = Path(job.out_json)
    k, temperature, greedy = s.k, s.eval_temperature, True
    if variant is not None:
        name, spec = variant
        out_json, problems = extra_file(out_json, name), problems[: spec["n"]]
        k, temperature, greedy = spec["k"], spec["temperature"], spec["greedy"]
    units = len(problems) * (k + int(greedy))
    config = run_config(job, s) if job.algo is not None else None
    with_env = config is not None and config.task.env.kind != "none"
    key = eval_key(s, problems, job.max_new_tokens, dataclasses.asdict(config.task.env) if with_env else None)
    if variant is not None:
        key.update(k=k, temperature=temperature, greedy=greedy)
    if reuse and out_json.is_file():
        old = json.loads(out_json.read_text())
        if old.get("key") == key:
            report("skip", job.label, units)
            return float(old.get("time_s", 0.0))
    if job.algo is not None and not Path(job.model_dir).exists():  # the base may be a package path or a hub id
        raise TokenMDPError(f"no final model to evaluate: {job.model_dir} (did the run finish?)")
    policy = load_merged_policy(job.model_dir)
    env = None
    if with_env:  # the final policy with its environment (the two-LLM formulation: with the frozen base)
        from tokenmdp.train.environment import build_environment
        from tokenmdp.train.setup import resolve_settings

        env = build_environment(config, resolve_settings(config), task, policy.tokenizer, "cpu")
    report("start", job.label, "eval" if variant is None else f"eval {variant[0]}", units)
    result = evaluate(policy, None, task, problems, k=k, engine=s.engine, temperature=temperature, greedy=greedy,
                      max_new_tokens=job.max_new_tokens, batch_size=s.eval_batch_size, seed=s.heldout_seed,
                      template=s.template, chat=s.chat, progress=lambda m: report("advance", job.label, m, 1), env=env)
    records = out_json.with_name(out_json.stem.replace("eval", "eval_records", 1) + ".jsonl")  # runs.EVAL_RECORDS_FILE
    save_eval(result, out_json, records=records, model=str(job.model_dir), key=key, **extra)
    return result["time_s"]


def logged_stream(run_dir: Path) -> dict[int, Counter]:
    """Per training step, how many samples of each prompt a run logged in ``samples.parquet``."""
    import pyarrow.parquet as pq

    path = Path(run_dir) / "samples.parquet"
    if not path.is_file():
        raise TokenMDPError(f"{path} not found: the fairness check needs the logged samples (run.log_samples)")
    table = pq.read_table(path, columns=["step", "prompt"]).to_pydict()
    steps: dict[int, Counter] = {}
    for step, prompt in zip(table["step"], table["prompt"]):
        steps.setdefault(int(step), Counter())[prompt] += 1
    return steps


def check_same_stream(run_dirs: dict[str, Path], expected: list[list[str]] | None = None) -> dict:
    """Assert that every run of one seed logged the same prompts, with the same number of samples each, at every
    step, and (``expected``: the rendered prompts of each step) that they are the prompts of the seed's stream.

    Raises :class:`FairnessError` naming the first difference; returns a summary for ``compare.json``.
    """
    streams = {algo: logged_stream(path) for algo, path in run_dirs.items()}
    first_algo, ref = next(iter(streams.items()))
    for algo, st in streams.items():
        if sorted(st) != sorted(ref):
            raise FairnessError(f"{algo} logged steps {sorted(st)}, {first_algo} logged {sorted(ref)}")
        for step in ref:
            if st[step] != ref[step]:
                diff = set(st[step]) ^ set(ref[step])
                what = f"prompts differ ({sorted(diff)[:1]!r}...)" if diff else "sample counts differ"
                raise FairnessError(f"step {step}: {algo} and {first_algo} saw different batches: {what}")
    if expected is not None:
        if len(expected) != len(ref):
            raise FairnessError(f"{len(ref)} steps logged, the prompt stream has {len(expected)}")
        for i, step in enumerate(sorted(ref)):
            if set(ref[step]) != set(expected[i]):
                raise FairnessError(f"step {step}: the logged prompts are not those of the seed's prompt stream")
    sizes = {sum(c.values()) for c in ref.values()}
    return {"algos": list(run_dirs), "steps": len(ref), "identical": True,
            "prompts_per_step": sorted({len(c) for c in ref.values()}), "samples_per_step": sorted(sizes)}
