"""`tokenmdp compare`: algorithms side by side on the same prompts and seeds, a fixed held-out evaluation of the base
model and of every final model, and the report.

Fair by construction, and checked: for a given seed every algorithm trains on the prompt stream of
:func:`tokenmdp.train.data.prompt_stream` (a function of the seed only) with the same number of prompts and samples
per step; after training, the prompts logged in each run's ``samples.parquet`` are compared step by step across
the algorithms and with that stream (:func:`check_same_stream`), and a mismatch stops the comparison. The held-out
set (``eval_n`` problems of the test split, drawn with :data:`HELDOUT_SEED`) is fixed for the whole comparison,
disjoint from every training prompt (asserted), and evaluated for the base model and every final model. The
trainer's periodic held-out curve (``eval/accuracy``, every ``steps // 4`` steps by default) uses the first
``curve_n`` problems of that same set (the task's problems of one seed are prefixes of each other).

Layout of ``out``::

    compare.json        settings, timings, the fairness check
    heldout.jsonl       the held-out problems
    base_eval.json      the base model on them (eval_records.jsonl beside it: per-problem records)
    configs/<algo>.yaml the training config of each algorithm (seed and run folder set per run)
    runs/<algo>/seed-<s>/   trainer run folders, each with eval.json + eval_records.jsonl
    summary.csv, summary.md, plots/, report.html
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from tokenmdp.errors import TokenMDPError
from tokenmdp.locks import exclusive
from tokenmdp.experiments.compare.jobs import Tracker, run_jobs
from tokenmdp.experiments.compare.ray_executor import run_on_ray  # imports ray itself only when called
from tokenmdp.experiments.compare.run import FairnessError, Job, check_same_stream, eval_units, step_weight
from tokenmdp.experiments.compare.settings import (TINY_LR, Arm,
                                                   CompareSettings, arm_of, config_stem, curve_every, preset_settings,
                                                   trackers_of, validate_settings)


def _base_config(s: CompareSettings, arm: Arm, model_path: str, max_new_tokens: int) -> dict:
    """The training config of ``arm`` (YAML layout of :class:`tokenmdp.train.config.TrainConfig`; the arm's
    overrides are applied when it is loaded)."""
    algo = arm.algo
    cfg = {
        "model": {"path": model_path},
        "task": {"name": s.task, "template": s.template, "options": dict(s.task_kwargs)},
        "rollout": {"engine": s.engine, "prompts_per_step": s.prompts_per_step, "group_size": s.group_size,
                    "max_new_tokens": max_new_tokens},
        "algo": {"name": algo},
        "optim": {},
        "run": {"steps": arm.steps, "save_every": 0, "keep_last": 1, "eval_every": curve_every(s),
                "eval_n": min(s.eval_n, s.curve_n), "eval_k": s.curve_k, "eval_greedy": True,
                "report_to": trackers_of(s) or "none", "log_samples": True,
                "equivalence": algo in ("grpo", "grpo_nokl"), "overwrite": True},
    }
    if s.chat:
        cfg["task"]["chat_template"] = True
    if s.lr is not None:
        cfg["optim"]["lr"] = s.lr
    if s.threads is not None:
        cfg["run"]["threads"] = s.threads
    return cfg


def arm_overrides(s: CompareSettings, arm: Arm) -> list[str]:
    """The config overrides of one arm's runs: the comparison's, then the arm's own; an arm with an environment
    evaluates its start policy with the environment at step 0 (the base model's own point would be the base alone)."""
    extra = list(s.overrides) + list(arm.overrides)
    if any(o.replace(" ", "").startswith("task.env.kind=") and not o.replace(" ", "").endswith("=none")
           for o in arm.overrides) and curve_every(s) > 0:
        extra.append("run.eval_before=true")
    return extra


def _load_configs(s: CompareSettings, out: Path, model_path: str, max_new: int) -> dict[str, Path]:
    """Write ``configs/<arm>.yaml`` and validate each (with the overrides) before anything runs."""
    from tokenmdp.train.config import load_config

    (out / "configs").mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in s.algos:
        arm = arm_of(s, name)
        path = out / "configs" / f"{config_stem(name)}.yaml"
        path.write_text(yaml.safe_dump(_base_config(s, arm, model_path, max_new), sort_keys=False))
        try:
            load_config(path, arm_overrides(s, arm))
        except TokenMDPError as exc:
            raise TokenMDPError(f"arm {name!r}: {exc}") from None
        paths[name] = path
    return paths


def _heldout(s: CompareSettings, task, out: Path, streams_ids: set[str]) -> list:
    problems = task.problems("test", n=s.eval_n, seed=s.heldout_seed)
    if len(problems) < s.eval_n:
        raise TokenMDPError(f"--eval-n {s.eval_n}: the {s.task} test split holds only {len(problems)} problems")
    leaked = streams_ids & {p.id for p in problems}
    if leaked:
        raise TokenMDPError(f"held-out problems appear in the training stream: {sorted(leaked)[:3]}")
    with (out / "heldout.jsonl").open("w") as fh:
        for p in problems:
            fh.write(json.dumps(task.problem_to_dict(p), default=str) + "\n")
    return problems


@dataclass
class _Plan:
    """What every run of a comparison shares: the task, held-out set, prompt streams, configs, info record."""

    task: object
    heldout: list
    streams: dict
    configs: dict
    max_new_tokens: int
    info: dict



def make_settings(preset: str | None = None, **given) -> CompareSettings:
    """The settings of a comparison: ``preset``'s (:data:`COMPARE_PRESETS`), then the ``given`` options (fields of
    :class:`CompareSettings`; ``seeds`` may be a count, seeds 0..n-1; ``overrides`` add to the preset's), then the
    defaults; validated."""
    unknown = set(given) - set(CompareSettings.__dataclass_fields__)
    if unknown:
        raise TokenMDPError(f"compare: unknown option(s) {', '.join(sorted(unknown))}")
    base = preset_settings(preset)
    merged = {**base, **{k: v for k, v in given.items() if v is not None}}
    if base.get("overrides") and given.get("overrides"):  # --set adds to the preset's config overrides
        merged["overrides"] = base["overrides"] + list(given["overrides"])
    seeds = merged.get("seeds")
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        merged["seeds"] = list(range(seeds))
    elif isinstance(seeds, (list, tuple)):
        merged["seeds"] = list(seeds)
    elif seeds is not None:
        raise TokenMDPError(f"--seeds must be a count or a list of seeds, got {seeds!r}")
    if isinstance(merged.get("algos"), (list, tuple)):
        merged["algos"] = list(merged["algos"])
    s = CompareSettings(**merged)
    validate_settings(s)
    return s


def _prepare(s: CompareSettings, out: Path, model_path: str, timings: dict) -> _Plan:
    """Resolve the task and lengths from the model folder, validate the configs, draw the held-out set (checked
    disjoint from every seed's prompt stream) and write the first ``compare.json``."""
    from tokenmdp.train.heldout import resolve_eval_setup
    from tokenmdp.tasks import get_task
    from tokenmdp.train.data import prompt_stream

    setup = resolve_eval_setup(model_path, s.task, s.task_kwargs, s.template, s.max_new_tokens)
    s.task_kwargs, s.template = setup["task_kwargs"], setup["template"]
    task_obj = get_task(s.task, **s.task_kwargs)
    configs = _load_configs(s, out, model_path, setup["max_new_tokens"])
    longest = max(arm_of(s, name).steps for name in s.algos)
    streams = {seed: prompt_stream(task_obj, seed=seed, steps=longest, prompts_per_step=s.prompts_per_step)
               for seed in s.seeds}
    heldout = _heldout(s, task_obj, out, {p.id for st in streams.values() for step in st for p in step})
    info = {"settings": asdict(s) | {"model": model_path}, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": f"{platform.node()} ({platform.machine()}, {platform.processor() or 'cpu'})",
            "max_new_tokens": setup["max_new_tokens"], "timings": timings}
    (out / "compare.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    return _Plan(task_obj, heldout, streams, configs, setup["max_new_tokens"], info)


def _jobs(s: CompareSettings, out: Path, model_path: str, plan: _Plan, overwrite: bool) -> list[Job]:
    """The base model's evaluation, then one train-and-evaluate job per (seed, algorithm)."""
    common = dict(settings=asdict(s), max_new_tokens=plan.max_new_tokens, heldout=str(out / "heldout.jsonl"),
                  step_w=step_weight(s), overwrite=overwrite)
    jobs = [Job(label="base", model_dir=model_path, out_json=str(out / "base_eval.json"), **common)]
    for seed in s.seeds:
        for algo in s.algos:
            run_dir = out / "runs" / algo / f"seed-{seed}"
            arm = arm_of(s, algo)
            jobs.append(Job(label=f"{algo}/seed-{seed}", model_dir=str(run_dir / "final"),
                            out_json=str(run_dir / "eval.json"), algo=algo, seed=seed,
                            config_path=str(plan.configs[algo]), run_dir=str(run_dir),
                            overrides=arm_overrides(s, arm), steps=arm.steps, **common))
    return jobs


def _fairness(s: CompareSettings, out: Path, plan: _Plan) -> dict:
    """:func:`check_same_stream` for every seed: all algorithms logged the prompts of the seed's stream (arms of
    different lengths are checked in groups of equal length, each against the stream's first steps)."""
    result = {}
    lengths = sorted({arm_of(s, a).steps for a in s.algos})
    render = functools.partial(plan.task.render, template=s.template)
    if s.chat:  # the trainer logs the prompt as the chat template wrote it
        from tokenmdp.policy.model import chat_prompt, load_tokenizer

        tokenizer = load_tokenizer(plan.info["settings"]["model"])
        render = lambda p: chat_prompt(tokenizer, plan.task.render(p, template=s.template))  # noqa: E731
    for seed in s.seeds:
        for steps in lengths:
            names = [a for a in s.algos if arm_of(s, a).steps == steps]
            run_dirs = {algo: out / "runs" / algo / f"seed-{seed}" for algo in names}
            expected = [[render(p) for p in step]
                        for step in plan.streams[seed][:steps]]
            key = f"seed-{seed}" if len(lengths) == 1 else f"seed-{seed}/{steps}-steps"
            result[key] = check_same_stream(run_dirs, expected)
        sizes = {k: (tuple(v["prompts_per_step"]), tuple(v["samples_per_step"])) for k, v in result.items()
                 if k.split("/")[0] == f"seed-{seed}"}
        if len(set(sizes.values())) > 1:  # arms of different lengths must still draw alike at every step
            raise FairnessError(f"seed {seed}: the arms of different lengths drew different batches "
                                f"(prompts, samples per step): {sizes}")
    return result


def _earlier_timings(out: Path) -> dict:
    """The per-run timings of the comparison last written in ``out`` (``{}`` when none, or unreadable)."""
    try:
        return dict(json.loads((out / "compare.json").read_text()).get("timings") or {})
    except (OSError, ValueError, AttributeError):
        return {}


def _run_comparison(s: CompareSettings, out: Path, *, progress: bool, overwrite: bool) -> None:
    """The comparison's work in ``out`` (its writer's lock held by :func:`compare`)."""
    from tokenmdp.experiments.report import build_report

    out.mkdir(parents=True, exist_ok=True)
    started, timings = time.perf_counter(), {}
    earlier = _earlier_timings(out)
    model_path = s.model
    if model_path is None:  # before the comparison's own bars: pretraining shows its own
        from tokenmdp.base.store import ensure_tiny_base

        model_path = str(ensure_tiny_base(s.cache_dir, progress=progress))
        timings["pretrain_s"] = time.perf_counter() - started
        s.threads = 1 if s.threads is None else s.threads
        s.lr = TINY_LR if s.lr is None else s.lr
    if s.threads is not None:  # the evaluations run in this process
        import torch

        torch.set_num_threads(s.threads)
    if s.workers is None:
        s.workers = 2 if s.model is None and (os.cpu_count() or 1) >= 2 else 1
    runs = len(s.algos) * len(s.seeds)
    steps = sum(arm_of(s, a).steps for a in s.algos) * len(s.seeds)
    with Tracker(eval_units(s) * (runs + 1) + steps * step_weight(s), enabled=progress) as tracker:
        plan = _prepare(s, out, model_path, timings)
        jobs = _jobs(s, out, model_path, plan, overwrite)
        if "trackio" in trackers_of(s):  # trackio fixes its store when first imported, once a process: one store for
            os.environ.setdefault("TRACKIO_DIR", str(out.resolve() / "trackio"))  # the comparison's runs
        if s.executor == "ray":
            results = run_on_ray(jobs, tracker, workers=s.workers, threads=s.threads, address=s.address,
                                 gpus=s.gpus_per_run)
        else:
            results = run_jobs(jobs, tracker, workers=s.workers, threads=s.threads)
        timings["base_eval_s"] = results[0]["eval_s"]
        for r in results[1:]:
            timings[r["label"]] = {k: r[k] for k in ("train_s", "eval_s", "train_cpu_s", "eval_cpu_s")}
            kept = earlier.get(r["label"])
            if r["train_s"] is None and isinstance(kept, dict) and kept.get("train_s") is not None:
                timings[r["label"]] |= {"train_s": kept["train_s"], "train_cpu_s": kept.get("train_cpu_s"),
                                        "reused": True}  # a reused run keeps the times it was trained in
        fairness = _fairness(s, out, plan)
        tracker.phase("report")
        timings["total_s"] = time.perf_counter() - started
        plan.info.update(timings=timings, fairness=fairness)
        (out / "compare.json").write_text(json.dumps(plan.info, indent=2, default=str) + "\n")
        build_report(out)


def compare(algos=None, seeds: int | list[int] | None = None, steps: int | None = None, model: str | None = None,
            task: str | None = None, out: str | Path = "runs/compare", eval_n: int | None = None,
            k: int | None = None, *, preset: str | None = None, progress: bool = True, overwrite: bool = False,
            **options) -> Path:
    """Train every algorithm of ``algos`` for each seed, evaluate them on one held-out set, build the report.

    Settings: ``preset``'s (:data:`COMPARE_PRESETS`), overridden by the arguments that are not None, else the
    defaults of :class:`CompareSettings`. ``seeds`` is a count (seeds 0..n-1) or a list; ``model`` a model folder
    (None: the embedded tiny base model). ``options`` are the other fields of :class:`CompareSettings`. Finished runs in
    ``out`` whose config matches are reused unless ``overwrite`` (a run whose config differs is an error), and so
    are evaluations made with the same settings. Returns ``out``.

    With ``workers > 1`` the runs go to spawned worker processes, which import the calling script's main module:
    a script that calls this must do so under ``if __name__ == "__main__":`` (as Python's multiprocessing asks).
    """
    from transformers.utils import logging as hf_logging

    s = make_settings(preset, algos=algos, seeds=seeds, steps=steps, model=model, task=task, eval_n=eval_n, k=k,
                      **options)
    hf_logging.disable_progress_bar()  # per-file load/save bars would break the comparison's own bars
    out = Path(out).expanduser()
    with exclusive(out, what="comparison folder"):
        _run_comparison(s, out, progress=progress, overwrite=overwrite)
    return out
