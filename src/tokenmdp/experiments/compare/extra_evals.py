"""A comparison's extra held-out evaluations (``--extra-evals``): every final model and the base evaluated again
under other settings beside the main evaluation, so a reader sees which evaluation choice moves a verdict. The
paper evaluates at temperature 0.6; Yue et al. (2025) read pass@k up to large k, where the base catches up.

Each is ``{name: {temperature, k, n, greedy}}``: ``k`` samples of each of the first ``n`` held-out problems at
``temperature``, with a greedy answer unless ``greedy`` is false; a missing key takes the main evaluation's value.
It is written beside the main one as ``eval-<name>.json`` (``base_eval-<name>.json`` for the base), reused when its
key matches, and read by :func:`tokenmdp.experiments.runs.collect` into ``RunData.extra_evals``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tokenmdp.errors import TokenMDPError

EXTRA_KEYS = ("temperature", "k", "n", "greedy")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._]*\Z")


def extra_spec(spec: dict, s: Any) -> dict:
    """The full settings of one extra evaluation of comparison ``s``: the given keys, else the main evaluation's."""
    return {"temperature": float(spec.get("temperature", s.eval_temperature)), "k": int(spec.get("k", s.k)),
            "n": int(spec.get("n", s.eval_n)), "greedy": bool(spec.get("greedy", True))}


def validate_extra_evals(s: Any) -> None:
    """One error naming the evaluation and the key for a bad ``--extra-evals``."""
    for name, spec in s.extra_evals.items():
        where = f"--extra-evals: {name!r}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise TokenMDPError(f"{where}: a name is letters, digits, '.' and '_' (it names a file)")
        if not isinstance(spec, dict):
            raise TokenMDPError(f"{where} must be a mapping with keys {', '.join(EXTRA_KEYS)}, got {spec!r}")
        unknown = sorted(set(spec) - set(EXTRA_KEYS))
        if unknown:
            raise TokenMDPError(f"{where}: unknown key(s) {', '.join(unknown)}; the keys are {', '.join(EXTRA_KEYS)}")
        for key in ("k", "n"):
            v = spec.get(key, 1)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TokenMDPError(f"{where}: '{key}' must be an integer >= 1, got {v!r}")
        t = spec.get("temperature", 0.0)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0:
            raise TokenMDPError(f"{where}: 'temperature' must be a number >= 0, got {t!r}")
        if not isinstance(spec.get("greedy", True), bool):
            raise TokenMDPError(f"{where}: 'greedy' must be true or false, got {spec['greedy']!r}")
        if spec.get("n", 1) > s.eval_n:
            raise TokenMDPError(f"{where}: 'n' ({spec['n']}) exceeds the held-out set (--eval-n {s.eval_n})")


def extra_file(out_json: str | Path, name: str) -> Path:
    """``eval.json`` -> ``eval-<name>.json`` (and ``base_eval.json`` -> ``base_eval-<name>.json``)."""
    p = Path(out_json)
    return p.with_name(f"{p.stem}-{name}{p.suffix}")


def extra_units(s: Any) -> int:
    """Overall-progress weight of one model's extra evaluations, in completions."""
    specs = [extra_spec(spec, s) for spec in s.extra_evals.values()]
    return sum(x["n"] * (x["k"] + int(x["greedy"])) for x in specs)


__all__ = ["EXTRA_KEYS", "extra_file", "extra_spec", "extra_units", "validate_extra_evals"]
