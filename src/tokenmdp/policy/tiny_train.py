"""Pretraining pieces of the tiny base model: the learning-rate schedule, example encoding, the stream of trace
examples, and the training loop (AdamW, warmup + cosine, loss on the completion only). :func:`tokenmdp.policy.tiny.
pretrain` puts them together."""

from __future__ import annotations

import math
import os
import random
import time
from collections import deque

import torch
from transformers import PreTrainedTokenizerFast

from tokenmdp.errors import TokenMDPError
from tokenmdp.progress import plain_log, progress_bar


def default_threads() -> int:
    """Torch threads for training a tiny model: the cores left idle by other processes (1-minute load average),
    at least 1 and at most 4. Small operators on a busy core make every extra thread wait (several times slower on
    a shared 2-core machine), so a loaded machine gets one thread."""
    cores = os.cpu_count() or 1
    try:
        idle = cores - os.getloadavg()[0]
    except OSError:  # not available on this platform
        idle = cores
    return max(1, min(4, cores, int(idle + 0.5)))


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
        from tokenmdp.policy.traces import countdown_trace, problem_numbers

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


__all__ = ["TraceStream", "default_threads", "encode_examples", "lr_at", "optimizer", "train_loop"]
