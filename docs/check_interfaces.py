"""Check (and refresh) the entries of ``docs/interfaces.md`` against the code.

``docs/interfaces.md`` lists the public API inside fenced ```` ```text ```` blocks, one entry per line::

    tokenmdp.algos.losses.policy_loss(logprobs, old_logprobs, *, clip_low=0.2)  # what it is, in one line
    tokenmdp.mdp.token.TokenMDP.step(state, action)                              # a method: ``self`` left out
    tokenmdp.algos.registry.PRESETS                                              # no parentheses: existence only
    tokenmdp.train.run_dir                                                       # a module on its own

A long entry may go on over indented continuation lines. Blank lines and lines starting with ``#`` are skipped.
The entry's module is the longest prefix that names a module of the package; the rest is an attribute path in it.
A function or class must be *defined* in the module shown (not only re-exported there). A signature is compared
without annotations (the project uses ``from __future__ import annotations``), parameter by parameter: name, kind
(positional, ``*``, keyword-only, ``**``) and default. Literal defaults compare by value (``1e-6`` is ``1e-06``,
``"a"`` is ``'a'``); any other default by a name: a class or function by its ``__name__`` (``np.mean`` reads as
``mean``), an instance as ``TypeName()``, a dataclass ``default_factory`` as ``factory()``.

Usage::

    python docs/check_interfaces.py            # every entry with the code's current signature; stale ones marked
    python docs/check_interfaces.py --stale    # only what is stale, and the modules no entry names
    python docs/check_interfaces.py --write    # rewrite the signatures in interfaces.md from the code (comments kept)

It needs ``tokenmdp`` importable (``PYTHONPATH=src`` or an installed checkout). ``tests/test_docs.py`` runs the
same checks.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
INTERFACES = ROOT / "docs" / "interfaces.md"
SRC = ROOT / "src"
PACKAGE = "tokenmdp"
WIDTH = 118  # --write wraps entries longer than this over continuation lines

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


@dataclass
class Entry:
    """One parsed entry: its dotted name, its signature text (``None``: existence only), its comment, its lines."""

    name: str
    signature: str | None
    comment: str
    line: int  # 1-based, first line of the entry
    end: int  # 1-based, last line (continuations)

    def text(self) -> str:
        return self.name + (self.signature or "")


# --- parsing the markdown ------------------------------------------------------------------------------------------


def _split_entry(text: str, where: str) -> tuple[str, str | None, str]:
    """``name(sig)  # comment`` -> ``(name, "(sig)" | None, comment)``; parentheses are matched, quotes respected."""
    m = _NAME.match(text)
    if not m:
        raise ValueError(f"{where}: an entry must start with a dotted name, got {text!r}")
    name, rest = m.group(0), text[m.end():]
    sig = None
    if rest.startswith("("):
        depth, quote, i = 0, "", 0
        for i, ch in enumerate(rest):
            if quote:
                if ch == quote and rest[i - 1] != "\\":
                    quote = ""
            elif ch in "'\"":
                quote = ch
            elif ch in "([{":
                depth += 1
            elif ch in ")]}":
                depth -= 1
                if depth == 0:
                    break
        if depth != 0:
            raise ValueError(f"{where}: unbalanced parentheses in {text!r}")
        sig, rest = rest[: i + 1], rest[i + 1:]
    rest = rest.strip()
    if rest and not rest.startswith("#"):
        raise ValueError(f"{where}: after the entry only a '# comment' may follow, got {rest!r}")
    return name, sig, rest.lstrip("#").strip()


def parse(path: Path = INTERFACES) -> list[Entry]:
    """Every entry of the ```` ```text ```` blocks of ``path``."""
    entries: list[Entry] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    in_block = False
    pending: tuple[int, int, list[str]] | None = None

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            start, end, parts = pending
            name, sig, comment = _split_entry(" ".join(parts), f"{path.name}:{start}")
            entries.append(Entry(name, sig, comment, start, end))
        pending = None

    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        if not in_block:
            in_block = stripped == "```text"
            continue
        if stripped.startswith("```"):
            flush()
            in_block = False
            continue
        if raw[:1].isspace() and stripped and pending is not None:  # a continuation line (its comment too)
            pending = (pending[0], number, pending[2] + [stripped])
            continue
        if not stripped or stripped.startswith("#"):
            flush()
            continue
        flush()
        pending = (number, number, [stripped])
    flush()
    return entries


# --- the code's side -------------------------------------------------------------------------------------------------


def package_modules() -> list[str]:
    """Every module of the package (``tokenmdp`` and below), by walking the source tree (nothing is imported)."""
    found = []
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found.append(".".join(parts))
    return found


def public_modules() -> list[str]:
    """The modules ``interfaces.md`` must name: no ``__init__``/``__main__``, no private (``_x``) part."""
    out = []
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if path.stem in ("__init__", "__main__") or any(p.startswith("_") for p in parts):
            continue
        out.append(".".join(parts))
    return out


class Unresolved(Exception):
    """An entry whose name does not resolve; the message says why."""


def resolve(name: str, modules: set[str] | None = None) -> tuple[str, list[str], Any, bool]:
    """``(module, attribute path, object, is_method)`` for a dotted entry name, or raise :class:`Unresolved`."""
    modules = set(package_modules()) if modules is None else modules
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        if module in modules:
            break
    else:
        raise Unresolved(f"no module of the package is a prefix of {name!r}")
    obj: Any = importlib.import_module(module)
    attrs = parts[cut:]
    owner: Any = None
    for attr in attrs:
        if not hasattr(obj, attr):
            where = module + "".join("." + a for a in attrs[: attrs.index(attr)])
            near = difflib.get_close_matches(attr, [n for n in dir(obj) if not n.startswith("__")], n=3)
            hint = f" (near: {', '.join(near)})" if near else ""
            raise Unresolved(f"{where} has no attribute {attr!r}{hint}")
        owner, obj = obj, getattr(obj, attr)
    if attrs and inspect.ismodule(owner) and (inspect.isclass(obj) or inspect.isfunction(obj)):
        defined = getattr(obj, "__module__", module)
        if defined != module:
            raise Unresolved(f"{name} is defined in {defined}, not in {module} (list it as "
                             f"{defined}.{'.'.join(attrs)})")
    is_method = inspect.isclass(owner) and isinstance(inspect.getattr_static(owner, attrs[-1]), type(resolve))
    return module, attrs, obj, is_method


def _default_key(value: Any) -> tuple[str, Any]:
    """The normal form of a default in the code: a literal value, or a name."""
    if value is dataclasses.MISSING:
        return ("none", None)
    if type(value).__name__ == "_HAS_DEFAULT_FACTORY_CLASS":
        return ("name", "factory()")
    try:
        literal = ast.literal_eval(repr(value))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        literal = _NOT_LITERAL
    if literal is not _NOT_LITERAL and type(literal) is type(value) and literal == value:
        return ("literal", (type(value).__name__, value))
    if inspect.isclass(value) or inspect.isroutine(value):
        return ("name", getattr(value, "__name__", repr(value)))
    return ("name", f"{type(value).__name__}()")


_NOT_LITERAL = object()


def _doc_default_key(node: ast.expr) -> tuple[str, Any]:
    """The normal form of a default written in ``interfaces.md``."""
    try:
        value = ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    else:
        return ("literal", (type(value).__name__, value))
    if isinstance(node, ast.Name):
        return ("name", node.id)
    if isinstance(node, ast.Attribute):
        return ("name", node.attr)
    if isinstance(node, ast.Call):
        func = node.func
        return ("name", (func.attr if isinstance(func, ast.Attribute) else ast.unparse(func)) + "()")
    return ("name", ast.unparse(node))


Param = tuple[str, str, tuple[str, Any]]  # (name, kind, default key)


def code_params(obj: Any, *, is_method: bool = False) -> list[Param]:
    sig = inspect.signature(obj)
    params = list(sig.parameters.values())
    if is_method and params and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        params = params[1:]  # self
    return [(p.name, p.kind.name, _default_key(dataclasses.MISSING if p.default is p.empty else p.default))
            for p in params]


def doc_params(signature: str) -> list[Param]:
    """Parse ``(a, b=1, *, c='x', **kw)`` as Python; raise ``ValueError`` naming the problem."""
    try:
        fn = ast.parse(f"def f{signature}: pass").body[0]
    except SyntaxError as exc:
        raise ValueError(f"cannot read the signature {signature!r}: {exc.msg}") from None
    assert isinstance(fn, ast.FunctionDef)
    a = fn.args
    out: list[Param] = []
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for i, (arg, default) in enumerate(zip(positional, defaults)):
        kind = "POSITIONAL_ONLY" if i < len(a.posonlyargs) else "POSITIONAL_OR_KEYWORD"
        out.append((arg.arg, kind, ("none", None) if default is None else _doc_default_key(default)))
    if a.vararg:
        out.append((a.vararg.arg, "VAR_POSITIONAL", ("none", None)))
    for arg, default in zip(a.kwonlyargs, a.kw_defaults):
        out.append((arg.arg, "KEYWORD_ONLY", ("none", None) if default is None else _doc_default_key(default)))
    if a.kwarg:
        out.append((a.kwarg.arg, "VAR_KEYWORD", ("none", None)))
    return out


def _render_default(key: tuple[str, Any]) -> str:
    kind, value = key
    return repr(value[1]) if kind == "literal" else str(value)


def render(params: list[Param]) -> str:
    """The canonical text of a parameter list, in the form ``interfaces.md`` uses."""
    parts: list[str] = []
    star_done = False
    for i, (name, kind, default) in enumerate(params):
        if kind == "KEYWORD_ONLY" and not star_done:
            parts.append("*")
            star_done = True
        if kind == "VAR_POSITIONAL":
            star_done = True
            parts.append("*" + name)
            continue
        if kind == "VAR_KEYWORD":
            parts.append("**" + name)
            continue
        parts.append(name if default[0] == "none" else f"{name}={_render_default(default)}")
        if kind == "POSITIONAL_ONLY" and (i + 1 == len(params) or params[i + 1][1] != "POSITIONAL_ONLY"):
            parts.append("/")
    return "(" + ", ".join(parts) + ")"


@dataclass
class Finding:
    entry: Entry
    problem: str | None  # None: up to date
    current: str | None  # the code's current entry text, when it resolves

    def message(self, path: Path = INTERFACES) -> str:
        where = f"{path.relative_to(ROOT)}:{self.entry.line}"
        text = f"{where}: stale entry `{self.entry.text()}`: {self.problem}"
        if self.current is not None:
            text += f"\n    the code has now: `{self.current}`"
        return text


def check_entry(entry: Entry, modules: set[str] | None = None) -> Finding:
    try:
        _, _, obj, is_method = resolve(entry.name, modules)
    except Unresolved as exc:
        return Finding(entry, str(exc), None)
    except Exception as exc:  # an import error in the module itself
        return Finding(entry, f"importing it failed: {type(exc).__name__}: {exc}", None)
    if entry.signature is None:
        return Finding(entry, None, entry.name)
    try:
        have = code_params(obj, is_method=is_method)
    except (TypeError, ValueError):
        return Finding(entry, "the code's object has no signature (list it without parentheses)", entry.name)
    current = entry.name + render(have)
    try:
        want = doc_params(entry.signature)
    except ValueError as exc:
        return Finding(entry, str(exc), current)
    if want != have:
        return Finding(entry, _difference(want, have), current)
    return Finding(entry, None, current)


def _difference(want: list[Param], have: list[Param]) -> str:
    wn, hn = [p[0] for p in want], [p[0] for p in have]
    missing = [n for n in hn if n not in wn]
    extra = [n for n in wn if n not in hn]
    if missing or extra:
        bits = []
        if missing:
            bits.append("the code has parameters the entry lacks: " + ", ".join(missing))
        if extra:
            bits.append("the entry has parameters the code lacks: " + ", ".join(extra))
        return "; ".join(bits)
    if wn != hn:
        return "the parameters are in another order"
    for (name, wkind, wdef), (_, hkind, hdef) in zip(want, have):
        if wkind != hkind:
            code_kind, doc_kind = (k.lower().replace("_", "-") for k in (hkind, wkind))
            return f"parameter {name!r} is {code_kind} in the code, {doc_kind} in the entry"
        if wdef != hdef:
            shown = "no default" if hdef[0] == "none" else f"default {_render_default(hdef)}"
            listed = "no default" if wdef[0] == "none" else f"default {_render_default(wdef)}"
            return f"parameter {name!r} has {shown} in the code, {listed} in the entry"
    return "differs"


def check_all(path: Path = INTERFACES) -> list[Finding]:
    modules = set(package_modules())
    return [check_entry(e, modules) for e in parse(path)]


def unnamed_modules(path: Path = INTERFACES) -> list[str]:
    """Public modules that no entry names (as the entry's module, or as a bare module entry)."""
    modules = set(package_modules())
    named = set()
    for entry in parse(path):
        parts = entry.name.split(".")
        for cut in range(len(parts), 0, -1):
            if ".".join(parts[:cut]) in modules:
                named.add(".".join(parts[:cut]))
                break
    return [m for m in public_modules() if m not in named]


# --- refreshing ----------------------------------------------------------------------------------------------------


def wrap(text: str, comment: str, width: int = WIDTH) -> list[str]:
    """One entry as lines: on one line when it fits, else broken after commas with a 4-space continuation."""
    line = text + (f"  # {comment}" if comment else "")
    if len(line) <= width:
        return [line]
    out, current = [], ""
    for piece in re.split(r"(?<=, )", text):
        if current and len(current) + len(piece) > width:
            out.append(current.rstrip())
            current = "    "
        current += piece
    out.append(current.rstrip())
    if comment:
        if len(out[-1]) + len(comment) + 4 <= width:
            out[-1] += f"  # {comment}"
        else:
            out.append(f"    # {comment}")
    return out


def write(path: Path = INTERFACES) -> list[Finding]:
    """Rewrite every resolvable entry with the code's signature; return the findings that could not be fixed."""
    lines = path.read_text(encoding="utf-8").splitlines()
    findings = check_all(path)
    left = []
    for f in sorted(findings, key=lambda f: -f.entry.line):
        if f.current is None or f.entry.signature is None:
            if f.problem:
                left.append(f)
            continue
        lines[f.entry.line - 1: f.entry.end] = wrap(f.current, f.entry.comment)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return sorted(left, key=lambda f: f.entry.line)


def main(argv: list[str]) -> int:
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    if "--write" in argv:
        left = write()
        for f in left:
            print(f.message())
        missing = unnamed_modules()
        for m in missing:
            print(f"module {m} is named by no entry of docs/interfaces.md")
        print(f"rewrote {INTERFACES.relative_to(ROOT)}; {len(left)} entries need a hand, "
              f"{len(missing)} modules unnamed")
        return 1 if left or missing else 0
    findings = check_all()
    stale = [f for f in findings if f.problem]
    for f in findings:
        if f.problem:
            print(f.message())
        elif "--stale" not in argv:
            print(f.current)
    missing = unnamed_modules()
    for m in missing:
        print(f"module {m} is named by no entry of docs/interfaces.md")
    print(f"{len(findings)} entries, {len(stale)} stale; {len(missing)} modules unnamed", file=sys.stderr)
    return 1 if stale or missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
