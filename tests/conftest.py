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
