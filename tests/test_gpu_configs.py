"""The GPU path rehearsed on the CPU: every `configs/gpu-*.yaml` trains for 2 steps, and the paper's GPU compare
presets (`paper-qwen*`) run as comparisons of 2 steps, through `tokenmdp train
--config ... --set ...` on a locally built stand-in of the same architecture (a tiny Qwen2 with a byte-level BPE
tokenizer trained here, so the BPE path of a real vocabulary runs too) on the local GSM8K, so that a config error
or a missing field fails here and not on a rented GPU.

What the overrides change and why: the model path (the stand-in), ``run.device=cpu`` and
``run.mixed_precision=no`` (no GPU), the engine when vLLM does not import (``hf``), the task's data folder (the
local copy), and the sizes (steps, prompts, lengths, batch sizes, evaluation), so that it takes seconds. Every
other field, the algorithm and its KL, the schedule, minibatching, checkpoints and trackers, is the config's own.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tokenmdp.cli import main
from tokenmdp.train.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("gpu-*.yaml"))


@pytest.fixture(scope="module")
def standin(tmp_path_factory, gsm8k_dir):
    """A 2-layer Qwen2 with a byte-level BPE tokenizer (512 tokens) trained on GSM8K questions, saved as a folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    lines = [json.loads(x)["question"] + " " + json.loads(x)["answer"]
             for x in (gsm8k_dir / "train.jsonl").read_text().splitlines()[:300]]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("standin")
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_gpu_config_runs_two_steps_on_a_cpu_standin(config, standin, gsm8k_dir, tmp_path, capsys):
    original = load_config(config)
    engine = original.rollout.engine if importlib.util.find_spec("vllm") else "hf"
    sets = [f"model.path={standin}", "run.device=cpu", "run.mixed_precision=no", f"rollout.engine={engine}",
            f"task.options={{data_dir: {gsm8k_dir}}}", "run.steps=2", "run.save_every=1", "run.eval_every=2",
            "run.eval_n=2", "run.eval_k=2", "rollout.prompts_per_step=2", "rollout.group_size=2",
            "rollout.max_new_tokens=16", "optim.minibatch_size=2", "optim.micro_batch_size=2", "run.threads=1"]
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--out", str(out), "--no-progress", "--json"]
    assert main(args + [x for s in sets for x in ("--set", s)]) == 0, capsys.readouterr().err
    saved = load_config(out / "config.yaml")
    assert saved.algo == original.algo and saved.optim.schedule == original.optim.schedule  # the config's own
    assert saved.run.report_to == original.run.report_to and saved.optim.lr == original.optim.lr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "eval/accuracy" in rows[-1]
    assert (out / "final" / "model.safetensors").is_file() and (out / "DONE").is_file()
    if original.algo.name == "grpo" and original.algo.overrides.get("kl_coef", 0.04) > 0:
        assert "policy/kl_ref" in rows[-1] or "policy/kl" in rows[-1] or any(k.startswith("kl/") for k in rows[-1])


PAPER = ["paper-qwen0.5b-gsm8k", "paper-qwen0.5b-countdown", "paper-qwen1.5b-gsm8k", "paper-qwen1.5b-countdown"]


@pytest.mark.parametrize("preset", PAPER)
def test_paper_presets_hold_the_papers_settings(preset):
    """64 prompts x 5 samples, temperature 0.6 (sampling and evaluation), lr 1e-6, 1024 new tokens, vLLM in bf16
    with TIS, GRPO with KL 0.001 (k3) and without, the three ISFT arms; Countdown adds the binary reward's arms."""
    from tokenmdp.experiments.compare import make_settings

    s = make_settings(preset)
    assert (s.prompts_per_step, s.group_size, s.lr, s.max_new_tokens, s.eval_temperature) == (64, 5, 1e-6, 1024, 0.6)
    assert s.engine == "vllm" and "rollout.temperature=0.6" in s.overrides and "run.device=cuda" in s.overrides
    assert {"grpo-kl", "grpo_nokl", "isft+", "isft+-", "isft-"} <= set(s.algos)
    assert s.arms["grpo-kl"] == {"algo": "grpo", "set": ["algo.kl_coef=0.001", "algo.kl_estimator=k3"]}
    assert s.model == ("Qwen/Qwen2.5-0.5B" if "0.5b" in preset else "Qwen/Qwen2.5-1.5B")
    if "countdown" in preset:
        assert s.arms["binary-grpo_nokl"]["set"] == ["task.options.rewards=[1.0, 0.0, 0.0]"]


@pytest.mark.parametrize("preset", PAPER[:2])
def test_paper_preset_rehearsed_on_the_cpu_standin(preset, standin, gsm8k_dir, tmp_path):
    """The 0.5B presets as comparisons of 2 steps on the stand-in: every arm trains with the preset's own algorithm,
    KL, temperature, TIS and schedule; only the device, the engine (hf, or vllm where it imports), the sizes and
    the data folder are changed. The binary arm's runs are rewarded 0 where TinyZero's give 0.1."""
    import yaml

    from tokenmdp.experiments.compare import compare

    engine = "vllm" if importlib.util.find_spec("vllm") else "hf"
    cpu = ["run.device=cpu", "run.mixed_precision=no", "rollout.engine_options={}", "run.save_every=0"]
    kw = {"task_kwargs": {"data_dir": str(gsm8k_dir)}} if "gsm8k" in preset else {}
    out = compare(None, 1, preset=preset, model=str(standin), out=tmp_path / "cmp", steps=2, prompts_per_step=2,
                  group_size=2, max_new_tokens=16, eval_n=2, k=2, eval_every=0, engine=engine, threads=1, workers=1,
                  overrides=cpu, **kw)
    for arm in (["grpo-kl", "grpo_nokl", "isft+", "isft+-", "isft-"] +
                (["binary-grpo_nokl", "binary-isft+-"] if "countdown" in preset else [])):
        run = out / "runs" / arm / "seed-0"
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["rollout"]["temperature"] == 0.6 and cfg["optim"]["lr"] == 1e-6, arm
        assert cfg["rollout"]["recompute_logprobs"] is True and (run / "eval.json").is_file(), arm
        if arm == "grpo-kl":
            assert cfg["algo"]["kl_coef"] == 0.001 and cfg["algo"]["kl_estimator"] == "k3"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2], arm
        if arm.startswith("binary-"):
            assert cfg["task"]["options"]["rewards"] == [1.0, 0.0, 0.0]
            assert all(r["reward/mean"] in (0.0, 0.25, 0.5, 0.75, 1.0) for r in rows)
    assert (out / "claims.json").is_file()
