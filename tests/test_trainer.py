"""The trainer on a locally built random tiny model: every preset trains and moves every parameter (PPO's critic
too); micro-batch accumulation equals the full batch; resume gives identical parameters; the run folder is never
overwritten silently and a failed run never looks finished; the prompt stream is a function of the seed only."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tokenmdp.algos.presets import PRESETS
from tokenmdp.errors import TokenMDPError
from tokenmdp.tasks.task import Problem, Score, Task
from tokenmdp.tasks.registry import register_task
from tokenmdp.train.config import load_config
from tokenmdp.train.data import prompt_stream
from tokenmdp.train.trainer import train


class ParityTask(Task):
    """A task whose verifier a random model passes about half of the time: the first character of the completion
    has an even code point. Groups are then mixed, so every algorithm gets a learning signal."""

    name = "parity"
    templates = ("plain",)

    def __init__(self, size: int = 1000):
        self.size = size

    def problems(self, split="train", n=None, seed=0):
        g = torch.Generator().manual_seed(seed * 2 + (split == "test"))
        n = self.size if n is None else min(n, self.size)
        nums = torch.randint(0, 1000, (n,), generator=g).tolist()
        return [Problem(id=f"{split}-{i}", question=f"{x}", answer=None) for i, x in enumerate(nums)]

    def render(self, problem, template=None):
        return f"n={problem.question}:"

    def score(self, problem, completion):
        ok = bool(completion) and ord(completion[0]) % 2 == 0
        return Score(reward=1.0 if ok else 0.0, correct=ok, formatted=True, reason="parity")


register_task("parity", ParityTask)

SMALL = ["task.name=parity", "rollout.prompts_per_step=2", "rollout.group_size=4",
         "rollout.max_new_tokens=6", "run.steps=2", "run.save_every=0", "optim.lr=1e-3", "run.threads=1"]


def _cfg(tmp_path, model_dir, algo: str, *extra: str, name: str | None = None):
    out = tmp_path / (name or algo)
    return load_config(None, [f"model.path={model_dir}", f"algo.name={algo}", f"run.out={out}", *SMALL, *extra])


def _params(folder):
    return load_file(str(folder / "model.safetensors"))


class Crash(Exception):
    """Raised by :func:`crash_at` to stop a run between a step's metrics and its checkpoint."""


def crash_at(config, step: int) -> None:
    """Train ``config`` and crash at the end of step ``step`` (after its metrics, before its checkpoint)."""

    def crash(done, record, c):
        if done == step:
            raise Crash

    with pytest.raises(Crash):
        train(config, progress=False, callbacks=[crash])


@pytest.mark.parametrize("algo", list(PRESETS))
def test_every_preset_moves_every_parameter(tmp_path, tiny_random_dir, algo):
    extra = ["algo.overlong_buffer=2"] if PRESETS[algo].overlong_buffer else []
    run = train(_cfg(tmp_path, tiny_random_dir, algo, *extra), progress=False)
    before, after = _params(tiny_random_dir), _params(run / "final")
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == [], f"{algo} left {unchanged} unchanged"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["update/rows"] > 0 for r in records)
    for key in ("reward/mean", "reward/accuracy", "length/mean", "policy/entropy", "time/rollout", "time/update", "lr"):
        assert records[0][key] is not None, key
    if PRESETS[algo].kind == "pg" and PRESETS[algo].epochs == 1:
        assert abs(records[0]["policy/approx_kl"]) < 1e-5  # one on-policy update: the ratio is 1
    if PRESETS[algo].critic:
        from tokenmdp.policy.value_head import ValueModel

        initial = ValueModel.from_policy(str(tiny_random_dir), seed=0).state_dict()
        trained = torch.load(run / "checkpoints" / "step-2" / "critic.pt")
        assert [k for k in initial if torch.equal(initial[k], trained[k])] == []
        assert "value/loss" in records[0] and "value/explained_variance" in records[0]
    assert (run / "DONE").is_file() and (run / "final" / "tokenizer.json").is_file()
    samples = pd.read_parquet(run / "samples.parquet")
    assert len(samples) == 2 * 2 * 4 and set(samples["algo"]) == {algo}
    assert samples.groupby("step")["group"].nunique().tolist() == [2, 2]


def _components(tmp_path, model_dir, algo, *extra):
    """``(learner, algorithm, rollouts)`` of a step built by hand."""
    from tokenmdp.train.trainer import build_step

    cfg = _cfg(tmp_path, model_dir, algo, "rollout.prompts_per_step=3", "rollout.max_new_tokens=8", *extra)
    return build_step(cfg, tmp_path / "unused")


@pytest.mark.parametrize("algo", ["grpo", "bnpo", "dr_grpo", "ppo", "isft+", "isft+-adv", "dpo"])
def test_micro_batches_accumulate_to_the_full_batch(tmp_path, tiny_random_dir, algo, grad_passes):
    """One step with micro-batches of 2 rows moves the parameters as the whole batch in one pass does (plain SGD,
    so the parameter change is the accumulated gradient itself); and the setting did cut: the step with 2 rows a
    pass runs, for each pass of the whole batch, ceil(its rows / 2) passes of at most 2 rows."""
    from tokenmdp.train.trainer import run_step

    problems = ParityTask().problems("train", n=3, seed=5)
    results, passes = [], {}
    for micro in (64, 2):
        # one inner epoch: with epochs = 2 the second epoch starts from parameters moved by SGD at lr 1, which
        # amplifies float round-off of the first past any tolerance
        learner, algorithm, rollouts = _components(tmp_path, tiny_random_dir, algo, f"optim.micro_batch_size={micro}",
                                                   "optim.max_grad_norm=null", "algo.epochs=1")
        learner.optimizer = torch.optim.SGD(learner.model.parameters(), lr=1.0)
        learner.scheduler = torch.optim.lr_scheduler.LambdaLR(learner.optimizer, lambda s: 1.0)
        if learner.critic is not None:
            learner.critic_optimizer = torch.optim.SGD(learner.critic.parameters(), lr=1.0)
        batch = rollouts.collect(problems, step=1)
        assert 0 < float(batch.correct.float().mean()) < 1
        start = {k: v.detach().clone() for k, v in learner.model.state_dict().items()}
        grad_passes.clear()
        run_step(learner, algorithm, rollouts, problems, 1)
        passes[micro] = [len(p) for p in grad_passes]
        results.append({k: v.detach() - start[k] for k, v in learner.model.state_dict().items()})
    assert max(float(d.abs().max()) for d in results[0].values()) > 1e-4  # the step did move the model
    assert passes[64] and max(passes[64]) > 2, passes  # a pass of the whole batch (at most 12 rows: 64 holds it)
    assert len(passes[2]) == sum(-(-n // 2) for n in passes[64]) and max(passes[2]) <= 2, passes
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=1e-4, atol=1e-7, msg=key)


@pytest.mark.parametrize("algo", ["grpo", "dr_grpo", "rloo", "bnpo"])
def test_skipping_zero_advantage_rows_gives_the_same_update(tmp_path, tiny_random_dir, algo):
    """Rows of a group with equal rewards have advantage 0 and skip the forward/backward; the AdamW step (two
    steps, so the moments matter) equals the one that runs them. With a KL term in the loss nothing is skipped."""
    problems = ParityTask().problems("train", n=3, seed=5)
    results, skipped = {}, {}
    for skip in (False, True):
        learner, algorithm, rollouts = _components(tmp_path, tiny_random_dir, algo, "algo.kl_coef=0",
                                                   "optim.micro_batch_size=2", "optim.max_grad_norm=null",
                                                   f"optim.skip_zero_advantage={str(skip).lower()}")
        start = {k: v.detach().clone() for k, v in learner.model.state_dict().items()}
        for step in (1, 2):
            batch = rollouts.collect(problems, step=step)
            batch.rewards[:4] = 1.0  # the first group: all right (advantage 0)
            batch.rewards[4:8] = torch.tensor([1.0, 0.0, 0.0, 1.0])  # the second: mixed
            metrics = algorithm.update(learner, batch, step=step)
            skipped[skip] = metrics["update/skipped_rows"]
        results[skip] = {k: v.detach() - start[k] for k, v in learner.model.state_dict().items()}
    assert skipped[False] == 0 and skipped[True] >= 4
    assert max(float(d.abs().max()) for d in results[False].values()) > 1e-5
    for key in results[False]:
        torch.testing.assert_close(results[True][key], results[False][key], rtol=1e-4, atol=1e-6, msg=key)
    learner, algorithm, rollouts = _components(tmp_path, tiny_random_dir, "grpo", "algo.kl_coef=0.04")
    batch = rollouts.collect(problems, step=1)
    batch.rewards[:4] = 1.0
    assert algorithm.update(learner, batch, step=1)["update/skipped_rows"] == 0


def test_resume_gives_identical_parameters(tmp_path, tiny_random_dir):
    """4 steps straight == 2 steps, a crash during step 3, and a resume from the step-2 checkpoint."""
    extra = ("run.steps=4", "optim.minibatch_size=4", "algo.epochs=2", "algo.kl_coef=0.05")
    straight = train(_cfg(tmp_path, tiny_random_dir, "grpo", *extra, name="straight"), progress=False)

    cfg = _cfg(tmp_path, tiny_random_dir, "grpo", *extra, "run.save_every=2", name="resumed")
    crash_at(cfg, 3)
    run = cfg.run_dir()
    assert not (run / "DONE").exists() and not (run / "final").exists()
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    train(cfg, resume=True, progress=False)
    a, b = _params(straight / "final"), _params(run / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    first = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [m["reward/mean"] for m in metrics] == [m["reward/mean"] for m in first]
    assert len(pd.read_parquet(run / "samples.parquet")) == len(pd.read_parquet(straight / "samples.parquet"))
    # a finished run resumes to nothing; more steps extend it from its last checkpoint
    assert train(cfg, resume=True, progress=False) == run
    longer = load_config(None, [f"model.path={tiny_random_dir}", "algo.name=grpo", f"run.out={run}", *SMALL, *extra,
                                "run.save_every=2", "run.steps=5"])
    train(longer, resume=True, progress=False)
    assert json.loads((run / "DONE").read_text())["steps"] == 5


def test_extending_a_run_equals_the_longer_run(tmp_path, tiny_random_dir):
    """A finished 2-step run extended to 4 steps by a resume ends with the parameters of a 4-step run, also on a
    split of 5 problems, which the 2-step run (4 prompts) fits in and the 4-step run (8 prompts) cycles through."""
    extra = ("task.options.size=5", "algo.kl_coef=0")
    straight = train(_cfg(tmp_path, tiny_random_dir, "grpo", *extra, "run.steps=4", name="straight"), progress=False)
    short = _cfg(tmp_path, tiny_random_dir, "grpo", *extra, "run.steps=2", name="extended")
    run = train(short, progress=False)
    longer = _cfg(tmp_path, tiny_random_dir, "grpo", *extra, "run.steps=4", name="extended")
    assert train(longer, resume=True, progress=False) == run
    a, b = _params(straight / "final"), _params(run / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    prompts = [pd.read_parquet(r / "samples.parquet").groupby("step")["prompt"].apply(list).tolist()
               for r in (straight, run)]
    assert prompts[0] == prompts[1]


def test_resume_refuses_a_different_config(tmp_path, tiny_random_dir):
    cfg = _cfg(tmp_path, tiny_random_dir, "isft+", "run.steps=1")
    train(cfg, progress=False)
    other = _cfg(tmp_path, tiny_random_dir, "isft+", "run.steps=1", "optim.lr=0.5", name="isft+")
    with pytest.raises(TokenMDPError, match="'optim.lr'"):
        train(other, resume=True, progress=False)
    with pytest.raises(TokenMDPError, match="no such run folder"):
        train(_cfg(tmp_path, tiny_random_dir, "isft+", name="nothing"), resume=True, progress=False)


def test_existing_folder_is_never_overwritten_and_bad_input_leaves_nothing(tmp_path, tiny_random_dir):
    cfg = _cfg(tmp_path, tiny_random_dir, "isft+", "run.steps=1")
    run = train(cfg, progress=False)
    stamp = (run / "DONE").read_text()
    with pytest.raises(TokenMDPError, match="already exists"):
        train(cfg, progress=False)
    bad = _cfg(tmp_path, tiny_random_dir, "isft+", "run.steps=1", "run.overwrite=true",
               f"model.path={tmp_path / 'no-such-model'}", name="isft+")
    with pytest.raises(TokenMDPError):
        train(bad, progress=False)
    assert (run / "DONE").read_text() == stamp  # the finished run is untouched
    precious = tmp_path / "precious"
    (precious / "notes").mkdir(parents=True)
    with pytest.raises(TokenMDPError, match="not a run folder"):
        train(_cfg(tmp_path, tiny_random_dir, "isft+", "run.overwrite=true", name="precious"), progress=False)
    assert (precious / "notes").is_dir()
    with pytest.raises(TokenMDPError):
        train(_cfg(tmp_path, tiny_random_dir, "isft+", "task.options={nope: 1}", name="fresh"), progress=False)
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(TokenMDPError, match="rollout.group_size must be at least 2"):
        train(_cfg(tmp_path, tiny_random_dir, "grpo", "rollout.group_size=1", name="fresh"), progress=False)
    with pytest.raises(TokenMDPError, match="'algo.overlong_buffer' is 16, more than rollout.max_new_tokens = 6"):
        train(_cfg(tmp_path, tiny_random_dir, "dapo", name="fresh"), progress=False)
    assert not (tmp_path / "fresh").exists()


def test_prompt_stream_is_a_function_of_the_seed_only(tmp_path, tiny_random_dir):
    task = ParityTask()
    a = prompt_stream(task, seed=3, steps=4, prompts_per_step=5)
    assert [len(s) for s in a] == [5] * 4
    assert a == prompt_stream(task, seed=3, steps=4, prompts_per_step=5)
    assert a[:2] == prompt_stream(task, seed=3, steps=2, prompts_per_step=5)
    assert a != prompt_stream(task, seed=4, steps=4, prompts_per_step=5)
    small = ParityTask(size=7)  # a finite data set is cycled through seeded permutations
    cycled = [p.id for step in prompt_stream(small, seed=1, steps=3, prompts_per_step=5) for p in step]
    assert sorted(cycled[:7]) == sorted(p.id for p in small.problems("train", seed=1))
    assert len(cycled) == 15 and sorted(set(cycled)) == sorted(cycled[:7])
    assert cycled[:7] == [p.id for p in small.problems("train", seed=1)]  # epoch 0 in the task's order
    assert cycled[7:14] != cycled[:7] and sorted(cycled[7:14]) == sorted(cycled[:7])  # epoch 1 a permutation
    # prefix-stable across run lengths, whether the run fits in the split (5 < 7) or cycles it (15, 35 > 7)
    for steps in (1, 3, 7):
        longer = prompt_stream(small, seed=1, steps=steps, prompts_per_step=5)
        assert longer[:1] == prompt_stream(small, seed=1, steps=1, prompts_per_step=5)
        assert longer[: min(steps, 3)] == prompt_stream(small, seed=1, steps=3, prompts_per_step=5)[: min(steps, 3)]
    # two algorithms trained with the same seed saw the same prompts, step by step
    runs = [train(_cfg(tmp_path, tiny_random_dir, algo, "run.steps=2"), progress=False) for algo in ("rloo", "isft-")]
    prompts = [pd.read_parquet(r / "samples.parquet").groupby("step")["prompt"].apply(list).tolist() for r in runs]
    assert prompts[0] == prompts[1]


def test_offline_dpo_pairs_and_bad_lines(tmp_path, tiny_random_dir):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"n={i}:", "chosen": "ab", "rejected": "xyz"}) for i in range(5)))
    run = train(_cfg(tmp_path, tiny_random_dir, "dpo", f"task.dpo_data={data}", "run.kl_to_base=true"),
                progress=False)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert "policy/kl_base" not in records[0]  # no sampler offline: run.kl_to_base has nothing to measure
    assert records[0]["dpo/pairs"] == 2 and records[0]["dpo/loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2 at start
    assert records[1]["dpo/margin"] > 0  # the first step moved the policy toward the chosen responses
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(TokenMDPError, match=r"pairs.jsonl:2: missing field 'rejected'"):
        train(_cfg(tmp_path, tiny_random_dir, "dpo", f"task.dpo_data={data}", name="bad"), progress=False)


def test_periodic_eval_and_equivalence_metrics(tmp_path, tiny_random_dir):
    cfg = _cfg(tmp_path, tiny_random_dir, "grpo", "algo.kl_coef=0", "run.equivalence=true", "run.eval_every=2",
               "run.eval_n=4", "run.eval_k=2")
    run = train(cfg, progress=False)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["equiv/cosine_on_policy"] > 0.9999 and records[0]["equiv/cosine"] > 0.9999
    assert "eval/accuracy" not in records[0]
    assert 0.0 <= records[1]["eval/accuracy"] <= 1.0 and 0.0 <= records[1]["eval/sampled_accuracy"] <= 1.0
    # the values themselves: the final model (step 2) on the same held-out problems, rescored by the verifier
    greedy, sampled, pass_k = _heldout_by_hand(run / "final", n=4, k=2)
    assert records[1]["eval/accuracy"] == records[1]["eval/greedy_accuracy"] == pytest.approx(greedy)
    assert records[1]["eval/sampled_accuracy"] == pytest.approx(sampled)
    assert records[1]["eval/pass@k"] == pytest.approx(pass_k)


def _heldout_by_hand(folder, *, n, k, seed=0):
    """Greedy accuracy, sampled accuracy and pass@k of the model in ``folder`` on the first ``n`` held-out parity
    problems (split test, seed 0), ``k`` samples each with the evaluation's seed (``run.seed * 1000 + 17``), every
    completion scored again here by the task's verifier."""
    from tokenmdp.policy.model import load_policy
    from tokenmdp.train.heldout import evaluate

    task, policy = ParityTask(), load_policy(str(folder))
    problems = task.problems("test", n=n, seed=0)
    records = evaluate(policy.model, policy.tokenizer, task, problems, k=k, max_new_tokens=6, greedy=True,
                       seed=seed * 1000 + 17, temperature=1.0)["records"]
    assert [r["id"] for r in records] == [p.id for p in problems]
    greedy = [task.score(p, r["greedy"]["completion"]).correct for p, r in zip(problems, records)]
    sampled = [[task.score(p, s["completion"]).correct for s in r["samples"]] for p, r in zip(problems, records)]
    assert all(len(s) == k for s in sampled)
    return (sum(greedy) / n, sum(sum(s) / k for s in sampled) / n,
            sum(any(s) for s in sampled) / n)  # pass@k with n = k samples: some sample correct


def test_eval_before_logs_the_start_policy_and_changes_nothing_else(tmp_path, tiny_random_dir):
    """run.eval_before (verl's val_before_train): the held-out curve starts at step 0, and the run's parameters are
    those of a run without it (the evaluation draws from its own seeded generator)."""
    extra = ["run.eval_every=2", "run.eval_n=4", "run.eval_k=2"]
    plain = train(_cfg(tmp_path, tiny_random_dir, "grpo_nokl", *extra, name="plain"), progress=False)
    before = train(_cfg(tmp_path, tiny_random_dir, "grpo_nokl", *extra, "run.eval_before=true", name="before"),
                   progress=False)
    rows = [json.loads(x) for x in (before / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and 0.0 <= rows[0]["eval/accuracy"] <= 1.0
    greedy, sampled, _ = _heldout_by_hand(tiny_random_dir, n=4, k=2)  # step 0: the start model's own figures
    assert rows[0]["eval/accuracy"] == pytest.approx(greedy)
    assert rows[0]["eval/sampled_accuracy"] == pytest.approx(sampled)
    a, b = _params(plain / "final"), _params(before / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_later_optimizer_steps_on_a_batch_leave_the_sft_direction(tmp_path, tiny_random_dir):
    """C1's boundary: before the batch's first optimizer step GRPO's gradient is weighted SFT's (cosine 1 up to
    rounding); before each later step on the same batch the policy has moved off the sampler, the ratio leaves 1,
    and the cosine falls (``equiv/cosine_later_*``, over the batch's 4 steps)."""
    rows = 2 * 4  # SMALL's prompts x samples
    cfg = _cfg(tmp_path, tiny_random_dir, "grpo_nokl", "run.equivalence=true", f"optim.minibatch_size={rows // 4}",
               "optim.lr=0.05")
    run = train(cfg, progress=False)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert r["equiv/cosine"] > 1 - 1e-9 and r["equiv/optimizer_steps"] == 4.0
        assert r["equiv/cosine_later_min"] <= r["equiv/cosine_later_mean"] < 1 - 1e-6
    one = train(_cfg(tmp_path, tiny_random_dir, "grpo_nokl", "run.equivalence=true", name="one"), progress=False)
    assert "equiv/cosine_later_mean" not in json.loads((one / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("algo", ["isft-", "grpo"])
def test_kl_to_base_logs_the_drift_and_changes_nothing_else(tmp_path, tiny_random_dir, algo):
    """run.kl_to_base: at step 1 the sampler is the base (KL 0 up to float rounding); after an update it is not
    (the k3 estimate, never negative, is above 0); the parameters are a run's without it, whether the algorithm
    has a reference of its own (grpo, KL 0.04) or not (isft-)."""
    extra = ["run.steps=3", "optim.lr=0.05"]
    plain = train(_cfg(tmp_path, tiny_random_dir, algo, *extra, name="plain"), progress=False)
    kl = train(_cfg(tmp_path, tiny_random_dir, algo, *extra, "run.kl_to_base=true", name="kl"), progress=False)
    rows = [json.loads(x) for x in (kl / "metrics.jsonl").read_text().splitlines()]
    assert abs(rows[0]["policy/kl_base"]) < 1e-5 and 0 <= rows[0]["policy/kl_base_k3"] < 1e-6
    assert rows[2]["policy/kl_base_k3"] > 1e-4 and rows[2]["policy/kl_base"] > 1e-4
    plain_rows = [json.loads(x) for x in (plain / "metrics.jsonl").read_text().splitlines()]
    assert "policy/kl_base" not in plain_rows[0]
    a, b = _params(plain / "final"), _params(kl / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
