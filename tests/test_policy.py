"""load_policy: local folders (char tokenizer kept intact), padding set-up, dtypes, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from tokenmdp.errors import TokenMDPError
from tokenmdp.policy import load_policy
from tokenmdp.policy.model import _is_char_tokenizer



def test_load_local_folder(tiny_random, tiny_random_dir):
    model, tok = tiny_random
    p = load_policy(tiny_random_dir)
    assert p.tokenizer.padding_side == "left"
    assert p.eos_token_id == tok.eos_token_id and p.pad_token_id == tok.pad_token_id
    assert not p.model.training and p.model.dtype == torch.float32
    text = "12 + 3 = 15\n<think> a b </think>"
    assert p.tokenizer.decode(p.tokenizer(text)["input_ids"]) == text  # spaces and newlines survive
    assert p.tokenizer(text)["input_ids"] == tok(text)["input_ids"]
    ids = torch.tensor([tok("hello")["input_ids"]])
    torch.testing.assert_close(p.model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert p.name == tiny_random_dir.name


def test_char_tokenizer_detection(tiny_random_dir, tmp_path):
    assert _is_char_tokenizer(tiny_random_dir)
    (tmp_path / "tokenmdp.json").write_text(json.dumps({"tokenizer": "char"}))
    assert _is_char_tokenizer(tmp_path)
    (tmp_path / "tokenmdp.json").write_text("{oops")
    with pytest.raises(TokenMDPError, match="tokenmdp.json"):
        _is_char_tokenizer(tmp_path)


def test_batch_left_padding(tiny_random_dir):
    p = load_policy(tiny_random_dir)
    enc = p.tokenizer(["a", "abc"], padding=True, return_tensors="pt")
    assert enc["attention_mask"].tolist() == [[0, 0, 1], [1, 1, 1]]
    assert enc["input_ids"][0, 0] == p.pad_token_id


def test_bfloat16(tiny_random_dir):
    p = load_policy(tiny_random_dir, dtype="bfloat16")
    assert p.model.dtype == torch.bfloat16


def test_pad_falls_back_to_eos(tiny_random_dir, tmp_path):
    from tokenmdp.policy.tiny import load_char_tokenizer

    tok = load_char_tokenizer(tiny_random_dir)
    tok.pad_token = None
    folder = tmp_path / "nopad"
    tok.save_pretrained(folder)
    for f in ("config.json", "model.safetensors"):
        (folder / f).write_bytes((tiny_random_dir / f).read_bytes())
    p = load_policy(folder)
    assert p.pad_token_id == p.eos_token_id == tok.eos_token_id


def test_errors(tmp_path, tiny_random_dir):
    with pytest.raises(TokenMDPError, match="model path not found: /no/such/model"):
        load_policy("/no/such/model")
    with pytest.raises(TokenMDPError, match="not a model folder"):
        load_policy(tmp_path)
    with pytest.raises(TokenMDPError, match="GGUF model file not found"):
        load_policy(tmp_path / "x.gguf")
    with pytest.raises(TokenMDPError, match="dtype"):
        load_policy(tiny_random_dir, dtype="float64")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(TokenMDPError, match=str(tmp_path)):
        load_policy(tmp_path)


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TokenMDPError, match="cannot load a causal LM from no-such-org/no-such-model"):
        load_policy("no-such-org/no-such-model")
