"""The pieces of one comparison (:mod:`tokenmdp.experiments.compare`): training one run, evaluating one model on the
held-out set, the fairness check on the logged prompt streams, and the progress display."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

from tokenmdp.errors import TokenMDPError


class FairnessError(RuntimeError):
    """The algorithms of one seed did not see the same prompts (a bug in the trainer or the data stream)."""


class Tracker:
    """Two rich bars on stderr: the whole comparison (phase, run, time left) and the current job.

    Overall work is counted in sampled completions: a training step weighs ``2 * prompts_per_step * group_size``
    (sampling plus the update) plus its share of the trainer's held-out curve, an evaluation ``eval_n * (k + 1)``;
    the time left is rich's estimate from them.
    """

    def __init__(self, settings, *, enabled: bool = True):
        s = settings
        self.enabled = enabled
        from tokenmdp.experiments.compare import _eval_every

        every = _eval_every(s)
        curve = (s.steps // every if every else 0) * min(s.eval_n, s.curve_n) * (s.curve_k + 1)
        self.step_w = 2 * s.prompts_per_step * s.group_size + curve // s.steps  # the trainer's curve, spread
        self.eval_w = s.eval_n * (s.k + 1)
        runs = len(s.algos) * len(s.seeds)
        self.total = self.eval_w * (runs + 1) + runs * s.steps * self.step_w
        self.progress = None

    def __enter__(self) -> Tracker:
        from tokenmdp.commands.evaluate import progress_bar

        self.progress = progress_bar(self.enabled)
        self.progress.__enter__()
        self.overall = self.progress.add_task("compare", total=self.total, info="")
        self.job = self.progress.add_task("", total=1, info="", visible=False)
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def phase(self, text: str) -> None:
        self.progress.update(self.overall, info=text)

    def start_job(self, name: str, label: str, total: int) -> None:
        self.progress.reset(self.job, total=total, description=f"{name} {label}", info="", visible=True)
        self.phase(f"{name} {label}")

    def advance(self, amount: int, weight: int = 1) -> None:
        self.progress.update(self.job, advance=amount)
        self.progress.update(self.overall, advance=amount * weight)

    def skip(self, units: int, label: str) -> None:
        self.progress.update(self.overall, advance=units, info=f"reused {label}")


def train_run(config_path: Path, run_dir: Path, seed: int, s, *, tracker: Tracker, label: str,
              overwrite: bool = False) -> float | None:
    """Train one (algorithm, seed) into ``run_dir``; seconds taken, or None when a finished run was reused."""
    from tokenmdp.train.config import load_config
    from tokenmdp.train.run_dir import check_same_run
    from tokenmdp.train.trainer import train

    config = load_config(config_path, list(s.overrides) + [f"run.seed={seed}", f"run.out={json.dumps(str(run_dir))}"])
    if not overwrite and (run_dir / "DONE").exists():
        try:
            check_same_run(config, run_dir)
            done = json.loads((run_dir / "DONE").read_text() or "{}")
            if done.get("steps", config.run.steps) != config.run.steps:
                raise TokenMDPError(f"{run_dir} was trained for run.steps={done['steps']}, not {config.run.steps}")
        except (TokenMDPError, json.JSONDecodeError) as exc:
            raise TokenMDPError(f"{exc}; pass --overwrite to retrain it, or choose another --out") from None
        tracker.skip(s.steps * tracker.step_w, label)
        return None
    tracker.start_job("train", label, s.steps)
    start = time.perf_counter()
    train(config, progress=False, callbacks=[lambda step, record, c: tracker.advance(1, tracker.step_w)])
    return time.perf_counter() - start


def eval_key(s, problems, max_new_tokens: int) -> dict:
    """What an evaluation's numbers are a function of (besides the model): a saved evaluation with the same key
    is reused by a comparison run again in the same folder."""
    ids = hashlib.sha1("\n".join(p.id for p in problems).encode()).hexdigest()
    return json.loads(json.dumps({
        "task": s.task, "task_kwargs": s.task_kwargs, "template": s.template, "problems": ids, "k": s.k,
        "temperature": s.eval_temperature, "max_new_tokens": max_new_tokens, "seed": s.heldout_seed,
        "batch_size": s.eval_batch_size, "engine": s.engine}, default=str))


def run_eval(model_dir, out_json: Path, *, task, problems, settings, max_new_tokens: int, tracker: Tracker,
             label: str, extra: dict | None = None, reuse: bool = False) -> float:
    """Evaluate ``model_dir`` on the held-out ``problems``; writes ``out_json`` and the records beside it."""
    from tokenmdp.experiments.evaluate import evaluate, save_eval
    from tokenmdp.policy.model import load_policy

    s = settings
    key = eval_key(s, problems, max_new_tokens)
    if reuse and out_json.is_file():
        old = json.loads(out_json.read_text())
        if old.get("key") == key:
            tracker.skip(tracker.eval_w, f"{label} evaluation")
            return float(old.get("time_s", 0.0))
    if not Path(model_dir).exists():
        raise TokenMDPError(f"no final model to evaluate: {model_dir} (did the run finish?)")
    policy = load_policy(str(model_dir))
    tracker.start_job("eval", label, len(problems) * (s.k + 1))
    result = evaluate(policy, None, task, problems, k=s.k, engine=s.engine, temperature=s.eval_temperature,
                      max_new_tokens=max_new_tokens, batch_size=s.eval_batch_size, seed=s.heldout_seed,
                      template=s.template, progress=tracker.advance)
    records = out_json.with_name(out_json.stem.replace("eval", "eval_records") + ".jsonl")
    save_eval(result, out_json, records=records, model=str(model_dir), key=key, **(extra or {}))
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
