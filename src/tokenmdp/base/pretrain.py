"""Pretraining the embedded tiny base model: the learning-rate schedule, example encoding, the stream of trace
examples, the training loop (AdamW, warmup + cosine, loss on the completion only), and :func:`pretrain`, which
puts them together and saves the folder atomically (:func:`tokenmdp.atomic.write_folder`).

The model and its character tokenizer are built by :mod:`tokenmdp.policy.tiny`; the traces come from
:mod:`tokenmdp.base.traces`; the held-out figures written into the folder from :mod:`tokenmdp.base.measure`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from tokenmdp.atomic import write_folder
from tokenmdp.base.measure import evaluate_base
from tokenmdp.base.traces import check_settings, countdown_trace, problem_numbers
from tokenmdp.errors import TokenMDPError
from tokenmdp.policy.model import write_meta
from tokenmdp.policy.tiny import build_char_tokenizer, build_tiny_model
from tokenmdp.progress import plain_log, progress_bar
from tokenmdp.tasks import get_task


#: Torch threads for training and measuring a tiny model unless asked otherwise: one. Its matrices are 128 wide,
#: so a second thread buys little and, on a core that another process uses, makes every operator wait (several
#: times slower on a shared 2-core machine). Never read from a momentary load average: the same command takes the
#: same time whatever ran just before it.
DEFAULT_THREADS = 1


def lr_at(step: int, *, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warmup, then cosine decay to ``min_ratio * lr``.

    ``lr(s) = lr * (s + 1) / warmup`` for ``s < warmup``; otherwise with ``p = (s - warmup) / (steps - warmup)``,
    ``lr(s) = lr * (min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2)``.
    Hand-computed (steps=10, lr=1, warmup=2, min_ratio=0.1): s=0 -> 0.5, s=1 -> 1.0, s=2 -> 1.0, s=6 -> 0.55,
    s=10 -> 0.1.
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p)))


def encode_examples(
    tokenizer: PreTrainedTokenizerFast, examples: list[tuple[str, str]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, labels)``, each (B, L), for (prompt, completion) pairs.

    A row is ``prompt + completion + EOS``; ``labels`` equal ``input_ids`` on the completion and the EOS and are
    -100 on the prompt and the padding, so the causal-LM loss counts only the completion.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = tokenizer([p for p, _ in examples], add_special_tokens=False)["input_ids"]
    comps = tokenizer([c for _, c in examples], add_special_tokens=False)["input_ids"]
    width = max(len(p) + len(c) + 1 for p, c in zip(prompts, comps))
    ids = torch.full((len(examples), width), pad, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        row = p + c + [eos]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, len(p) : len(row)] = ids[i, len(p) : len(row)]
    return ids, mask, labels


class TraceStream:
    """Training examples: an endless stream of (prompt, trace) pairs cycling over a pool of problems.

    Example ``k`` is problem ``k % len(problems)`` with its trace seeded by ``(seed, k)``, so every pass over the
    pool shows each problem with a new order of attempts. ``longest`` is the longest completion seen (characters).
    """

    def __init__(self, task, problems: list, *, seed: int, max_failures: int, give_up: float = 0.0,
                 bluff: bool = False, direct: float = 0.0, template: str = "compact"):
        if not problems:
            raise TokenMDPError("pretraining needs at least one training problem")
        self.task, self.problems, self.seed = task, problems, seed
        self.max_failures, self.give_up, self.bluff, self.template = max_failures, give_up, bluff, template
        self.direct = direct
        self.prompts = [task.render(p, template=template) for p in problems]
        self.longest = 0

    def example(self, k: int) -> tuple[str, str]:
        i = k % len(self.problems)
        nums, target = problem_numbers(self.problems[i])
        trace = countdown_trace(nums, target, seed=self.seed * 1_000_003 + k, max_failures=self.max_failures,
                                give_up=self.give_up, bluff=self.bluff, direct=self.direct)
        self.longest = max(self.longest, len(trace))
        return self.prompts[i], trace

    def batch(self, step: int, batch_size: int, group: int = 8) -> list[tuple[str, str]]:
        """Batch ``step``: examples are drawn ``group`` batches at a time, sorted by length and cut into batches
        (in a seeded order), so that a batch pads little; the examples of steps ``[g, g + group)`` are
        ``[g * batch_size, (g + group) * batch_size)`` in some order."""
        start = step - step % group
        if getattr(self, "_group_start", None) != start:
            pool = [self.example(start * batch_size + j) for j in range(group * batch_size)]
            pool.sort(key=lambda ex: len(ex[0]) + len(ex[1]))
            chunks = [pool[i * batch_size : (i + 1) * batch_size] for i in range(group)]
            random.Random(f"{self.seed}|{start}").shuffle(chunks)
            self._group_start, self._chunks = start, chunks
        return self._chunks[step - start]


def optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-8)


def train_loop(model, tokenizer, stream: TraceStream, *, steps: int, batch_size: int, lr: float,
               warmup: int, weight_decay: float, progress: bool) -> dict[str, float]:
    """Train ``model`` in place on ``stream``'s batches; returns loss and throughput figures."""
    opt = optimizer(model, lr, weight_decay)
    model.train()
    ema, first, tokens, start = None, None, 0, time.perf_counter()
    tail: deque[float] = deque(maxlen=max(1, steps // 10))  # final_loss: mean over the last 10% of steps
    log = plain_log(progress)
    with progress_bar(progress) as bar:
        job = bar.add_task("pretrain", total=steps, info="")
        for step in range(steps):
            ids, mask, labels = encode_examples(tokenizer, stream.batch(step, batch_size))
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps=steps, lr=lr, warmup=warmup)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            value = float(loss.detach())
            ema = value if ema is None else 0.95 * ema + 0.05 * value
            first = value if first is None else first
            tail.append(value)
            tokens += int(mask.sum())
            bar.update(job, advance=1, info=f"loss {ema:.3f}")
            if log and (step + 1) % max(1, steps // 10) == 0:
                spent = time.perf_counter() - start
                log(f"[pretrain] step {step + 1}/{steps}, loss {ema:.3f}, {spent:.0f} s, "
                    f"about {spent * (steps - step - 1) / (step + 1):.0f} s left")
    model.eval()
    seconds = time.perf_counter() - start
    return {"first_loss": round(first, 4), "final_loss": round(sum(tail) / len(tail), 4),
            "train_s": round(seconds, 1), "tokens": tokens, "tokens_per_s": round(tokens / max(seconds, 1e-9))}




TRACE_TASKS = ("countdown",)
# The embedded default base model's task: Countdown with 3 numbers in 1..10 and targets <= 100; a fifth of the
# number sets is held out (test_fraction 0.2): 2,233 distinct train problems, and 682 test problems on 52 number
# sets never seen in training (a comparison evaluates 500 of them).
BASE_TASK_KWARGS: dict[str, Any] = {"num_count": 3, "low": 1, "high": 10, "target_low": 1, "target_high": 100,
                                    "test_fraction": 0.2}


@dataclass(frozen=True)
class PretrainSettings:
    """What a base model is a function of (besides the task and its options). :data:`SETTINGS_KEYS` of them are
    recorded in ``tokenmdp.json`` as ``pretrain.settings`` and decide whether a folder is current."""

    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    seed: int = 0
    max_failures: int = 2
    give_up: float = 0.0
    bluff: bool = False
    direct: float = 0.0
    train_problems: int = 2000
    warmup: int | None = None  # None: steps // 20
    weight_decay: float = 0.01

    def recorded(self) -> dict[str, Any]:
        """The settings as ``tokenmdp.json`` records them (``pretrain.settings``)."""
        return {key: getattr(self, key) for key in SETTINGS_KEYS}

    def check(self, task: str) -> None:
        """One :class:`TokenMDPError` naming the first bad setting."""
        if task not in TRACE_TASKS:
            raise TokenMDPError(f"task {task!r}: no derivational traces for it; pretrain supports "
                                f"{', '.join(TRACE_TASKS)}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise TokenMDPError(f"{name} must be >= 1, got {getattr(self, name)}")
        try:
            check_settings(self.max_failures, self.give_up, self.bluff, self.direct)
        except ValueError as exc:
            raise TokenMDPError(str(exc)) from None


SETTINGS_KEYS = ("steps", "batch_size", "lr", "hidden_size", "num_layers", "num_heads", "seed", "max_failures",
                 "give_up", "bluff", "direct", "train_problems")


def _trace_kind(give_up: float, bluff: bool) -> str:
    if give_up == 0:
        return "restart-search"
    return "bluff-search" if bluff else "give-up-search"


def pretrain(task: str = "countdown", out: str | Path | None = None, settings: PretrainSettings | None = None, *,
             task_kwargs: dict | None = None, eval_problems: int = 64, eval_k: int = 8, threads: int | None = None,
             overwrite: bool = False, progress: bool = True, **changes: Any) -> Path:
    """Build the char tokenizer and a small Qwen2 model, train it on ``task``'s derivational traces, save to ``out``.

    ``settings`` (default :class:`PretrainSettings`) with ``changes`` applied (``steps=3``, ...). The folder
    (written atomically) holds ``model.safetensors``, ``config.json``, the tokenizer files and ``tokenmdp.json``:
    tokenizer kind, task, task kwargs, template, ``max_new_tokens``, the pretraining settings and figures, and
    (``eval_problems > 0``) the held-out figures of :func:`tokenmdp.base.measure.evaluate_base` on
    ``eval_problems`` test problems with ``eval_k`` samples each. Sets torch's thread count to ``threads``
    (default :data:`DEFAULT_THREADS`). Training problems: the first ``min(train_problems, steps * batch_size)``
    of the train split. ``task_kwargs`` default to the embedded base model's (:data:`BASE_TASK_KWARGS`).
    """
    try:
        s = dataclasses.replace(settings or PretrainSettings(), **changes)
    except TypeError as exc:
        raise TokenMDPError(f"pretrain: {exc}") from None
    s.check(task)
    if out is None:
        raise TokenMDPError("pretrain needs an output folder (--out)")
    out = Path(out)
    if out.exists() and not overwrite:
        raise TokenMDPError(f"output folder {out} already exists (pass --overwrite to replace it)")
    if eval_k < 1:
        raise TokenMDPError(f"eval_k must be >= 1, got {eval_k}")
    task_kwargs = {"template": "compact", **(BASE_TASK_KWARGS if task_kwargs is None else task_kwargs)}
    if task_kwargs["template"] != "compact":
        raise TokenMDPError(f"task_kwargs: template must be 'compact' (the traces' format), "
                            f"got {task_kwargs['template']!r}")
    task_obj = get_task(task, **task_kwargs)
    torch.set_num_threads(threads or DEFAULT_THREADS)
    started = time.perf_counter()
    problems = task_obj.problems("train", n=min(s.train_problems, s.steps * s.batch_size), seed=s.seed)
    stream = TraceStream(task_obj, problems, seed=s.seed, max_failures=s.max_failures, give_up=s.give_up,
                         bluff=s.bluff, direct=s.direct)
    tokenizer = build_char_tokenizer()
    size = {"hidden_size": s.hidden_size, "num_layers": s.num_layers, "num_heads": s.num_heads}
    model = build_tiny_model(tokenizer, seed=s.seed, **size)
    warmup = max(1, s.steps // 20) if s.warmup is None else s.warmup
    fit = train_loop(model, tokenizer, stream, steps=s.steps, batch_size=s.batch_size, lr=s.lr, warmup=warmup,
                     weight_decay=s.weight_decay, progress=progress)
    longest = stream.longest + 1  # characters are tokens; + EOS
    meta: dict[str, Any] = {
        "name": out.name, "tokenizer": "char", "task": task, "task_kwargs": task_kwargs, "template": "compact",
        "max_new_tokens": int(16 * math.ceil((longest + 16) / 16)),
        "trace": {"kind": _trace_kind(s.give_up, s.bluff), "max_failures": s.max_failures, "give_up": s.give_up,
                  "bluff": s.bluff, "direct": s.direct, "longest_completion_tokens": longest},
        "pretrain": {
            "settings": s.recorded(),
            "steps": s.steps, "batch_size": s.batch_size, "lr": s.lr, "warmup": warmup,
            "weight_decay": s.weight_decay, "seed": s.seed, "size": size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "threads": torch.get_num_threads(), "train_problems": len(problems), **fit},
    }
    if eval_problems > 0:
        held_out = task_obj.problems("test", n=eval_problems, seed=s.seed)
        meta["eval"] = evaluate_base(model, tokenizer, task_obj, held_out, k=eval_k,
                                     max_new_tokens=meta["max_new_tokens"], seed=s.seed, progress=progress)
    meta["pretrain"]["total_s"] = round(time.perf_counter() - started, 1)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_meta(tmp, meta)

    return write_folder(out, write, replace=overwrite)


__all__ = ["BASE_TASK_KWARGS", "DEFAULT_THREADS", "PretrainSettings", "SETTINGS_KEYS", "TRACE_TASKS", "TraceStream",
           "encode_examples", "lr_at", "optimizer", "pretrain", "train_loop"]
