"""Shared fixtures: tiny models built locally (nothing is downloaded from a hub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tiny models run fastest on one thread: with torch's default on a small shared CPU, every small op stalls on
# thread hand-offs (measured: tests/test_rollout.py 124 s on 2 threads, 8 s on 1).
torch.set_num_threads(int(os.environ.get("TOKENMDP_TEST_THREADS", "1")))

REPO = Path(__file__).resolve().parents[1]
GSM8K_DIR = REPO.parent / "shared" / "data" / "gsm8k"


@pytest.fixture(scope="session")
def tiny_random():
    """A random tiny Qwen2 model (about 0.14 M parameters) and the character tokenizer."""
    from tokenmdp.policy.tiny import build_tiny_random

    return build_tiny_random(seed=0)


@pytest.fixture(scope="session")
def tiny_random_dir(tmp_path_factory, tiny_random):
    """The random tiny model saved as a Hugging Face folder (safetensors + tokenizer files)."""
    model, tokenizer = tiny_random
    path = tmp_path_factory.mktemp("tiny_random")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gsm8k_dir():
    if not ((GSM8K_DIR / "test.jsonl").exists() and (GSM8K_DIR / "train.jsonl").exists()):
        pytest.skip(f"GSM8K data not found at {GSM8K_DIR}")
    return GSM8K_DIR


@pytest.fixture
def grad_passes(monkeypatch):
    """The forward passes run with gradients on (the update's micro-batches, policy and critic alike), recorded
    at the Qwen2 backbone: one list of row lengths (the attention mask's sum per row) per pass. Sampling and the
    no-gradient scoring passes are not counted."""
    from transformers.models.qwen2 import modeling_qwen2

    passes: list[list[int]] = []
    real = modeling_qwen2.Qwen2Model.forward

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            ids = kwargs.get("input_ids", args[0] if args else None)
            if mask is not None:
                passes.append([int(n) for n in mask.sum(dim=1).tolist()])
            else:
                passes.append([int(ids.shape[1])] * int(ids.shape[0]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(modeling_qwen2.Qwen2Model, "forward", forward)
    return passes


def cut_count(lengths, size, max_tokens=None):
    """How many micro-batches ``optim.micro_batch_size`` / ``optim.micro_batch_tokens`` make of rows of these
    lengths, counted here by hand: longest rows first, each micro-batch at most ``size`` rows and at most
    ``max_tokens`` padded tokens (its rows x its longest row; a row over the budget alone)."""
    rows, count, i = sorted(lengths, reverse=True), 0, 0
    while i < len(rows):
        j = i + 1
        while j < len(rows) and j - i < size and (max_tokens is None or (j - i + 1) * rows[i] <= max_tokens):
            j += 1
        count, i = count + 1, j
    return count
