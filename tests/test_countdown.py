"""Countdown: the exhaustive solver, the safe verifier (a table of cases with reasons), step scoring, the generator
and the loader of the public 3-to-4-number set."""

from __future__ import annotations

import json
import random
import sys
import time
from fractions import Fraction
from itertools import combinations

import pytest

from tokenmdp.errors import TokenMDPError
from tokenmdp.tasks import Countdown, get_task
from tokenmdp.tasks.countdown import make_problem, split_of
from tokenmdp.tasks.countdown_solve import all_values, reachable_targets, solve, solve_tree, to_steps
from tokenmdp.tasks.countdown_verify import parse_expression, verify_equation

P357 = make_problem([3, 5, 7], 56)


def brute_values(nums) -> set:
    """Independent enumeration (the "24 game" way): pick any two numbers, replace them by a op b, recurse."""
    nums = [Fraction(n) for n in nums]
    if len(nums) == 1:
        return {nums[0]}
    out = set()
    for i, j in combinations(range(len(nums)), 2):
        a, b = nums[i], nums[j]
        rest = [nums[k] for k in range(len(nums)) if k not in (i, j)]
        results = {a + b, a - b, b - a, a * b}
        if b:
            results.add(a / b)
        if a:
            results.add(b / a)
        for r in results:
            out |= brute_values(rest + [r])
    return out


# ------------------------------------------------------------------------------------------------------- solver
def test_solver_hand_checked():
    assert all_values([2, 3]) == {5, -1, 1, 6, Fraction(2, 3), Fraction(3, 2)}
    assert solve([1, 1, 1], 5) is None  # at most 3 from three ones
    assert solve([1, 1, 1], 3) == "1+1+1"
    assert solve([3, 5, 7], 56) == "7*(3+5)"
    # 24 from 4, 4, 10, 10 needs a fraction on the way: (100 - 4) / 4
    expr = solve([4, 4, 10, 10], 24)
    assert expr is not None and verify_equation(expr, [4, 4, 10, 10], 24) is None
    tree = solve_tree([4, 4, 10, 10], 24)
    assert [s[3] for s in to_steps(tree)][-1] == 24


def test_solver_matches_brute_force_enumeration():
    rng = random.Random(0)
    for _ in range(40):
        nums = [rng.randint(0, 13) for _ in range(rng.choice([2, 3, 4]))]
        values = all_values(nums)
        assert values == brute_values(nums), nums
        ints = sorted(v for v in values if v == int(v) and -20 <= v <= 60)
        assert reachable_targets(nums, -20, 60) == ints
        for t in range(-20, 61):
            expr = solve(nums, t)
            assert (expr is not None) == (t in values), (nums, t)
            if expr is not None:
                assert verify_equation(expr, nums, t) is None, (nums, t, expr)


def test_solver_prefers_integer_steps():
    # 2 = 6 / 3 via integers; the solver must not go through a fraction like 6 * (1/3)
    tree = solve_tree([6, 3], 2)
    assert to_steps(tree) == [(6, "/", 3, 2)]
    for _a, _op, _b, c in to_steps(solve_tree([25, 97, 91, 84], 66)):
        assert isinstance(c, int) and c >= 0


# ----------------------------------------------------------------------------------------------------- verifier
CD = Countdown()

CASES = [
    # (completion, correct, formatted, reason contains)
    ("<answer>(3+5)*7</answer>", True, True, "correct"),
    ("<answer> 7 * (5 + 3) </answer>", True, True, "correct"),
    ("<answer>7*3+5*7</answer>", False, True, "7 used 2 times"),
    ("<answer>5*7+21</answer>", False, True, "number 21 is not given"),
    ("<answer>5*7</answer>", False, True, "number 3 not used"),
    ("<answer>(3+5)*7*1</answer>", False, True, "number 1 is not given"),
    ("<answer>8*7</answer>", False, True, "number 8 is not given"),
    ("<answer>5*7+3</answer>", False, True, "value 38 is not the target 56"),
    ("<answer>3+5+7</answer>", False, True, "value 15"),
    ("<answer>3*5*7</answer>", False, True, "value 105"),
    ("<answer>(3+5)*7</answer>", True, True, "correct"),
    ("<answer>7/(5-5)*3</answer>", False, True, "division by zero"),
    ("<answer>7/(3-3+5-5)</answer>", False, True, "division by zero"),
    ("<answer>9**9**9</answer>", False, True, "exponentiation"),
    ("<answer>3**5+7</answer>", False, True, "exponentiation"),
    ("<answer>__import__('os').system('ls')</answer>", False, True, "not allowed"),
    ("<answer>abs(3)*5+7</answer>", False, True, "'a' not allowed"),
    ("<answer>(3).real*5*7</answer>", False, True, "not allowed"),
    ("<answer>3.0*5+7</answer>", False, True, "decimal point"),
    ("<answer>" + "+".join(["3"] * 200) + "</answer>", False, True, "too long"),
    ("<answer>(3+5)*\u0667</answer>", False, True, "non-ASCII digit"),
    ("<answer>(\uff13+5)*7</answer>", False, True, "non-ASCII digit"),
    ("<answer>3+5)*7</answer>", False, True, "syntax error"),
    ("<answer>07*(3+5)</answer>", False, True, "syntax error"),
    ("<answer>+7*(3+5)</answer>", False, True, "unary UAdd not allowed"),
    ("<answer>7//(3+5)</answer>", False, True, "floor division"),
    ("<answer>7%(3+5)</answer>", False, True, "'%' not allowed"),
    ("<answer>-3+5*7</answer>", False, True, "value 32"),
    ("<answer></answer>", False, True, "empty answer"),
    ("<answer>(3+5)*7 = 56</answer>", True, True, "correct"),
    ("<answer>(3+5)*7=55</answer>", False, True, "claims 55"),
    ("<answer>56 = (3+5)*7</answer>", False, True, "right-hand side"),
    ("<answer>3*5*7</answer> wait <answer>(3+5)*7</answer>", True, True, "correct"),
    ("<answer>(3+5)*7</answer> no: <answer>3*5*7</answer>", False, True, "value 105"),
    ("<answer>(3+5)*7", False, False, "no <answer>"),
    ("(3+5)*7 = 56", False, False, "no <answer>"),
    ("", False, False, "no <answer>"),
    ("</answer>(3+5)*7<answer>", False, False, "no <answer>"),
]


@pytest.mark.parametrize("completion,correct,formatted,reason", CASES)
def test_verifier_case_table(completion, correct, formatted, reason):
    s = CD.score(P357, completion)
    assert (s.correct, s.formatted) == (correct, formatted), s
    assert reason in s.reason, s.reason
    assert s.reward == (1.0 if correct else 0.1 if formatted else 0.0)


def test_verifier_fraction_exact_and_unary_minus():
    p = make_problem([4, 4, 10, 10], 24)
    assert CD.score(p, "<answer>(10*10-4)/4</answer>").correct
    assert CD.score(make_problem([2, 3, 6], 1), "<answer>6/2/3</answer>").correct  # (6/2)/3, left-assoc
    assert not CD.score(make_problem([2, 3, 6], 9), "<answer>6/2/3</answer>").correct
    assert CD.score(make_problem([3, 10, 2], 14), "<answer>-3+10*2-3+3</answer>").reason.startswith("number 3")
    assert CD.score(make_problem([3, 10, 2], 17), "<answer>-3+10*2</answer>").correct
    zero = CD.score(make_problem([2, 2, 5], 1), "<answer>5/(2-2)</answer>")
    assert (zero.correct, zero.formatted, zero.reason) == (False, True, "division by zero")
    assert parse_expression("(3+5)*7 = 56") == (56, [3, 5, 7], 56)
    assert parse_expression("7/2") == (Fraction(7, 2), [7, 2], None)


def test_power_tower_rejected_quickly():
    start = time.perf_counter()
    for _ in range(100):
        assert CD.score(P357, "<answer>9**9**9**9</answer>").reason == "exponentiation not allowed"
    assert time.perf_counter() - start < 0.5


def test_long_nested_expression_rejected_quickly():
    deep = "(" * 5000 + "3" + ")" * 5000
    start = time.perf_counter()
    assert "too long" in CD.score(P357, f"<answer>{deep}</answer>").reason
    assert time.perf_counter() - start < 0.1
    assert "too long" in Countdown(max_expr_chars=10).score(P357, "<answer>(3 + 5) * 7</answer>").reason


def test_rewards_configurable():
    cd = Countdown(rewards=(2.0, 0.5, -1.0))
    assert cd.score(P357, "<answer>(3+5)*7</answer>").reward == 2.0
    assert cd.score(P357, "<answer>3*5*7</answer>").reward == 0.5
    assert cd.score(P357, "none").reward == -1.0
    with pytest.raises(TokenMDPError, match="rewards"):
        Countdown(rewards=(1.0, 0.0))


# --------------------------------------------------------------------------------------------------- step scores
def test_step_scores():
    completion = "3+5=8\n8*7=57\n5+3=8\n8*7=56\n(7/2)*2=7\n</think><answer>(3+5)*7</answer> 1+1=2"
    steps = CD.score_steps(P357, completion)
    got = [(s.text, s.correct, s.reason) for s in steps]
    assert got == [
        ("3+5=8", True, "ok"),
        ("8*7=57", False, "8*7 is 56, not 57"),
        ("5+3=8", False, "operand 5 not available"),  # 3 and 5 were consumed by the first step
        ("8*7=56", True, "ok"),
        ("(7/2)*2=7", False, "operand 7/2 not available"),
    ]
    for s in steps:
        assert completion[s.start : s.end] == s.text


def test_step_scores_fractions_and_prose():
    p = make_problem([4, 4, 10, 10], 24)
    completion = "10 * 10 = 100\nthen 100 - 4 = 96, and 96 / 4 = 24\n7 / 0 = 1\n</think>"
    steps = CD.score_steps(p, completion)
    assert [(s.text, s.correct) for s in steps] == [
        ("10 * 10 = 100", True),
        ("100 - 4 = 96", True),
        ("96 / 4 = 24", True),
        ("7 / 0 = 1", False),
    ]
    assert steps[-1].reason == "division by zero"
    frac = CD.score_steps(make_problem([7, 2, 4], 14), "7/2=7/2\n(7/2)*4=14\n")
    assert [s.correct for s in frac] == [True, True]
    # "12+3+5=20" has no step "3+5=20": an operand cannot follow another operator
    assert [s.text for s in CD.score_steps(P357, "12+3+5=20\n")] == []


# ----------------------------------------------------------------------------------------------------- templates
def test_compact_template_and_reference_are_exact():
    assert CD.render(P357, "compact") == "Numbers: 3 5 7. Target: 56.\n<think>"
    assert CD.reference(P357, "compact") == "3+5=8\n7*8=56\n</think><answer>7*(3+5)</answer>"
    # 24 from 1, 3, 4, 6 only through fractions: 6 / (1 - 3/4); fraction operands are parenthesised
    p = make_problem([1, 3, 4, 6], 24)
    assert CD.reference(p, "compact") == "3/4=3/4\n1-(3/4)=1/4\n6/(1/4)=24\n</think><answer>6/(1-3/4)</answer>"
    assert [s.correct for s in CD.score_steps(p, CD.reference(p, "compact"))] == [True, True, True]
    r1 = CD.render(P357)
    assert r1.endswith("<think>") and "3, 5, 7" in r1 and "56" in r1 and "<answer>" in r1
    with pytest.raises(TokenMDPError, match="known templates: r1, compact"):
        CD.render(P357, "chatml")


# ----------------------------------------------------------------------------------------------------- generator
def test_generator_deterministic_solvable_disjoint():
    cd = Countdown(num_count=(3, 4), low=1, high=99, target_low=1, target_high=100)
    train, test = cd.problems("train", n=150, seed=3), cd.problems("test", n=60, seed=3)
    assert train == cd.problems("train", n=150, seed=3)
    assert train != cd.problems("train", n=150, seed=4)
    assert cd.problems("train", n=40, seed=3) == train[:40]
    assert len({p.id for p in train}) == 150
    train_sets = {tuple(sorted(p.metadata["nums"])) for p in train}
    test_sets = {tuple(sorted(p.metadata["nums"])) for p in test}
    assert not train_sets & test_sets
    assert {len(p.metadata["nums"]) for p in train} == {3, 4}
    for p in train + test:
        assert all(1 <= x <= 99 for x in p.metadata["nums"]) and 1 <= p.answer <= 100
        assert split_of(p.metadata["nums"], 0.1) == ("train" if p in train else "test")
        for template in ("r1", "compact"):
            ref = cd.reference(p, template)
            assert cd.score(p, ref).correct, (p, ref)
            assert all(s.correct for s in cd.score_steps(p, ref)), ref


def test_generator_options_and_errors():
    cd = Countdown(num_count=3, low=1, high=9, target_low=10, target_high=20)
    ps = cd.problems("test", n=5)
    assert all(len(p.metadata["nums"]) == 3 and 10 <= p.answer <= 20 for p in ps)
    with pytest.raises(TokenMDPError, match="could only generate"):
        Countdown(num_count=2, low=1, high=2).problems("train", n=50)
    with pytest.raises(TokenMDPError, match="num_count"):
        Countdown(num_count=9)
    with pytest.raises(TokenMDPError, match="unknown split"):
        cd.problems("validation")


def test_num_problems_counts_the_distinct_problems_and_the_stream_cycles():
    """Two numbers in 1..2, targets >= 1: (1,1) reaches 1 and 2; (1,2) reaches 1, 2, 3; (2,2) reaches 1 and 4:
    7 problems in all, each one generated exactly once."""
    from tokenmdp.train.data import prompt_stream

    cd = Countdown(num_count=2, low=1, high=2, template="compact")
    sizes = {split: cd.num_problems(split) for split in ("train", "test")}
    assert sum(sizes.values()) == 7
    for split, size in sizes.items():
        if size:
            assert len({(tuple(sorted(p.metadata["nums"])), p.answer) for p in cd.problems(split, n=size)}) == size
    assert Countdown().num_problems("train") is None  # 3-4 numbers in 1..99: too many to count
    train = sizes["train"]
    stream = prompt_stream(cd, seed=3, steps=5, prompts_per_step=train)  # five epochs of the train split
    epochs = [sorted(p.id for p in step) for step in stream]
    assert all(e == epochs[0] for e in epochs) and len(set(epochs[0])) == train
    assert stream == prompt_stream(cd, seed=3, steps=5, prompts_per_step=train)


# ------------------------------------------------------------------------------------------------------ data sets
def test_load_public_set_from_local_files(tmp_path):
    rows = [{"target": 56, "nums": [3, 5, 7]}, {"target": 24, "nums": [4, 4, 10, 10]}]
    rows += [{"target": t, "nums": [t, 1, 1]} for t in range(10, 60)]
    jsonl = tmp_path / "cd.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "cd.parquet"
    import pandas as pd

    pd.DataFrame(rows).to_parquet(parquet)
    for path in (jsonl, parquet):
        cd = Countdown(data=str(path))
        train, test = cd.problems("train"), cd.problems("test")
        assert len(train) + len(test) == len(rows) and test
        assert {p.id for p in train}.isdisjoint({p.id for p in test})
        assert cd.problems("train", n=5, seed=1) == cd.problems("train", n=5, seed=1)
        assert sorted(p.answer for p in train + test) == sorted(r["target"] for r in rows)
        loaded = cd.load_problems(path)
        assert loaded[0] == make_problem([3, 5, 7], 56)
    with pytest.raises(TokenMDPError, match="asked for 999"):
        Countdown(data=str(jsonl)).problems("train", n=999)


def test_loader_errors(tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"target": 5, "nums": [1, 4]}\n{"target": 5}\n')
    with pytest.raises(TokenMDPError, match=r"bad\.jsonl:2: missing field 'nums'"):
        Countdown().load_problems(bad)
    bad.write_text('{"target": 5, "nums": [1, "x"]}\n')
    with pytest.raises(TokenMDPError, match=r"bad\.jsonl:1: field 'nums' must be an integer"):
        Countdown().load_problems(bad)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(TokenMDPError, match="datasets"):
        Countdown(data="hub").problems("train", n=1)
    with pytest.raises(TokenMDPError, match="not found"):
        Countdown(data=str(tmp_path / "missing.parquet")).problems("train", n=1)


def test_registry_and_round_trip():
    cd = get_task("countdown", num_count=3, template="compact")
    p = cd.problems("train", n=1, seed=7)[0]
    assert cd.problem_from_dict(json.loads(json.dumps(cd.problem_to_dict(p)))) == p
    assert cd.problem_from_dict({"nums": [3, 5, 7], "target": 56}) == P357


def test_throughput_sanity():
    """The benchmark measures the real figure; this only catches an accidental slow path (shared CPU)."""
    refs = [CD.reference(P357), "<answer>3*5*7</answer>", "no tag", "<answer>9**9</answer>"] * 250
    start = time.process_time()
    for c in refs:
        CD.score(P357, c)
    assert len(refs) / (time.process_time() - start) > 5000
