"""The one coercer of settings: a mapping checked against a dataclass's type hints, field by field.

Every setting a user types goes through here, whatever its section: the training config
(:class:`tokenmdp.train.config.TrainConfig`, nested dataclasses) and the algorithm's choices
(:class:`tokenmdp.algos.presets.AlgoSpec`). Choices are ``Literal`` types, so the allowed values live in the types
and nowhere else. A wrong name or value raises one :class:`~tokenmdp.errors.TokenMDPError` that names the field
(``config field 'optim.lr'``) and where it came from (a file, ``--set``).

Strings (a command line) are read as YAML scalars first (:func:`tokenmdp.values.parse_value`: ``"3e-4"``,
``"true"``, ``"none"``); integral floats are accepted for integer fields (YAML's ``2.0``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from tokenmdp.errors import TokenMDPError
from tokenmdp.values import parse_value

_EXPECTED = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping",
             list: "a list"}
_YAML_BOOL = {False: ("no", "false", "off", "n"), True: ("yes", "true", "on", "y")}


@dataclasses.dataclass(frozen=True)
class Where:
    """How errors name a field: ``label`` (``config field``, ``algo field``) and the ``source`` (a file)."""

    label: str = "config field"
    source: str | None = None

    def __call__(self, name: str) -> str:
        return f"{self.label} {name!r}" + (f" in {self.source}" if self.source else "")


def literal_choices(hint: Any) -> tuple:
    """The allowed values of a ``Literal`` hint (optionally inside ``X | None``); ``()`` for any other hint."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if typing.get_origin(arg) is Literal:
                return typing.get_args(arg)
    return ()


def hints(cls: type) -> dict[str, Any]:
    """The resolved type hint of every field of the dataclass ``cls``."""
    return typing.get_type_hints(cls)


def coerce(value: Any, hint: Any, name: str, where: Where) -> Any:
    """``value`` checked against the type ``hint`` and converted (a string parsed, int -> float, a nested
    dataclass built by :func:`build`); ``name`` is the field's dotted name."""
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where, prefix=name + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(value, str) and hint is not str and str not in args and origin is not Literal \
            and value not in literal_choices(hint):  # a choice of a Literal in a union is kept as written
        value = None if value.strip().lower() in ("none", "null") else parse_value(value, where=where(name))
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, name, where)
            except TokenMDPError as exc:  # a list's error first when a list was given (it names the item)
                errors.insert(0 if isinstance(value, list) and typing.get_origin(arg) is list else len(errors),
                              str(exc))
        raise TokenMDPError(errors[0])
    if origin is list and args:  # list[X]: every item checked against X, named by its index
        if not isinstance(value, list):
            raise TokenMDPError(f"{where(name)} must be a list, got {value!r}")
        return [coerce(item, args[0], f"{name}[{i}]", where) for i, item in enumerate(value)]
    if origin is Literal:
        if isinstance(value, bool) and all(isinstance(a, str) for a in args):  # YAML 1.1 reads `no` / `off` as
            value = next((w for w in _YAML_BOOL[value] if w in args), value)  # false: the word was meant
        if value not in args:
            raise TokenMDPError(f"{where(name)} is {value!r}; choose one of {', '.join(repr(a) for a in args)}")
        return value
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool)
        or (isinstance(value, float) and value.is_integer()),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        bool: isinstance(value, bool) or (type(value) is int and value in (0, 1)),
        dict: isinstance(value, dict),
        list: isinstance(value, list),
    }.get(hint, True)
    if not ok:
        raise TokenMDPError(f"{where(name)} must be {_EXPECTED[hint]}, got {value!r}")
    if hint in (int, float, bool):
        return hint(value)
    return value


def check_fields(cls: type, data: dict, where: Where, *, prefix: str = "", renamed: dict | None = None) -> dict:
    """``data`` with every key a field of ``cls`` and every value coerced to its hint (the one unknown-field
    check); ``renamed`` maps old field names to new ones for a clearer error."""
    known = hints(cls)
    out = {}
    for key, value in data.items():
        if key not in known:
            hint = f" (renamed to {prefix}{renamed[key]!r})" if renamed and key in renamed else ""
            raise TokenMDPError(f"unknown {where(prefix + str(key))}{hint}; expected one of: "
                                f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        out[key] = coerce(value, known[key], prefix + key, where)
    return out


def build(cls: type, data: Any, where: Where, *, prefix: str = "") -> Any:
    """An instance of the dataclass ``cls`` from the mapping ``data`` (None: the defaults), checked by
    :func:`check_fields`; nested dataclass fields are built from nested mappings."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        section = prefix.rstrip(".") or "<root>"
        raise TokenMDPError(f"config section {section!r}" + (f" in {where.source}" if where.source else "")
                            + " must be a mapping")
    return cls(**check_fields(cls, data, where, prefix=prefix))


__all__ = ["Where", "build", "check_fields", "coerce", "hints", "literal_choices"]
