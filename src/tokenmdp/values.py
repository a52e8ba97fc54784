"""The one reader of values typed on a command line or in a config: ``--set key=value``, task options
(``-o key=value``, ``--task-arg``) and algorithm overrides all go through :func:`parse_value`.

A value is read as a YAML scalar or list (``true``, ``null``, ``[1, 0, 0]``, ``{a: 1}``), with one fix: YAML 1.1
reads ``3e-4`` (no dot in the mantissa) as a string, while a researcher means a number, so a string that Python
reads as a number becomes one (:func:`as_number`). An empty value is ``None``.
"""

from __future__ import annotations

from typing import Any

from tokenmdp.errors import TokenMDPError


def as_number(text: str) -> Any:
    """``"3e-4"`` -> ``0.0003``, ``"12"`` -> ``12``; any other string is returned unchanged."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_value(raw: str, *, where: str) -> Any:
    """``raw`` as YAML reads it (numbers fixed by :func:`as_number`); ``where`` names the option in errors."""
    import yaml

    if not raw.strip():
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise TokenMDPError(f"{where}: the value {raw!r} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return _numbers(value)


def _numbers(value: Any) -> Any:
    """:func:`as_number` on every string of a value, inside lists and mappings too (``{lr: 3e-4}``)."""
    if isinstance(value, str):
        return as_number(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    return value


def parse_assignment(item: str, *, option: str, example: str, identifier: bool = False) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, parsed value)``; ``option`` and ``example`` make the error message.

    ``identifier``: the key must be a Python identifier (a keyword argument), else any non-empty dotted name.
    """
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or (identifier and not key.isidentifier()):
        raise TokenMDPError(f"{option} {item!r}: expected key=value (a KEY=VALUE pair), for example {example}")
    return key, parse_value(raw, where=f"{option} {item!r}")


def parse_assignments(items: list[str] | None, *, option: str, example: str, identifier: bool = True) -> dict:
    """Several ``key=value`` items as a dict (a later item wins)."""
    return dict(parse_assignment(i, option=option, example=example, identifier=identifier) for i in items or [])


__all__ = ["as_number", "parse_assignment", "parse_assignments", "parse_value"]
