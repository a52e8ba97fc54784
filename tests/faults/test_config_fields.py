"""Every config field, by construction: for each field of the training config (and each algorithm field), a value
of the wrong type, and for the fields with a range a value outside it, and an unknown name in every section, each
give one TokenMDPError naming the field. A field added later is covered without a new test."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from tokenmdp.algos.presets import AlgoSpec, get_algo
from tokenmdp.errors import TokenMDPError
from tokenmdp.train.config import SECTIONS, TrainConfig, load_config

WRONG = {int: "[1, 2]", float: "not-a-number", bool: "maybe", str: "[1, 2]", dict: "just-text", list: "3"}


def _base_type(hint):
    if typing.get_origin(hint) is typing.Literal:
        return "literal"
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return _base_type(args[0]) if args else hint


def _walk(cls, prefix: str):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):  # a nested section (model.lora): its fields one by one
            yield from _walk(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", _base_type(hints[f.name])


def _fields():
    hints = typing.get_type_hints(TrainConfig)
    for section in SECTIONS:
        if section != "algo":
            yield from _walk(hints[section], f"{section}.")


CASES = [(name, kind) for name, kind in _fields()]


@pytest.mark.parametrize("name, kind", CASES, ids=[c[0] for c in CASES])
def test_a_wrong_type_names_the_field(name, kind):
    value = "no-such-choice" if kind == "literal" else WRONG.get(kind)
    if value is None:
        pytest.skip(f"{name}: no wrong value for {kind}")
    with pytest.raises(TokenMDPError) as err:
        load_config(None, [f"{name}={value}"])
    assert repr(name) in str(err.value) or name in str(err.value), str(err.value)


RANGED = ["rollout.prompts_per_step", "rollout.group_size", "optim.micro_batch_size", "run.steps", "run.keep_last",
          "run.eval_k", "rollout.temperature", "optim.lr", "optim.warmup_steps", "run.save_every", "run.eval_every",
          "run.eval_n", "optim.max_nonfinite_steps", "rollout.max_new_tokens", "run.threads",
          "optim.minibatch_size", "optim.micro_batch_tokens", "rollout.max_staleness", "model.lora.rank",
          "model.lora.alpha", "model.lora.dropout"]


@pytest.mark.parametrize("name", RANGED)
def test_out_of_range_names_the_field(name):
    with pytest.raises(TokenMDPError, match=rf"config field '{name}'.* must be"):
        load_config(None, [f"{name}=-1"])


@pytest.mark.parametrize("section", [s for s in SECTIONS if s != "algo"])
def test_an_unknown_name_names_the_field(section):
    with pytest.raises(TokenMDPError, match=rf"unknown config field '{section}.no_such_field'"):
        load_config(None, [f"{section}.no_such_field=1"])


ALGO_FIELDS = [f for f in dataclasses.fields(AlgoSpec) if f.name not in ("name", "description")]


@pytest.mark.parametrize("field", ALGO_FIELDS, ids=[f.name for f in ALGO_FIELDS])
def test_every_algorithm_field_checks_its_type(field):
    base = str(field.type).split("|")[0].strip()
    wrong = {"int": "1.5", "float": "abc", "bool": "maybe", "str": 3}.get(base)
    with pytest.raises(TokenMDPError, match=rf"algo field '{field.name}'"):
        get_algo("grpo", **{field.name: wrong})


def test_an_unknown_algorithm_field_names_it():
    with pytest.raises(TokenMDPError, match="unknown algo field 'no_such_field'"):
        get_algo("grpo", no_such_field=1)
    with pytest.raises(TokenMDPError, match="no_such_field"):
        load_config(None, ["algo.no_such_field=1"])


def _compare_fields():
    from tokenmdp.experiments.compare.settings import CompareSettings

    return [f.name for f in dataclasses.fields(CompareSettings)]


@pytest.mark.parametrize("name", _compare_fields())
def test_every_compare_option_checks_its_value(name):
    """Each option of `tokenmdp compare` (CompareSettings), a wrong type and (where it has one) a value out of
    range: one TokenMDPError naming the option; never a TypeError from deep inside."""
    from tokenmdp.experiments.compare import make_settings

    checked = 0
    for bad in (-1, [1], {"a": 1}, "abc"):
        try:
            make_settings(None, **{name: bad})
        except TokenMDPError as exc:
            checked += 1
            assert name.replace("_", "-") in str(exc) or name in str(exc), str(exc)
    free_text = {"model", "task", "template", "cache_dir"}  # checked where they are used (paths, task names)
    assert checked >= (1 if name in free_text else 2), name
