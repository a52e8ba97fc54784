"""Held-out evaluation of a policy on a verifiable task: greedy and sampled pass@1, unbiased pass@k, majority vote,
best-of-n with the verifier, format rate, and the response length of correct and incorrect answers.

For each problem, one greedy completion (temperature 0) and ``n_samples`` (default ``k``) sampled completions are
generated with a rollout engine and scored by the task's verifier. Lengths are in tokens (EOS included, as
:attr:`tokenmdp.rollout.Rollout.lengths`). Sampling is reproducible from ``seed`` for a given ``batch_size``.

Majority vote groups the samples by the task's normalised answer, ``task.answer_key(problem, completion)`` when the
task defines it (Countdown: the value and the multiset of numbers of the equation; GSM8K: the extracted number),
else the completion's last non-empty line with whitespace collapsed, for formatted completions only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

from tokenmdp.errors import TokenMDPError
from tokenmdp.stats import best_of_n, majority_vote, pass_at_k
from tokenmdp.policy.model import model_defaults
from tokenmdp.rollout import get_engine
from tokenmdp.train.data import render_prompts

ProgressFn = Callable[[int], None]  # called with the number of completions just generated


def _default_key(completion: str, formatted: bool) -> Hashable | None:
    if not formatted:
        return None
    lines = [" ".join(line.split()) for line in completion.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def answer_key(task, problem, completion: str, formatted: bool) -> Hashable | None:
    """The normalised answer used for majority vote (see the module docstring); None when there is none."""
    fn = getattr(task, "answer_key", None)
    if fn is not None:
        return fn(problem, completion)
    return _default_key(completion, formatted)


def _get_engine(engine, model, tokenizer):
    if not isinstance(engine, str):
        return engine  # an Engine instance
    return get_engine(engine, model, tokenizer)


def _generate(eng, prompts: list[str], *, n: int, max_new_tokens: int, temperature: float, seed: int,
              batch_size: int, progress: ProgressFn | None) -> tuple[list[str], list[int], list[bool]]:
    """Completions, token lengths and truncation flags of ``n`` samples per prompt, ``batch_size`` rows a call."""
    per_call = max(1, batch_size // n)
    texts: list[str] = []
    lengths: list[int] = []
    truncated: list[bool] = []
    for call, lo in enumerate(range(0, len(prompts), per_call)):
        ro = eng.generate(prompts[lo : lo + per_call], n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                          seed=seed + 7919 * call)
        texts += list(ro.responses)
        lengths += [int(x) for x in ro.lengths.tolist()]
        truncated += [bool(x) for x in ro.truncated.tolist()]
        if progress is not None:
            progress(len(ro))
    return texts, lengths, truncated


def _episodes(eng, tokenizer, env, problems: Sequence, prompts: list[str], *, n: int, temperature: float, seed: int,
              batch_size: int, progress: ProgressFn | None, **_: Any) -> tuple[list[str], list[int], list[bool], list]:
    """Like :func:`_generate` through a multi-turn environment ``env`` (a :class:`~tokenmdp.train.environment.
    RunEnvironment`): ``n`` episodes per problem; the texts are the episodes' (turns and observations), the lengths
    count the policy's tokens only, and the fourth list holds each episode's score from the environment (None where
    a limit cut the episode before it was scored)."""
    from tokenmdp.rollout.multiturn import run_episodes

    per_call = max(1, batch_size // n)
    texts: list[str] = []
    lengths: list[int] = []
    truncated: list[bool] = []
    scores: list = []
    for call, lo in enumerate(range(0, len(prompts), per_call)):
        call_seed = seed + 7919 * call
        env.begin(call_seed)
        ep = run_episodes(eng, tokenizer, env.make_env, problems[lo: lo + per_call], prompts[lo: lo + per_call],
                          group_size=n, limits=env.limits, temperature=temperature, seed=call_seed)
        texts += list(ep.rollout.responses)
        lengths += [int(x) for x in ep.rollout.response_mask.sum(1).tolist()]
        truncated += [bool(x) for x in ep.rollout.truncated.tolist()]
        scores += [info.get("score") for info in ep.infos]
        if progress is not None:
            progress(len(ep.rollout))
    return texts, lengths, truncated, scores


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _scored(task, problem, text: str, length: int, truncated: bool, score: Any = None, *,
            from_env: bool = False) -> dict:
    """One completion's record; ``from_env``: ``score`` is the environment's (None: the episode was cut before it
    was scored, reward 0), else the task's verifier scores ``text``."""
    if from_env:
        from tokenmdp.tasks.task import Score

        score = score if score is not None else Score(0.0, False, False, "no score: the episode was cut by a limit")
    s = score if from_env else task.score(problem, text)
    return {"completion": text, "reward": float(s.reward), "correct": bool(s.correct),
            "formatted": bool(s.formatted), "length": length, "truncated": truncated}


def problem_record(task, problem, greedy: dict | None, samples: list[dict], k: int) -> dict:
    """Per-problem figures: correct count, pass@1 and pass@k (unbiased), majority-vote and best-of-n verdicts."""
    n = len(samples)
    c = sum(s["correct"] for s in samples)
    keys = [answer_key(task, problem, s["completion"], s["formatted"]) for s in samples]
    for s, key in zip(samples, keys):
        s["answer_key"] = None if key is None else str(key)
    vote = majority_vote(keys)
    best = best_of_n([s["reward"] for s in samples])
    return {
        "id": problem.id, "answer": str(problem.answer), "greedy": greedy, "samples": samples, "n_correct": c,
        "pass@1": c / n, "pass@k": pass_at_k(n, c, k),
        "majority_correct": bool(vote is not None and samples[vote]["correct"]),
        "best_of_n_correct": bool(samples[best]["correct"]),
    }


def summarise(records: list[dict], k: int) -> dict[str, Any]:
    """Metrics over problems (see :func:`evaluate`); ``pass@j`` for j = 1, 2, 4, ... up to k, and k itself."""
    out: dict[str, Any] = {"n_problems": len(records), "k": k}
    greedy = [r["greedy"] for r in records if r["greedy"] is not None]
    if greedy:
        out["greedy/pass@1"] = _mean([g["correct"] for g in greedy])
        out["greedy/format_rate"] = _mean([g["formatted"] for g in greedy])
        out["greedy/reward"] = _mean([g["reward"] for g in greedy])
        out["greedy/length"] = _mean([g["length"] for g in greedy])
        out["greedy/length_correct"] = _mean([g["length"] for g in greedy if g["correct"]])
        out["greedy/length_incorrect"] = _mean([g["length"] for g in greedy if not g["correct"]])
    samples = [s for r in records for s in r["samples"]]
    if samples:
        out["sampled/pass@1"] = _mean([r["pass@1"] for r in records])
        out["pass@k"] = _mean([r["pass@k"] for r in records])
        j = 1
        while j <= k:
            out[f"pass@{j}"] = _mean([pass_at_k(len(r["samples"]), r["n_correct"], j) for r in records])
            j *= 2
        out[f"pass@{k}"] = out["pass@k"]
        out["majority@k"] = _mean([r["majority_correct"] for r in records])
        out["best_of_k"] = _mean([r["best_of_n_correct"] for r in records])
        out["sampled/format_rate"] = _mean([s["formatted"] for s in samples])
        out["sampled/reward"] = _mean([s["reward"] for s in samples])
        out["sampled/truncated_rate"] = _mean([s["truncated"] for s in samples])
        out["sampled/length"] = _mean([s["length"] for s in samples])
        out["sampled/length_correct"] = _mean([s["length"] for s in samples if s["correct"]])
        out["sampled/length_incorrect"] = _mean([s["length"] for s in samples if not s["correct"]])
    return out


def evaluate(model, tokenizer, task, problems: Sequence, *, k: int = 8, n_samples: int | None = None,
             engine: Any = "fast", temperature: float = 1.0, max_new_tokens: int = 128, greedy: bool = True,
             batch_size: int = 256, seed: int = 0, template: str | None = None, chat: bool = False,
             progress: ProgressFn | None = None, env: Any = None) -> dict:
    """Evaluate ``model`` on ``problems``: returns ``{"metrics", "records", "settings", "time_s"}``.

    ``model`` is a causal LM or a :class:`~tokenmdp.policy.model.Policy` (then ``tokenizer`` may be None);
    ``engine`` a name for :func:`tokenmdp.rollout.get_engine` or an engine instance. Metrics:
    ``greedy/pass@1`` (temperature 0), ``sampled/pass@1`` (mean over problems of c_i / n),
    ``pass@k`` (mean of the unbiased estimator ``1 - C(n - c_i, k) / C(n, k)``, n = ``n_samples`` >= k),
    ``majority@k`` (the most frequent normalised answer among the samples is correct), ``best_of_k`` (the sample
    with the highest verifier reward is correct), ``*/format_rate``, ``*/length_correct`` and
    ``*/length_incorrect`` (mean tokens), ``sampled/truncated_rate``. ``chat``: each prompt as the user turn of the
    tokenizer's chat template (:func:`tokenmdp.policy.model.chat_prompt`). ``progress(m)`` is told of every ``m``
    completions generated (``len(problems) * (n_samples + greedy)`` in all).

    ``env``: a multi-turn environment (:class:`~tokenmdp.train.environment.RunEnvironment`, e.g. the two-LLM
    formulation's frozen base): every completion is an episode of the policy with it, scored by the environment
    (the base's answer for two LLMs), its length the policy's tokens; greedy means a greedy policy (the environment
    samples as it was configured to). ``engine`` must sample from token ids (``fast`` or ``hf``).
    """
    n_samples = k if n_samples is None else n_samples
    if k < 1 or n_samples < k:
        raise TokenMDPError(f"evaluation needs k >= 1 and n_samples >= k, got k={k}, n_samples={n_samples}")
    if not problems:
        raise TokenMDPError("evaluation needs at least one problem")
    if hasattr(model, "model") and hasattr(model, "tokenizer"):
        model, tokenizer = model.model, (tokenizer or model.tokenizer)
    start = time.perf_counter()
    eng = _get_engine(engine, model, tokenizer)
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    prompts = render_prompts(task, list(problems), template=template, tokenizer=tokenizer, chat=chat)
    opts = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    if env is not None:
        gen = lambda **kw: _episodes(eng, tokenizer, env, list(problems), prompts, **kw)  # noqa: E731
    else:
        gen = lambda **kw: _generate(eng, prompts, **kw) + ([None] * len(prompts) * kw["n"],)  # noqa: E731
    try:
        g = gen(n=1, temperature=0.0, seed=seed, **opts) if greedy else None
        s = gen(n=n_samples, temperature=temperature, seed=seed + 1, **opts)
    finally:
        if was_training:
            model.train()
    on = env is not None
    records = []
    for i, problem in enumerate(problems):
        gr = _scored(task, problem, g[0][i], g[1][i], g[2][i], g[3][i], from_env=on) if g is not None else None
        rows = range(i * n_samples, (i + 1) * n_samples)
        samples = [_scored(task, problem, s[0][j], s[1][j], s[2][j], s[3][j], from_env=on) for j in rows]
        records.append(problem_record(task, problem, gr, samples, k))
    settings = {"task": getattr(task, "name", str(task)), "template": template, "chat": chat, "n": len(problems),
                "k": k,
                "n_samples": n_samples, "temperature": temperature, "max_new_tokens": max_new_tokens,
                "greedy": greedy, "engine": engine if isinstance(engine, str) else getattr(eng, "name", "custom"),
                "batch_size": batch_size, "seed": seed,
                "env": None if env is None else getattr(env, "kind", "custom")}
    return {"metrics": summarise(records, k), "records": records, "settings": settings,
            "time_s": time.perf_counter() - start}


def save_eval(result: dict, path: str | Path, *, records: str | Path | None = None, **extra: Any) -> Path:
    """Write ``result`` without its records as JSON to ``path`` (plus ``extra`` keys such as ``algo``/``seed``),
    and the per-problem records as JSONL to ``records`` when given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {k: v for k, v in result.items() if k != "records"} | extra
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    if records is not None:
        with Path(records).open("w") as fh:
            for rec in result["records"]:
                fh.write(json.dumps(rec, default=str) + "\n")
    return path


def resolve_eval_setup(model_path: str | Path | None, task: str | None, task_kwargs: dict | None = None,
                       template: str | None = None, max_new_tokens: int | None = None) -> dict:
    """Task name, task kwargs, template and max_new_tokens for evaluating ``model_path``
    (:func:`tokenmdp.policy.model.model_defaults`, the same resolution as a training run's)."""
    d = model_defaults(model_path, task, task_kwargs, template, max_new_tokens)
    return {"task": d.task, "task_kwargs": d.task_options, "template": d.template, "max_new_tokens": d.max_new_tokens}


def load_eval_problems(task, *, data: str | Path | None = None, split: str = "test", n: int | None = None,
                       seed: int = 0) -> list:
    """``n`` problems from a local problems file (JSONL/Parquet, the task's format; the first ``n``) or from the
    task's ``split``; asking for more than a file holds is an error naming the file."""
    if data is not None:
        problems = task.load_problems(data)
        if n is not None and n > len(problems):
            raise TokenMDPError(f"--n {n}: {data} holds only {len(problems)} problems")
        return problems[:n] if n is not None else problems
    return task.problems(split, n=n, seed=seed)
