"""The seams of the house: one reader of a model folder's metadata (the same defaults for train, compare and
eval), one value parser, the algorithm's derived choices on the spec, and the embedded base model handed to
`train` by the commands (honouring $TOKENMDP_CACHE)."""

from __future__ import annotations

import json
import shutil

import pytest

from tokenmdp.algos.presets import get_algo
from tokenmdp.errors import TokenMDPError
from tokenmdp.policy.model import DEFAULT_MAX_NEW_TOKENS, META_FILE, model_defaults, read_meta
from tokenmdp.train.config import load_config
from tokenmdp.train.heldout import resolve_eval_setup
from tokenmdp.train.setup import resolve_settings
from tokenmdp.values import parse_assignments, parse_value


def _with_meta(src, dst, meta: dict):
    shutil.copytree(src, dst)
    (dst / META_FILE).write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize("case", ["plain folder", "tokenmdp folder", "other task"])
def test_train_compare_and_eval_resolve_the_same_defaults(tmp_path, tiny_random_dir, case):
    """`train` (resolve_settings), `compare` and `eval` (resolve_eval_setup) fill open values identically: a plain
    Hugging Face folder falls back to 256 new tokens everywhere (was 256 under train, 128 under compare/eval)."""
    meta = {"tokenizer": "char", "task": "countdown", "task_kwargs": {"num_count": 3, "high": 10},
            "template": "compact", "max_new_tokens": 112}
    folder = tiny_random_dir if case == "plain folder" else _with_meta(tiny_random_dir, tmp_path / "m", meta)
    task = "gsm8k" if case == "other task" else "countdown"
    cfg = load_config(None, [f"model.path={folder}", f"task.name={task}"])
    train_side = resolve_settings(cfg)
    eval_side = resolve_eval_setup(str(folder), task)
    assert train_side.max_new_tokens == eval_side["max_new_tokens"]
    assert train_side.template == eval_side["template"] and train_side.task_options == eval_side["task_kwargs"]
    expected = {"plain folder": DEFAULT_MAX_NEW_TOKENS, "tokenmdp folder": 112, "other task": 112}[case]
    assert train_side.max_new_tokens == expected
    if case == "tokenmdp folder":
        assert train_side.template == "compact" and train_side.task_options == {"num_count": 3, "high": 10}
        assert train_side.meta_file == folder / META_FILE
    if case == "other task":  # the folder's task options and template are Countdown's: not carried over
        assert train_side.template is None and train_side.task_options == {}


def test_meta_reader_errors_name_the_file(tmp_path):
    assert read_meta(tmp_path, required=False) == {}
    with pytest.raises(TokenMDPError, match="tokenmdp.json not found"):
        read_meta(tmp_path)
    (tmp_path / META_FILE).write_text('{"task": "countdown",\n oops}')
    with pytest.raises(TokenMDPError, match=r"tokenmdp.json line 2: not valid JSON"):
        model_defaults(tmp_path)
    (tmp_path / META_FILE).write_text("[1, 2]")
    with pytest.raises(TokenMDPError, match="expected a JSON object"):
        read_meta(tmp_path)


def test_one_value_parser_everywhere():
    """`--set`, task options (-o, --task-arg) and algorithm overrides read '3e-4' as a number (YAML 1.1 alone
    reads it as a string) and lists as lists."""
    assert parse_value("3e-4", where="x") == pytest.approx(3e-4) and parse_value("[1, 0]", where="x") == [1, 0]
    assert parse_value("", where="x") is None and parse_value("hello", where="x") == "hello"
    cfg = load_config(None, ["optim.lr=3e-4", "task.options={lr_like: 3e-4}", "run.mixed_precision=no"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.run.mixed_precision == "no"  # YAML 1.1 reads `no` as false; the choice 'no' was meant
    assert cfg.task.options == {"lr_like": pytest.approx(3e-4)}  # inside a mapping too
    assert parse_assignments(["scale=3e-4"], option="task option", example="k=v") == {"scale": pytest.approx(3e-4)}
    assert get_algo("grpo", kl_coef="3e-4").kl_coef == pytest.approx(3e-4)
    assert get_algo("grpo", max_len="none").max_len is None and get_algo("grpo", max_len="64").max_len == 64
    with pytest.raises(TokenMDPError, match=r"task option 'bad': expected key=value"):
        parse_assignments(["bad"], option="task option", example="k=v")
    with pytest.raises(TokenMDPError, match=r"--set 'optim.lr=\[': the value '\[' is not valid YAML"):
        load_config(None, ["optim.lr=["])


@pytest.mark.parametrize("name, kl_in_reward, loss_kl, divisor", [
    ("grpo", False, 0.04, 100), ("grpo_nokl", False, 0.0, 100), ("ppo", True, 0.0, 100),
    ("dr_grpo", False, 0.0, 100), ("isft+", False, 0.0, 100)])
def test_spec_derived_choices(name, kl_in_reward, loss_kl, divisor):
    spec = get_algo(name)
    assert spec.kl_in_reward is kl_in_reward and spec.loss_kl_coef == loss_kl
    assert spec.divisor(100) == divisor and get_algo(name, max_len=7).divisor(100) == 7
    assert spec.credit_kwargs == {} and get_algo("reinforce", credit="discounted", credit_gamma=0.5).credit_kwargs \
        == {"gamma": 0.5}
    assert get_algo("dpo").trains_on_pairs("pairs.jsonl") and not get_algo("dpo").trains_on_pairs(None)
    assert not spec.trains_on_pairs("pairs.jsonl")


def test_train_is_handed_a_model_path():
    from tokenmdp.train.setup import resolve_model_path

    with pytest.raises(TokenMDPError, match="config field 'model.path' is empty"):
        resolve_model_path(load_config(None, []))


def test_train_command_fills_in_the_embedded_base_from_tokenmdp_cache(tmp_path, tiny_random_dir, monkeypatch):
    """`tokenmdp train` with no model path uses $TOKENMDP_CACHE like demo, compare and eval (it used to build a
    second base model in ~/.cache/tokenmdp); the shipped copy wins when it is current."""
    from tokenmdp.base import store
    from tokenmdp.commands.train import _config

    cache = tmp_path / "cache"
    meta = {"tokenizer": "char", "task": "countdown", "task_kwargs": {"template": "compact", **store.BASE_TASK_KWARGS},
            "template": "compact", "max_new_tokens": 112, "pretrain": {"settings": dict(store.BASE_SETTINGS)}}
    _with_meta(tiny_random_dir, cache / store.BASE_NAME, meta)
    monkeypatch.setenv("TOKENMDP_CACHE", str(cache))
    monkeypatch.setattr(store, "SHIPPED", tmp_path / "not-shipped")
    cfg = _config(None, "grpo", [], tmp_path / "run", False, False, 1, 0)
    assert cfg.model.path == str(cache / store.BASE_NAME)
    monkeypatch.setattr(store, "SHIPPED", cache / store.BASE_NAME)  # a current shipped copy is used as it is
    assert store.ensure_tiny_base() == cache / store.BASE_NAME
