"""Held-out figures of a tiny base model: how much room it leaves for RL.

For each held-out problem, ``k`` samples at temperature 1 and one greedy completion are scored with the task's
verifier. A group (the ``k`` samples of one problem) is **mixed** when some samples are right and some wrong: only
mixed groups give group-relative methods (GRPO, RLOO) a non-zero advantage.
"""

from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Sequence

import torch

from tokenmdp.errors import TokenMDPError
from tokenmdp.policy.model import read_meta
from tokenmdp.policy.tiny import load_char_tokenizer
from tokenmdp.progress import progress_bar
from tokenmdp.tasks import get_task
from tokenmdp.train.heldout import evaluate


def group_figures(correct: Sequence[bool], k: int) -> dict[str, float]:
    """Figures of ``correct`` (length ``N * k``, row ``i * k + j`` = sample ``j`` of problem ``i``).

    ``sampled_accuracy`` is the mean of ``correct``; ``mixed_fraction`` the fraction of groups with
    ``0 < c_i < k`` correct; ``all_correct_fraction`` and ``all_wrong_fraction`` the others; ``pass_at_k`` the
    fraction with ``c_i >= 1``. Hand-computed (k=2): ``[1, 0, 1, 1, 0, 0, 0, 1]`` -> accuracy 0.5, mixed 0.5,
    all correct 0.25, all wrong 0.25, pass@2 0.75.
    """
    if k < 1 or len(correct) % k:
        raise TokenMDPError(f"k={k} does not divide the {len(correct)} samples into groups")
    counts = torch.tensor([bool(c) for c in correct], dtype=torch.float64).view(-1, k).sum(dim=1)
    return {
        "sampled_accuracy": float(counts.sum() / (counts.numel() * k)),
        "mixed_fraction": float(((counts > 0) & (counts < k)).double().mean()),
        "all_correct_fraction": float((counts == k).double().mean()),
        "all_wrong_fraction": float((counts == 0).double().mean()),
        f"pass_at_{k}": float((counts > 0).double().mean()),
    }


def _mean(xs: Sequence[float]) -> float | None:
    return round(sum(xs) / len(xs), 2) if xs else None


def evaluate_base(model, tokenizer, task, problems: list, *, k: int = 8, max_new_tokens: int = 128,
                  seed: int = 0, template: str = "compact", chunk: int = 64, progress: bool = False) -> dict:
    """Sampled (temperature 1, ``k`` per problem) and greedy figures of ``model`` on ``problems``.

    The completions come from :func:`tokenmdp.train.heldout.evaluate` (the ``fast`` engine, which runs
    Llama-family models such as the tiny Qwen2 with its own decoder and any other causal LM through transformers;
    ``chunk * k`` rows per call); this adds the group view. Returns sampled and greedy accuracy, the group figures of
    :func:`group_figures`, ``format_rate`` (samples with a parseable answer), ``truncated_rate``, mean completion
    length in tokens (all, correct, incorrect) and the seconds taken.
    """
    if not problems:
        raise TokenMDPError("evaluation needs at least one problem")
    start = time.perf_counter()
    with progress_bar(progress) as bar:
        job = bar.add_task("evaluate", total=len(problems) * (k + 1), info=f"k={k}")
        result = evaluate(model, tokenizer, task, problems, k=k, max_new_tokens=max_new_tokens, seed=seed,
                          template=template, batch_size=chunk * k, progress=lambda m: bar.update(job, advance=m))
    samples = [s for r in result["records"] for s in r["samples"]]
    correct = [s["correct"] for s in samples]
    lengths = [s["length"] for s in samples]
    out = {"n_problems": len(problems), "k": k, **group_figures(correct, k)}
    out["greedy_accuracy"] = result["metrics"]["greedy/pass@1"]
    out["format_rate"] = result["metrics"]["sampled/format_rate"]
    out["truncated_rate"] = result["metrics"]["sampled/truncated_rate"]
    out["mean_length"] = _mean(lengths)
    out["mean_length_correct"] = _mean([n for n, c in zip(lengths, correct) if c])
    out["mean_length_incorrect"] = _mean([n for n, c in zip(lengths, correct) if not c])
    out["seconds"] = round(time.perf_counter() - start, 1)
    return {key: (round(v, 4) if isinstance(v, float) else v) for key, v in out.items()}


def measure_base(model_dir: str | Path, n_problems: int = 64, k: int = 8, seed: int = 0, *,
                 max_new_tokens: int | None = None, progress: bool = False) -> dict:
    """Held-out figures (see :func:`evaluate_base`) of the tiny model saved in ``model_dir``.

    The task, its settings, the template and ``max_new_tokens`` (unless given) come from the folder's
    ``tokenmdp.json``; the problems are the first ``n_problems`` of the task's test split for ``seed``.
    """
    from transformers import AutoModelForCausalLM

    meta = read_meta(model_dir)
    if n_problems < 1 or k < 1:
        raise TokenMDPError(f"measure_base needs n_problems >= 1 and k >= 1, got {n_problems} and {k}")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = load_char_tokenizer(model_dir)
    task = get_task(meta["task"], **meta.get("task_kwargs", {}))
    problems = task.problems("test", n=n_problems, seed=seed)
    max_new_tokens = int(max_new_tokens or meta["max_new_tokens"])
    return evaluate_base(model, tokenizer, task, problems, k=k, max_new_tokens=max_new_tokens,
                         seed=seed, template=meta.get("template", "compact"), progress=progress)


__all__ = ["evaluate_base", "group_figures", "measure_base"]
