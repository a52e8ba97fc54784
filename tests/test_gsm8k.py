"""GSM8K: answer extraction and normalisation, gold answers of every row of the shared files, scoring of each
supported completion format, the math-verify backend off the main thread, and the loader's errors."""

from __future__ import annotations

import json
import re
import sys
import threading
from fractions import Fraction

import pytest

from tokenmdp.errors import TokenMDPError
from tokenmdp.tasks import GSM8K, Problem, get_task
from tokenmdp.tasks.gsm8k import extract, gold_answer, last_boxed, normalize_number, to_fraction

P18 = Problem("p18", "Janet's ducks...", "18", {"solution": "9 * 2 = $<<9*2=18>>18\n#### 18"})


@pytest.mark.parametrize(
    "text,mode,expected",
    [
        ("3+4=7\n#### 7", "strict", "7"),
        ("#### 5\nno wait\n#### 1,200", "strict", "1,200"),
        ("####$ -42 dollars", "strict", "-42"),
        ("the answer is 7", "strict", None),
        ("so \\boxed{\\frac{1}{2}}.", "boxed", "\\frac{1}{2}"),
        ("\\boxed{3} then \\boxed{ {4} }", "boxed", " {4} "),
        ("\\boxed{3", "boxed", None),
        ("pay $1,200 now, then 3.5 more", "flexible", "3.5"),
        ("a total of $1,200.", "flexible", "$1,200"),
        ("numbers 1,2345", "flexible", "2345"),
        ("no digits", "flexible", None),
        ("\\boxed{12} and 13", "any", "12"),
        ("#### 11 \\boxed{12} and 13", "any", "11"),
        ("just 13 apples", "any", "13"),
    ],
)
def test_extract(text, mode, expected):
    assert extract(text, mode) == expected


@pytest.mark.parametrize(
    "text,value",
    [
        ("$1,200.00", Fraction(1200)),
        ("18.0", Fraction(18)),
        ("18.", Fraction(18)),
        ("0.75", Fraction(3, 4)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("\\dfrac{-6}{4}", Fraction(-3, 2)),
        ("25\\%", Fraction(25)),
        ("\\$18", Fraction(18)),
        ("x = 5.", Fraction(5)),
        ("\u22123", Fraction(-3)),
        ("12\\text{ dollars}", Fraction(12)),
        ("1/0", None),
        ("seven", None),
        (None, None),
    ],
)
def test_to_fraction(text, value):
    assert to_fraction(text) == value


def test_last_boxed_nested_and_normalize():
    assert last_boxed("\\boxed{\\frac{a}{\\sqrt{b}}} tail") == "\\frac{a}{\\sqrt{b}}"
    assert normalize_number("$1,200.00") == "1200.00"
    assert gold_answer("so 1,000 + 200\n#### 1,200") == "1200"
    with pytest.raises(TokenMDPError, match="no '#### <number>'"):
        gold_answer("no final line", where="f.jsonl:3")


def test_gold_answers_of_every_row(gsm8k_dir):
    """Every row of both shared files yields its gold number, equal to the text after '#### '."""
    task = GSM8K(data_dir=gsm8k_dir)
    counts = {}
    for split in ("train", "test"):
        problems = task.problems(split)
        counts[split] = len(problems)
        lines = (gsm8k_dir / f"{split}.jsonl").read_text().splitlines()
        by_id = {p.id: p for p in problems}
        for i, line in enumerate(lines):
            row = json.loads(line)
            tail = row["answer"].rsplit("#### ", 1)[1].strip()
            assert re.fullmatch(r"-?[\d,]+", tail), tail
            p = by_id[f"gsm8k-{split}-{i}"]
            assert p.answer == str(int(tail.replace(",", ""))) and p.question == row["question"]
    assert counts == {"train": 7473, "test": 1319}


def test_references_score_correct(gsm8k_dir):
    for template in ("hash", "boxed"):
        task = GSM8K(data_dir=gsm8k_dir, template=template)
        for p in task.problems("test", n=300, seed=1):
            ref = task.reference(p)
            assert "<<" not in ref
            assert task.score(p, ref).correct, (template, ref)


def test_problems_reproducible(gsm8k_dir):
    task = GSM8K(data_dir=gsm8k_dir)
    a = task.problems("test", n=20, seed=5)
    assert a == GSM8K(data_dir=gsm8k_dir).problems("test", n=20, seed=5)
    assert a != task.problems("test", n=20, seed=6)
    assert task.problems("test", n=5, seed=5) == a[:5]
    assert sorted(p.id for p in task.problems("test", seed=2)) == sorted(f"gsm8k-test-{i}" for i in range(1319))
    with pytest.raises(TokenMDPError, match="asked for 2000"):
        task.problems("test", n=2000)


HASH = GSM8K(data_dir="unused")


@pytest.mark.parametrize(
    "task_kwargs,completion,correct,formatted,reason",
    [
        ({}, "9 * 2 = 18\n#### 18", True, True, "correct"),
        ({}, "#### 18.00", True, True, "correct"),
        ({}, "#### $18", True, True, "correct"),
        ({}, "#### 17", False, True, "answer 17 is not the gold 18"),
        ({}, "#### 17\nactually\n#### 18", True, True, "correct"),
        ({}, "The answer is 18.", False, False, "no answer found (strict extraction)"),
        ({"extraction": "flexible"}, "The answer is 18.", True, True, "correct"),
        ({"extraction": "flexible"}, "18 eggs, minus 1 is 17", False, True, "answer 17"),
        ({"template": "boxed"}, "so \\boxed{18}", True, True, "correct"),
        ({"template": "boxed"}, "so \\boxed{\\$18.0}", True, True, "correct"),
        ({"template": "boxed"}, "so \\boxed{eighteen}", False, True, "is not a number"),
        ({"template": "boxed"}, "#### 18", False, False, "boxed extraction"),
        ({"extraction": "any"}, "so \\boxed{18}", True, True, "correct"),
        ({"rewards": (2.0, 0.5, -1.0)}, "#### 17", False, True, "answer 17"),
    ],
)
def test_score_formats(task_kwargs, completion, correct, formatted, reason):
    task = GSM8K(data_dir="unused", **task_kwargs)
    s = task.score(P18, completion)
    assert (s.correct, s.formatted) == (correct, formatted), s
    assert reason in s.reason
    rewards = task_kwargs.get("rewards", (1.0, 0.0, 0.0))
    assert s.reward == rewards[0 if correct else 1 if formatted else 2]


def test_math_verify_backend_works_off_the_main_thread():
    task = GSM8K(data_dir="unused", template="boxed", backend="math_verify")
    cases = [("\\boxed{\\frac{36}{2}}", True), ("\\boxed{18}", True), ("\\boxed{19}", False), ("none", False)]
    results: list = [None] * len(cases)

    def work(i, text):
        results[i] = task.score(P18, text)

    threads = [threading.Thread(target=work, args=(i, c)) for i, (c, _) in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [r.correct for r in results] == [ok for _, ok in cases]
    assert results[-1].formatted is False


def test_loader_errors_and_round_trip(tmp_path, monkeypatch):
    with pytest.raises(TokenMDPError, match="GSM8K file not found"):
        GSM8K(data_dir=tmp_path).problems("test", n=1)
    bad = tmp_path / "rows.jsonl"
    good = json.dumps({"question": "q?", "answer": "2+2=4\n#### 4"}) + "\n"
    bad.write_text(good + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(TokenMDPError, match=r"rows\.jsonl:2: missing field 'answer'"):
        GSM8K(data_dir="unused").load_problems(bad)
    bad.write_text(json.dumps({"question": "q?", "answer": "2+2=4\n#### 4"}) + "\n")
    (p,) = GSM8K(data_dir="unused").load_problems(bad)
    assert (p.id, p.answer) == ("rows-1", "4")
    task = get_task("gsm8k", data_dir="unused")
    assert task.problem_from_dict(json.loads(json.dumps(task.problem_to_dict(p)))) == p
    monkeypatch.delenv("TOKENMDP_GSM8K_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(TokenMDPError, match="datasets"):
        GSM8K().problems("train", n=1)
    with pytest.raises(TokenMDPError, match="unknown extraction"):
        GSM8K(extraction="loose")


def test_templates():
    assert HASH.render(P18).endswith("Question: Janet's ducks...\nAnswer:") and '"#### "' in HASH.render(P18)
    assert "\\boxed{}" in HASH.render(P18, "boxed")
