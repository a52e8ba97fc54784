"""TRL's side of ``bench_step.py``: its ``GRPOTrainer`` run on the benchmark's setup (timed by callbacks and a
wrapper around its generation), and the first-step comparison of its loss and gradients with tokenmdp's on TRL's
own step-1 batch. Benchmark-only: TRL is never a dependency of tokenmdp."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # bench_step's Setup: the model folder, prompts, problems and settings both sides share
    from bench_step import Setup

SUPPORTED_TRL = "1.16"


def token_counts(prompt_mask: torch.Tensor, response_mask: torch.Tensor) -> dict:
    """The prompt and response tokens of a batch (its masks summed): what a step trained, for the FLOP count."""
    return {"prompt_tokens": int(prompt_mask.sum()), "response_tokens": int(response_mask.sum())}


def require_trl() -> str:
    """TRL's version, or one line on stderr and exit 2 when it is missing or not the supported version."""
    try:
        import trl
    except ImportError:
        print(f"bench_step: TRL is not installed: pip install trl=={SUPPORTED_TRL}.0 — benchmark-only "
              f"(never a runtime dependency of tokenmdp)", file=sys.stderr)
        raise SystemExit(2) from None
    version = getattr(trl, "__version__", "unknown")
    if not version.startswith(SUPPORTED_TRL + "."):
        print(f"bench_step: TRL {version} is not supported (this benchmark drives GRPOTrainer internals of TRL "
              f"{SUPPORTED_TRL}.x): pip install trl=={SUPPORTED_TRL}.0 — benchmark-only", file=sys.stderr)
        raise SystemExit(2)
    return version


# ------------------------------------------------------------------------------------------------------------- TRL

def run_trl(s: Setup, tag: str) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer


    a = s.args
    torch.set_num_threads(a.threads)
    policy = s.policy()  # tokenmdp's tokenizer (left padding); SmolLM2: with tokenmdp's adapter
    data = Dataset.from_dict({"prompt": s.prompts, "problem": list(range(len(s.problems)))})
    rewards_seen: list[list[float]] = []

    def task_reward(prompts, completions, problem, **_):
        out = [float(s.task.score(s.problems[i], text).reward) for i, text in zip(problem, completions)]
        rewards_seen.append(out)
        return out

    config = GRPOConfig(
        output_dir=str(s.tmp / tag), max_steps=a.steps, per_device_train_batch_size=s.micro,
        gradient_accumulation_steps=s.rows // s.micro, num_generations=a.group,
        max_completion_length=s.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, learning_rate=a.lr,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", beta=0.0, loss_type="grpo",
        scale_rewards="group", epsilon=0.2, num_iterations=1, shuffle_dataset=False, seed=0, use_cpu=True,
        bf16=False, fp16=False, gradient_checkpointing=False, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, log_completions=False, dataloader_num_workers=0)
    steps: dict[int, dict] = {}
    first: dict = {}
    marks: dict = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks["prev"] = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            marks["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now, k = time.perf_counter(), state.global_step
            rec = steps.setdefault(k, {})
            rec.update(step=now - marks["prev"], end=now)
            rec["update"] = now - marks["begin"] - rec.get("rollout", 0.0)
            marks["prev"] = now

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                steps.setdefault(state.global_step, {})["logged_loss"] = float(logs["loss"])
                if "reward" in logs:
                    steps[state.global_step]["reward"] = float(logs["reward"])

    trainer = GRPOTrainer(model=policy.model, reward_funcs=task_reward, args=config, train_dataset=data,
                          processing_class=policy.tokenizer, callbacks=[Timer()])
    generate = trainer._generate_and_score_completions

    def timed_generate(inputs):
        t0 = time.perf_counter()
        out = generate(inputs)
        k = trainer.state.global_step + 1
        steps.setdefault(k, {}).update(rollout=time.perf_counter() - t0,
                                       **token_counts(out["prompt_mask"], out["completion_mask"]))
        if not first.get("signal"):  # step 1's batch; a later one only when step 1 has no non-zero advantage
            first.update({key: v.detach().clone() for key, v in out.items() if isinstance(v, torch.Tensor)})
            first.update(rewards=torch.tensor(rewards_seen[-1]), step=k, signal=bool(out["advantages"].abs().max() > 0))
        return out

    trainer._generate_and_score_completions = timed_generate
    initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    with contextlib.redirect_stdout(sys.stderr):  # TRL prints its log dicts: keep stdout for the results
        trainer.train()
    return {"side": "trl", "variant": "trl", "parameters": sum(p.numel() for p in policy.model.parameters()),
            "trainable": sum(p.numel() for p in policy.model.parameters() if p.requires_grad),
            "steps": steps, "first_batch": first, "trainer": trainer, "initial": initial,
            "threads_after": torch.get_num_threads()}


def release_memory() -> None:
    """Collect what a finished run left and hand the freed heap back to the system, so that the next run's peak
    resident memory is its own (glibc keeps freed blocks mapped otherwise)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


# ------------------------------------------------------------------------------------------ first-step comparison

def compare_first_step(s: Setup, trl_run: dict) -> dict:
    """TRL's step-1 batch through TRL's loss and tokenmdp's, from the initial weights: losses and gradients."""
    from tokenmdp.algos.core import compute_advantages, policy_loss
    from tokenmdp.algos.presets import get_algo
    from tokenmdp.policy.logprobs import sequence_logprobs

    b, trainer = dict(trl_run["first_batch"]), trl_run["trainer"]
    step, signal = b.pop("step"), b.pop("signal")
    spec = get_algo("grpo_nokl", advantage_eps=1e-4)
    mask = b["completion_mask"]

    rows = int(mask.shape[0])

    def grads_of(loss_fn, model):
        """The loss and the gradient of every trained parameter, in the order of their names (a peft wrapper's
        ``base_model.model.`` prefix dropped, so both sides line up). The batch goes through in micro-batches of
        ``--micro`` rows, each loss weighted by its share of the rows: both losses are means over rows (of
        per-row token means), so the sum is the whole batch's loss, and SmolLM2's 64 rows fit in memory."""
        model.eval()
        trained = {n.removeprefix("base_model.model."): p for n, p in model.named_parameters() if p.requires_grad}
        for p in trained.values():
            p.grad = None
        total = 0.0
        for start in range(0, rows, s.micro):
            part = slice(start, min(rows, start + s.micro))
            loss = loss_fn(model, part) * ((part.stop - part.start) / rows)
            loss.backward()
            total += float(loss.detach())
        return total, torch.cat([trained[n].grad.reshape(-1) for n in sorted(trained)])

    def trl_loss(model, part):  # TRL's loss divides by the accumulation steps in train mode only (eval here)
        return trainer._compute_loss(model, {k: v[part] if isinstance(v, torch.Tensor) and v.dim() and len(v) == rows
                                             else v for k, v in b.items() if k != "rewards"})

    adv, _, _ = compute_advantages(spec, b["rewards"], mask, group_size=s.args.group)

    def tokenmdp_loss(model, part):
        lp, _ = sequence_logprobs(model, b["prompt_ids"][part], b["prompt_mask"][part], b["completion_ids"][part],
                                  mask[part])
        loss, _ = policy_loss(lp, lp.detach(), adv[part], mask[part], clip_low=spec.clip_low,
                              clip_high=spec.clip_high, aggregation=spec.aggregation)
        return loss

    trl_model = trainer.model  # TRL patched its forward (a fused head returning log_probs): the trained model,
    trl_model.load_state_dict(trl_run["initial"])  # reset to the initial weights
    l_trl, g_trl = grads_of(trl_loss, trl_model)
    mine = s.policy().model
    l_tm, g_tm = grads_of(tokenmdp_loss, mine.get_base_model() if s.real else mine)
    cos = float(torch.nn.functional.cosine_similarity(g_trl.double(), g_tm.double(), dim=0)) if signal else None
    which = "TRL's step-1 batch" if step == 1 else f"TRL's step-{step} batch (step 1's advantages were all 0)"
    if not signal:
        which = f"TRL's step-{step} batch (no step had a non-zero advantage: nothing to compare but zeros)"
    return {"batch": f"{which}: its samples, rewards and advantages", "batch_step": step, "rows": rows,
            "loss_trl": l_trl, "loss_tokenmdp": l_tm, "loss_diff": abs(l_trl - l_tm),
            "adv_max_diff": float((adv[:, 0] - b["advantages"]).abs().max()) if mask.shape[1] else 0.0,
            "grad_max_diff": float((g_trl - g_tm).abs().max()), "grad_max_abs": float(g_trl.abs().max()),
            "grad_rel_diff": float((g_trl - g_tm).norm() / g_trl.norm().clamp(min=1e-30)), "grad_cosine": cos}


__all__ = ["SUPPORTED_TRL", "compare_first_step", "release_memory", "require_trl", "run_trl", "token_counts"]
