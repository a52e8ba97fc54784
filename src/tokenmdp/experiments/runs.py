"""Reading run folders and comparison folders (read only; the report is built from these).

A *run folder* is what the trainer writes (``config.yaml``, ``metrics.jsonl``, ``samples.parquet``,
``final/``, ``DONE``); a comparison adds ``eval.json`` (the held-out evaluation of the final model) to each run.
A *comparison folder* holds ``compare.json`` (settings and timings), ``base_eval.json`` (the base model on the same
held-out set) and ``runs/<algo>/seed-<s>/``. Reports merge any mix of both, so runs made on different days or
machines can be put side by side.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from tokenmdp.errors import TokenMDPError

EVAL_FILE = "eval.json"
BASE_EVAL_FILE = "base_eval.json"
BASE_RECORDS_FILE = "base_eval_records.jsonl"
EVAL_RECORDS_FILE = "eval_records.jsonl"  # beside a run's eval.json: one held-out problem a line
COMPARE_FILE = "compare.json"


@dataclass
class RunData:
    """One training run: its algorithm, seed, config, per-step metrics and (optional) held-out evaluation."""

    path: Path
    algo: str
    seed: int | None
    config: dict = field(default_factory=dict)
    metrics: pd.DataFrame = field(default_factory=pd.DataFrame)
    eval: dict | None = None
    done: bool = False
    extra_evals: dict[str, dict] = field(default_factory=dict)  # name -> eval-<name>.json (compare --extra-evals)

    @property
    def label(self) -> str:
        return f"{self.algo}/seed-{self.seed}"

    @property
    def finished(self) -> bool:
        """The run ended: its ``DONE`` marker, or the held-out evaluation a comparison writes after training."""
        return self.done or self.eval is not None


@dataclass
class Collection:
    """Everything a report needs: the runs, the base model's evaluations, and the comparisons' own records."""

    runs: list[RunData] = field(default_factory=list)
    base_evals: list[dict] = field(default_factory=list)
    compares: list[dict] = field(default_factory=list)
    sources: list[Path] = field(default_factory=list)
    base_extra_evals: dict[str, list[dict]] = field(default_factory=dict)  # name -> base_eval-<name>.json

    def with_evals(self, name: str) -> Collection:
        """The collection as extra evaluation ``name`` sees it: each run's and the base's ``eval-<name>.json`` in
        place of the main evaluation (a run without one is left unfinished), for the claims under it."""
        runs = [replace(r, eval=r.extra_evals.get(name), done=False) for r in self.runs]
        return replace(self, runs=runs, base_evals=list(self.base_extra_evals.get(name, [])))

    @property
    def algos(self) -> list[str]:
        """Algorithms with at least one finished run, in order of first appearance."""
        seen: list[str] = []
        for r in self.runs:
            if r.finished and r.algo not in seen:
                seen.append(r.algo)
        return seen

    def runs_of(self, algo: str, *, finished: bool = False) -> list[RunData]:
        """The runs of ``algo``; ``finished=True``: only those that ended (``DONE``, or a held-out evaluation)."""
        return [r for r in self.runs if r.algo == algo and (not finished or r.finished)]

    @property
    def unfinished(self) -> list[RunData]:
        """Runs that stopped early or are still going: left out of the summary table."""
        return [r for r in self.runs if not r.finished]

    def with_stand_ins(self, mapping: dict[str, str]) -> Collection:
        """The collection with each named arm in the place of an algorithm: ``{"binary-grpo_nokl": "grpo_nokl"}``
        judges the claims on the arm's runs under the algorithm's name, the algorithm's own runs left out (``tokenmdp
        report --stand-in``: which verdicts an arm of the paper's settings moves)."""
        unknown = [a for a in mapping if not self.runs_of(a)]
        if unknown:
            raise TokenMDPError(f"--stand-in: no runs of {', '.join(unknown)} in the folders given (there: "
                                f"{', '.join(sorted({r.algo for r in self.runs})) or 'none'})")
        replaced = set(mapping.values())
        runs = [replace(r, algo=mapping[r.algo]) if r.algo in mapping else r for r in self.runs
                if r.algo in mapping or r.algo not in replaced]
        return replace(self, runs=runs)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TokenMDPError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg})") from None


def read_metrics(path: Path) -> pd.DataFrame:
    """``metrics.jsonl`` as a frame indexed by ``step`` (line number from 1 when a line has no ``step``)."""
    rows = []
    if path.is_file():
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TokenMDPError(f"{path} line {i}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise TokenMDPError(f"{path} line {i}: expected a JSON object")
            row.setdefault("step", i)
            rows.append(row)
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    frame["step"] = pd.to_numeric(frame["step"], errors="coerce")
    # several lines of one step (e.g. a separate eval line) merge into one row
    return frame.groupby("step", sort=True).last()


def _seed_of(config: dict, ev: dict | None, path: Path) -> int | None:
    for value in ((ev or {}).get("seed"), (config.get("run") or {}).get("seed"), config.get("seed")):
        if isinstance(value, int):
            return value
    name = path.name
    if name.startswith("seed-") and name[5:].isdigit():
        return int(name[5:])
    return None


def _algo_of(config: dict, ev: dict | None, path: Path) -> str:
    """The run's name in a report: its evaluation's, else the folder ``<name>/seed-N`` (a comparison's arm, whose
    config names only the preset it runs), else the config's algorithm."""
    if ev and isinstance(ev.get("algo"), str):
        return ev["algo"]
    if path.name.startswith("seed-") and path.parent.name:
        return path.parent.name
    algo = config.get("algo")
    if isinstance(algo, dict) and isinstance(algo.get("name"), str):
        return algo["name"]
    if isinstance(algo, str):
        return algo
    return path.parent.name if path.name.startswith("seed-") else path.name


def load_run(path: str | Path) -> RunData:
    """Read one run folder (see the module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise TokenMDPError(f"run folder not found: {path}")
    config: dict = {}
    cfg_path = path / "config.yaml"
    if cfg_path.is_file():
        try:
            config = yaml.safe_load(cfg_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise TokenMDPError(f"{cfg_path}: not valid YAML ({exc})") from None
    ev = read_json(path / EVAL_FILE) if (path / EVAL_FILE).is_file() else None
    return RunData(
        path=path,
        algo=_algo_of(config, ev, path),
        seed=_seed_of(config, ev, path),
        config=config,
        metrics=read_metrics(path / "metrics.jsonl"),
        eval=ev,
        done=(path / "DONE").exists(),
        extra_evals=_extra_evals(path, EVAL_FILE),
    )


def _extra_evals(folder: Path, main: str) -> dict[str, dict]:
    """``{name: document}`` of the ``<main stem>-<name>.json`` files in ``folder`` that are evaluations (a mapping
    with ``metrics``, as ``compare --extra-evals`` writes them); other files of that pattern are left alone."""
    stem, out = Path(main).stem, {}
    for p in sorted(folder.glob(f"{stem}-*.json")):
        name = p.stem[len(stem) + 1:]
        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._]*", name):
            doc = read_json(p)
            if isinstance(doc, dict) and isinstance(doc.get("metrics"), dict):
                out[name] = doc
    return out


def _is_run(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() or (path / "config.yaml").is_file() or (path / EVAL_FILE).is_file()


def _find_runs(root: Path) -> list[Path]:
    found = []
    for marker in sorted(root.rglob("metrics.jsonl")) + sorted(root.rglob(EVAL_FILE)):
        parent = marker.parent
        if parent != root and parent not in found and "checkpoints" not in parent.parts:
            found.append(parent)
    return found


def base_curve_point(folder: Path, info: dict) -> dict | None:
    """Step 0 of a comparison's held-out curves: the base model on the trainer's curve problems (the first
    ``curve_n`` of the held-out set, which the trainer's periodic evaluation draws with the same seed), read from
    the per-problem records of the base evaluation: greedy accuracy (``eval/accuracy``, as the comparison's
    trainers log it) and the mean sampled pass@1. None when the records are not there."""
    file = Path(folder) / BASE_RECORDS_FILE
    settings = info.get("settings") or {}
    n = settings.get("curve_n")
    # the trainer draws its curve problems with seed 0: they are the held-out set's first only when it is too
    if not file.is_file() or not n or settings.get("heldout_seed", 0) != 0 or settings.get("eval_every") == 0:
        return None
    records = []
    with file.open() as fh:
        for line in fh:
            if len(records) >= n:
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                return None  # a torn file: no point rather than a wrong one
    greedy = [r["greedy"]["correct"] for r in records if isinstance(r.get("greedy"), dict)]
    sampled = [r["pass@1"] for r in records if r.get("pass@1") is not None]
    point: dict[str, Any] = {"step": 0}
    if greedy:
        point["eval/greedy_accuracy"] = point["eval/accuracy"] = sum(map(bool, greedy)) / len(greedy)
    if sampled:
        point["eval/sampled_accuracy"] = sum(sampled) / len(sampled)
    return point if len(point) > 1 else None


def _with_step0(run: RunData, point: dict) -> None:
    """Prepend ``point`` as the step-0 row of ``run``'s metrics, unless the run logged a step 0 itself."""
    frame = run.metrics  # indexed by step (read_metrics)
    if frame.empty or 0 in frame.index:
        return
    row = pd.DataFrame([{k: v for k, v in point.items() if k != "step"}], index=pd.Index([0], name=frame.index.name))
    run.metrics = pd.concat([row, frame]).sort_index()


def collect(paths: list[str | Path]) -> Collection:
    """Gather runs from run folders, comparison folders, or folders holding either; duplicates are read once."""
    if not paths:
        raise TokenMDPError("no run folder given: pass at least one run or comparison folder")
    col = Collection()
    seen: set[Path] = set()

    def add_run(p: Path, step0: dict | None = None) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            run = load_run(p)
            if step0 is not None:
                _with_step0(run, step0)
            col.runs.append(run)

    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise TokenMDPError(f"run folder not found: {p}")
        col.sources.append(p)
        step0 = None
        if (p / COMPARE_FILE).is_file():
            info = read_json(p / COMPARE_FILE)
            info["_source"] = str(p)
            col.compares.append(info)
            step0 = base_curve_point(p, info)
        if (p / BASE_EVAL_FILE).is_file():
            col.base_evals.append(read_json(p / BASE_EVAL_FILE))
            for name, doc in _extra_evals(p, BASE_EVAL_FILE).items():
                col.base_extra_evals.setdefault(name, []).append(doc)
        if _is_run(p):
            add_run(p)
        else:
            for run in _find_runs(p):
                add_run(run, step0)
    if not col.runs:
        raise TokenMDPError(f"no run folder (with metrics.jsonl, config.yaml or {EVAL_FILE}) under: "
                            + ", ".join(str(s) for s in col.sources))
    col.runs.sort(key=lambda r: (r.seed if r.seed is not None else math.inf, str(r.path)))
    order = {a: i for i, a in enumerate(_preferred_order(col))}
    col.runs.sort(key=lambda r: order[r.algo])
    return col


def _preferred_order(col: Collection) -> list[str]:
    """Algorithms in the order a comparison listed them, then any others in order of appearance."""
    order: list[str] = []
    for info in col.compares:
        for a in (info.get("settings") or {}).get("algos", []):
            if a not in order:
                order.append(a)
    for r in col.runs:
        if r.algo not in order:
            order.append(r.algo)
    return order
