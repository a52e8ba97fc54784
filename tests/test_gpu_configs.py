"""The GPU path rehearsed on the CPU: every `configs/gpu-*.yaml` trains for 2 steps through `tokenmdp train
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
