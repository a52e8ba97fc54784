"""GSM8K: grade-school math word problems with a numeric final answer.

Data
    A local folder with ``train.jsonl`` and ``test.jsonl`` (one ``{"question", "answer"}`` a line, the gold
    solution ending with ``#### <number>``), or, when ``data_dir`` is None and ``$TOKENMDP_GSM8K_DIR`` is unset,
    the hub dataset ``openai/gsm8k`` (config ``main``) through ``datasets``. A :class:`Problem` has
    ``id = "gsm8k-<split>-<row>"``, the question, ``answer`` = the gold number as a normalised string (``"18"``,
    ``"1200"``, ``"-3"``) and ``metadata["solution"]`` = the gold solution text.

Templates
    ``hash``: asks for step-by-step reasoning and the final number after ``#### `` (extraction ``strict``).
    ``boxed``: asks for the final answer in ``\\boxed{}`` (extraction ``boxed``).
    ``instruct``: the ``####`` format stated first and shown by an example, then the question (extraction
    ``strict``); written for small instruct models under their chat template (``task.chat_template``), which
    follow an instruction placed before the question far more often (``benchmarks/RESULTS.md``).

Extraction (:func:`extract`) and comparison
    ``strict``: the number after the last ``####``; ``boxed``: the content of the last ``\\boxed{...}`` (nested
    braces balanced); ``flexible``: the last number anywhere; ``any``: strict, else boxed, else flexible.
    :func:`normalize_number` removes ``$``, thousands separators, ``%``, LaTeX ``\\!``/``\\,``/``\\text{...}``,
    a trailing ``.``; reads ``\\frac{a}{b}``; and :func:`to_fraction` compares the result as an exact Fraction
    (``"18.0" == "18"``, ``"$1,200" == "1200"``, ``"\\frac{3}{4}" == "0.75"``). With ``backend="math_verify"`` the
    extracted answer (or the whole completion when ``extraction="any"``) is compared by ``math-verify`` with its
    signal-based time-outs disabled (``parsing_timeout=None``, ``timeout_seconds=None``), so it works in threads.

Rewards: ``rewards = (correct, formatted but wrong, unformatted)``, default ``(1.0, 0.0, 0.0)``. "Formatted" means
that the extraction found an answer.
"""

from __future__ import annotations

import os
import random
import re
from fractions import Fraction
from pathlib import Path
from collections.abc import Sequence

from tokenmdp.errors import TokenMDPError
from tokenmdp.tasks.task import Problem, Score, Task, check_split, read_records, require

HUB_ID, HUB_CONFIG = "openai/gsm8k", "main"
ENV_DIR = "TOKENMDP_GSM8K_DIR"
EXTRACTIONS = ("strict", "boxed", "flexible", "any")
BACKENDS = ("exact", "math_verify")
MATH_VERIFY_MAX_CHARS = 2000

HASH_TEMPLATE = (
    "Solve the following math problem. Reason step by step, then write the final answer as a plain number on the "
    'last line, after "#### ".\n\nQuestion: {question}\nAnswer:'
)
BOXED_TEMPLATE = (
    "Solve the following math problem. Reason step by step, and put the final answer, a plain number, in "
    "\\boxed{{}}.\n\nQuestion: {question}\nAnswer:"
)
INSTRUCT_TEMPLATE = (
    "Solve the problem. Finish with the final answer on its own line, written as #### followed by the number "
    "(for example: #### 42).\n\n{question}"
)
_DEFAULT_EXTRACTION = {"hash": "strict", "boxed": "boxed", "instruct": "strict"}

_NUM = r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
_STRICT = re.compile(r"####\s*\$?\s*(" + _NUM + ")")
_FLEX = re.compile(r"(?<![\d.])" + _NUM.replace("-?", "-?\\$?"))
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FRAC = re.compile(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}")
_TEXT = re.compile(r"\\(?:text|mathrm|textbf|mbox)\{[^{}]*\}")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` with nested braces balanced: ``"\\boxed{\\frac{1}{2}}"`` ->
    ``"\\frac{1}{2}"``; ``None`` when there is none or its braces never close."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    depth = 1
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def normalize_number(text: str) -> str:
    """Strip units and formatting from a numeric answer: ``"$1,200.00"`` -> ``"1200.00"``, ``"\\frac{3}{4}"`` ->
    ``"3/4"``, ``"25\\%"`` -> ``"25"``, ``"x = 5."`` -> ``"5"``, ``"−3"`` (unicode minus) -> ``"-3"``."""
    s = text.strip().replace("\u2212", "-")
    s = _TEXT.sub("", s)
    s = _FRAC.sub(r"(\1)/(\2)", s)
    for junk in ("\\$", "$", "\\%", "%", "\\!", "\\,", "\\;", "{", "}", " ", ","):
        s = s.replace(junk, "")
    if "=" in s:
        s = s.rsplit("=", 1)[1]
    s = s.rstrip(".")
    if re.fullmatch(r"\(-?[\d.]+\)/\(-?[\d.]+\)", s):
        s = s.replace("(", "").replace(")", "")
    return s


def to_fraction(text: str | None) -> Fraction | None:
    """``normalize_number(text)`` as an exact Fraction (``"18.0"`` -> 18, ``"3/4"`` -> 3/4), or ``None``."""
    if text is None:
        return None
    s = normalize_number(text)
    if not re.fullmatch(r"-?\d+(?:\.\d+)?(?:/-?\d+(?:\.\d+)?)?", s):
        return None
    try:
        if "/" in s:
            p, q = s.split("/")
            return Fraction(p) / Fraction(q)
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def extract(text: str, mode: str = "strict") -> str | None:
    """The raw answer string found in ``text`` by ``mode`` (see the module docstring), or ``None``.

    ``extract("so 3+4=7\\n#### 7", "strict") == "7"``; ``extract("is \\boxed{\\frac{1}{2}}.", "boxed") ==
    "\\frac{1}{2}"``; ``extract("pay $1,200 now", "flexible") == "$1,200"``.
    """
    if mode == "strict":
        found = _STRICT.findall(text)
        return found[-1] if found else None
    if mode == "boxed":
        return last_boxed(text)
    if mode == "flexible":
        found = _FLEX.findall(text)
        return found[-1] if found else None
    if mode == "any":
        for sub in ("strict", "boxed", "flexible"):
            got = extract(text, sub)
            if got is not None:
                return got
        return None
    raise TokenMDPError(f"unknown extraction {mode!r}; known: {', '.join(EXTRACTIONS)}")


def gold_answer(solution: str, where: str = "answer") -> str:
    """The normalised gold number of a GSM8K solution (after its last ``#### ``): ``"... #### 1,200"`` -> ``"1200"``."""
    raw = extract(solution, "strict")
    value = to_fraction(raw)
    if value is None:
        raise TokenMDPError(f"{where}: no '#### <number>' final answer in the gold solution")
    return str(value) if value.denominator != 1 else str(value.numerator)


def strip_calculator(solution: str) -> str:
    """Remove GSM8K's ``<<48/2=24>>`` calculator annotations from a gold solution."""
    return re.sub(r"<<[^<>]*>>", "", solution)


class GSM8K(Task):
    """GSM8K grade-school math (7,473 train / 1,319 test); final answer after '####' or in \\boxed{}."""

    name = "gsm8k"
    templates = ("hash", "boxed", "instruct")

    def __init__(
        self,
        data_dir: str | Path | None = None,
        template: str = "hash",
        extraction: str | None = None,
        backend: str = "exact",
        rewards: Sequence[float] = (1.0, 0.0, 0.0),
    ) -> None:
        self.template = template
        self.resolve_template(template)
        self.extraction = extraction or _DEFAULT_EXTRACTION[template]
        if self.extraction not in EXTRACTIONS:
            raise TokenMDPError(f"unknown extraction {self.extraction!r}; known: {', '.join(EXTRACTIONS)}")
        if backend not in BACKENDS:
            raise TokenMDPError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
        if backend == "math_verify":
            _math_verify()
        if len(rewards) != 3:
            raise TokenMDPError(f"rewards must be (correct, formatted, unformatted), got {rewards!r}")
        self.backend = backend
        self.rewards = tuple(float(r) for r in rewards)
        self.data_dir = data_dir if data_dir is not None else os.environ.get(ENV_DIR)
        self._cache: dict[str, list[Problem]] = {}

    # ------------------------------------------------------------------------------------------------ data
    def problems(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[Problem]:
        """``n`` problems of ``split`` in an order shuffled by ``seed`` (all of them when ``n`` is None)."""
        rows = self._split(check_split(split))
        if n is not None and n > len(rows):
            raise TokenMDPError(f"asked for {n} GSM8K {split} problems, there are {len(rows)}")
        order = list(range(len(rows)))
        random.Random(f"gsm8k/{split}/{seed}").shuffle(order)
        return [rows[i] for i in order[: len(rows) if n is None else n]]

    def num_problems(self, split: str = "train") -> int | None:
        """The rows of ``split`` (7,473 train and 1,319 test in the public set)."""
        return len(self._split(check_split(split)))

    def _split(self, split: str) -> list[Problem]:
        if split not in self._cache:
            if self.data_dir is not None:
                path = Path(self.data_dir) / f"{split}.jsonl"
                if not path.exists():
                    raise TokenMDPError(f"GSM8K file not found: {path} (data_dir must hold train.jsonl and test.jsonl)")
                rows = [(f"{path}:{ln}", rec) for ln, rec in read_records(path)]
            else:
                rows = [(f"{HUB_ID} {split} row {i}", rec) for i, rec in enumerate(_hub_rows(split))]
            self._cache[split] = [
                self._raw_problem(rec, where, f"gsm8k-{split}-{i}") for i, (where, rec) in enumerate(rows)
            ]
        return self._cache[split]

    def _raw_problem(self, record: dict, where: str, pid: str) -> Problem:
        question = str(require(record, "question", where))
        solution = str(require(record, "answer", where))
        return Problem(id=pid, question=question, answer=gold_answer(solution, where), metadata={"solution": solution})

    def problem_from_dict(self, record: dict, where: str = "record") -> Problem:
        """Accepts :meth:`problem_to_dict`'s form or a raw GSM8K row ``{"question", "answer": "... #### 18"}``."""
        answer = require(record, "answer", where)
        if isinstance(answer, str) and "####" in answer:
            pid = str(record.get("id") or f"gsm8k-{where}")
            return self._raw_problem(record, where, pid)
        base = super().problem_from_dict(record, where)
        if to_fraction(str(base.answer)) is None and self.backend == "exact":
            raise TokenMDPError(f"{where}: field 'answer' is not a number: {base.answer!r}")
        return Problem(base.id, base.question, str(base.answer), base.metadata)

    def load_problems(self, path: str | Path) -> list[Problem]:
        """Problems from a local JSONL/Parquet file (raw GSM8K rows or this task's dict form)."""
        out = []
        for ln, rec in read_records(path):
            if isinstance(rec, dict) and "id" not in rec:
                rec = {**rec, "id": f"{Path(path).stem}-{ln}"}
            out.append(self.problem_from_dict(rec, where=f"{path}:{ln}"))
        return out

    # ------------------------------------------------------------------------------------------------ prompts
    def render(self, problem: Problem, template: str | None = None) -> str:
        name = self.resolve_template(template)
        text = {"hash": HASH_TEMPLATE, "boxed": BOXED_TEMPLATE, "instruct": INSTRUCT_TEMPLATE}[name]
        return text.format(question=problem.question)

    def reference(self, problem: Problem, template: str | None = None) -> str | None:
        """The gold solution without calculator annotations, ending in the template's answer format."""
        name = self.resolve_template(template)
        solution = problem.metadata.get("solution")
        if not solution:
            return f" #### {problem.answer}" if name != "boxed" else f" \\boxed{{{problem.answer}}}"
        body = strip_calculator(solution).rsplit("####", 1)[0].rstrip()
        if name != "boxed":
            return f" {body}\n#### {problem.answer}"
        return f" {body}\nThe final answer is \\boxed{{{problem.answer}}}."

    # ------------------------------------------------------------------------------------------------ scoring
    def score(self, problem: Problem, completion: str) -> Score:
        raw = extract(completion, self.extraction)
        if self.backend == "math_verify":
            return self._score_math_verify(problem, completion, raw)
        if raw is None:
            return Score(self.rewards[2], False, False, f"no answer found ({self.extraction} extraction)")
        got, gold = to_fraction(raw), to_fraction(str(problem.answer))
        if got is None:
            return Score(self.rewards[1], False, True, f"answer {raw!r} is not a number")
        if got == gold:
            return Score(self.rewards[0], True, True, "correct")
        return Score(self.rewards[1], False, True, f"answer {_show(got)} is not the gold {problem.answer}")

    def answer_key(self, problem: Problem, completion: str):
        """The normalised answer for majority vote (used by ``tokenmdp eval``): the extracted final number as an
        exact fraction (``"1,000.0"`` and ``"1000"`` agree); None when no answer is found."""
        raw = extract(completion, self.extraction)
        if raw is None:
            return None
        value = to_fraction(raw)
        return value if value is not None else normalize_number(raw)

    def _score_math_verify(self, problem: Problem, completion: str, raw: str | None) -> Score:
        mv = _math_verify()
        if raw is None and self.extraction != "any":
            return Score(self.rewards[2], False, False, f"no answer found ({self.extraction} extraction)")
        # with time-outs off, bound the work: the tail of the completion holds the final answer
        text = completion[-MATH_VERIFY_MAX_CHARS:] if raw is None else f"${normalize_number(raw)}$"
        pred = mv.parse(text, parsing_timeout=None)
        if not pred:
            return Score(self.rewards[2], False, False, "math-verify found no answer")
        gold = mv.parse(f"${problem.answer}$", parsing_timeout=None)
        if mv.verify(gold, pred, timeout_seconds=None):
            return Score(self.rewards[0], True, True, "correct")
        return Score(self.rewards[1], False, True, f"math-verify: {pred[-1]} is not the gold {problem.answer}")


def _show(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else str(value)


def _math_verify():
    try:
        import logging

        import math_verify
    except ImportError:
        raise TokenMDPError(
            "backend 'math_verify' needs the math-verify package: pip install 'tokenmdp[math]'"
        ) from None
    # math-verify warns once that its time-outs are off; that is intended here (no signals off the main thread).
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return math_verify


def _hub_rows(split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise TokenMDPError(
            f"GSM8K needs data_dir (a folder with train.jsonl and test.jsonl), ${ENV_DIR}, or the `datasets` "
            "package to read openai/gsm8k from the hub (pip install 'tokenmdp[hub]')"
        ) from None
    try:
        return list(datasets.load_dataset(HUB_ID, HUB_CONFIG, split=split))
    except Exception as exc:  # network, auth
        raise TokenMDPError(f"cannot load {HUB_ID} through datasets: {exc}") from exc
