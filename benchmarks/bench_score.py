"""Verifier throughput: Countdown and GSM8K completions scored per second on one core.

    .venv/bin/python benchmarks/bench_score.py [--n 20000] [--gsm8k-dir ../shared/data/gsm8k] [--math-verify 300]

The completions are a realistic mix: correct answers with reasoning, formatted but wrong answers, numbers used
twice, missing tags (truncated responses) and malformed or hostile expressions (``9**9**9``, ``__import__``, very
long ones). Time is process CPU time of the scoring loop only, in this one process (one core).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from tokenmdp.tasks import GSM8K, Countdown, Problem

REPO = Path(__file__).resolve().parents[1]


def countdown_mix(n: int, seed: int = 0) -> tuple[Countdown, list[tuple[Problem, str]]]:
    task = Countdown()
    problems = task.problems("train", n=200, seed=seed)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = problems[i % len(problems)]
        nums = list(p.metadata["nums"])
        kind = rng.random()
        if kind < 0.35:
            text = task.reference(p, "r1")
        elif kind < 0.65:  # a formatted guess: the numbers in random order with random operators
            rng.shuffle(nums)
            expr = "".join(f"{x}{rng.choice('+-*/')}" for x in nums[:-1]) + str(nums[-1])
            text = f" let me try {expr}.\n</think>\n<answer>{expr}</answer>"
        elif kind < 0.75:
            expr = "*".join(map(str, nums + nums[:1]))
            text = f" maybe\n</think>\n<answer>{expr}</answer>"
        elif kind < 0.9:  # truncated before the answer
            text = task.reference(p, "r1")[: rng.randint(5, 60)]
        else:
            text = rng.choice([
                "</think><answer>9**9**9</answer>",
                "</think><answer>__import__('os').system('echo hi')</answer>",
                "</think><answer>" + "+".join(map(str, nums * 80)) + "</answer>",
                "</think><answer>(1+2</answer>",
                "</think><answer>\u0663+4</answer>",
            ])
        out.append((p, text))
    return task, out


def gsm8k_mix(n: int, data_dir: Path | None, seed: int = 0) -> tuple[GSM8K, list[tuple[Problem, str]]]:
    task = GSM8K(data_dir=data_dir)
    if data_dir is not None and (data_dir / "test.jsonl").exists():
        problems = task.problems("test", n=500, seed=seed)
    else:
        problems = [Problem(f"p{i}", "q", str(i * 7), {"solution": f"{i}*7=<<{i}*7={i * 7}>>{i * 7}\n#### {i * 7}"})
                    for i in range(500)]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = problems[i % len(problems)]
        ref = task.reference(p, "hash")
        kind = rng.random()
        if kind < 0.4:
            text = ref
        elif kind < 0.7:
            text = ref.rsplit("####", 1)[0] + f"#### {int(p.answer) + rng.randint(1, 9)}"
        elif kind < 0.85:
            text = ref.rsplit("####", 1)[0] + f"The answer is ${int(p.answer):,}."
        else:
            text = ref[: len(ref) // 2]
        out.append((p, text))
    return task, out


def rate(task, items) -> tuple[float, float]:
    """(completions per second of process CPU time, accuracy)."""
    start = time.process_time()
    correct = 0
    for p, text in items:
        correct += task.score(p, text).correct
    return len(items) / (time.process_time() - start), correct / len(items)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="completions per task")
    ap.add_argument("--gsm8k-dir", type=Path, default=REPO.parent / "shared" / "data" / "gsm8k")
    ap.add_argument("--math-verify", type=int, default=300, help="GSM8K completions for the math-verify backend")
    args = ap.parse_args(argv)

    task, items = countdown_mix(args.n)
    per_s, acc = rate(task, items)
    print(f"countdown  exact verifier       {per_s:>10,.0f} completions/s  (n={len(items)}, accuracy {acc:.3f})")
    data_dir = args.gsm8k_dir if args.gsm8k_dir.exists() else None
    task, items = gsm8k_mix(args.n, data_dir)
    per_s, acc = rate(task, items)
    print(f"gsm8k      strict, exact        {per_s:>10,.0f} completions/s  (n={len(items)}, accuracy {acc:.3f})")
    task.extraction = "flexible"
    per_s, acc = rate(task, items)
    print(f"gsm8k      flexible, exact      {per_s:>10,.0f} completions/s  (n={len(items)}, accuracy {acc:.3f})")
    if args.math_verify > 0:
        try:
            mv = GSM8K(data_dir=data_dir, backend="math_verify", extraction="any")
        except Exception as exc:  # math-verify not installed
            print(f"gsm8k      math-verify          skipped ({exc})", file=sys.stderr)
        else:
            per_s, acc = rate(mv, items[: args.math_verify])
            print(f"gsm8k      any, math-verify     {per_s:>10,.0f} completions/s  "
                  f"(n={args.math_verify}, accuracy {acc:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
