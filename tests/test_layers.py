"""The house's arrows point down: every import of every module (inside functions and ``TYPE_CHECKING`` blocks
too) goes to a lower layer or stays inside its own package, and no two files import each other, directly or
round a longer loop. The layers are written once, in :data:`RANKS` (docs/design.md section 2)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: Layer of each top-level part of the package: a module may import from a lower layer, or from its own part.
RANKS = {
    "errors": 0,
    "progress": 1, "atomic": 1, "locks": 1, "values": 1, "stats": 1, "__init__": 1,  # the ground
    "schema": 1.5,  # the one coercer of settings (reads values)
    "mdp": 2,
    "solvers": 3, "tasks": 3, "algos": 3, "policy": 3,
    "rollout": 4,
    "train": 5,
    "base": 6,  # the embedded base model's factory: trains (pretraining) and evaluates (train.heldout)
    "experiments": 7,
    "commands": 8,
    "cli": 9, "__main__": 9,
}


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(source: str, module: str, *, is_package: bool = False) -> list[tuple[str, int]]:
    """``(imported tokenmdp module, line)`` for every import statement anywhere in ``source``."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "tokenmdp"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] == "tokenmdp":
                found += [(f"{base}.{a.name}", node.lineno) for a in node.names]  # resolved to a module below
    return found


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def upward(module: str, imported: str) -> bool:
    """Whether ``module -> imported`` points up or sideways into another part of the same layer."""
    a, b = part_of(module), part_of(imported)
    if a == b:
        return False
    return RANKS[b] >= RANKS[a]


def graph(root: Path = SRC) -> tuple[dict[str, set[str]], list[str]]:
    """The file-level import graph of the package and the violations of the layer rule."""
    files = {module_name(p, root): p for p in (root / "tokenmdp").rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    bad = []
    for mod, path in files.items():
        for target, line in imports_of(path.read_text(), mod, is_package=path.name == "__init__.py"):
            while target not in files and "." in target:  # `from pkg import name`: the module pkg
                target = target.rpartition(".")[0]
            if target not in files or target == mod:
                continue
            if part_of(target) not in RANKS or part_of(mod) not in RANKS:
                bad.append(f"{path.relative_to(root)}:{line}: {mod} or {target} has no layer in RANKS")
                continue
            if upward(mod, target):
                bad.append(f"{path.relative_to(root)}:{line}: {mod} (layer {RANKS[part_of(mod)]}) imports "
                           f"{target} (layer {RANKS[part_of(target)]})")
            edges[mod].add(target)
    return edges, bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one file (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_part_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in (SRC / "tokenmdp").iterdir()
             if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").is_file())}
    assert parts <= set(RANKS), sorted(parts - set(RANKS))


def test_imports_point_down():
    _, bad = graph()
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_files():
    edges, _ = graph()
    assert cycles(edges) == []


@pytest.mark.parametrize("text, expect", [
    ("def f():\n    from tokenmdp.experiments.compare import compare\n", True),  # lazy, still up
    ("from tokenmdp.errors import TokenMDPError\n", False),
    ("from tokenmdp import tasks\n", True),  # sideways: tasks is policy's neighbour, not below it
    ("from . import model\n", False),  # inside its own part
    ("if TYPE_CHECKING:\n    from tokenmdp.train.setup import Components\n", True),
])
def test_checker_catches_an_upward_import(tmp_path, text, expect):
    """A deliberately added upward import (here into policy/) is reported with its file and line."""
    pkg = tmp_path / "tokenmdp"
    for part in ("policy", "experiments", "algos", "train", "tasks"):
        (pkg / part).mkdir(parents=True)
        (pkg / part / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("class TokenMDPError(Exception):\n    pass\n")
    (pkg / "experiments" / "compare.py").write_text("def compare():\n    pass\n")
    (pkg / "algos" / "losses.py").write_text("def policy_loss():\n    pass\n")
    (pkg / "train" / "setup.py").write_text("class Components:\n    pass\n")
    (pkg / "policy" / "model.py").write_text("")
    (pkg / "policy" / "probe.py").write_text(text)
    _, bad = graph(tmp_path)
    hits = [b for b in bad if "probe.py" in b]
    assert bool(hits) == expect, bad
    if expect:
        assert hits[0].startswith("tokenmdp/policy/probe.py:") and "imports" in hits[0]


def test_cycle_finder_hand_checked():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(edges) == [["a", "b", "c"]]
