"""Derivational traces: well-formed, arithmetically true, correct answers, seeded variety."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tokenmdp.base.traces import DEAD_END, Attempt, countdown_trace, moves, parse_trace, render_trace
from tokenmdp.tasks.countdown_verify import apply_op, verify_equation


def _random_problems(n_numbers: int, count: int, max_number: int = 20, seed: int = 0):
    """Problems whose target is the value of a random positive-integer derivation of the numbers."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        nums = [rng.randint(1, max_number) for _ in range(n_numbers)]
        pool = list(nums)
        while len(pool) > 1:
            i, j, _, c = rng.choice(moves(pool))
            pool = [v for k, v in enumerate(pool) if k not in (i, j)] + [c]
        out.append((nums, pool[0]))
    return out


def test_moves_hand_enumerated():
    assert [(op, c) for _, _, op, c in moves([6, 2])] == [("+", 8), ("-", 4), ("*", 12), ("/", 3)]
    assert [(op, c) for _, _, op, c in moves([3, 3])] == [("+", 6), ("*", 9), ("/", 1)]
    # larger operand first, so 2-6 and 2/6 never appear; 7 and 2 do not divide
    assert [(i, j, op) for i, j, op, _ in moves([2, 7])] == [(1, 0, "+"), (1, 0, "-"), (1, 0, "*")]
    assert len(moves([1, 2, 3])) == 3 + 4 + 4  # pairs (2,1): +,-,*,/ ; (3,1): +,-,*,/ ; (3,2): +,-,* (no 3/2)


def test_hand_checked_trace():
    # seed 1 on (3 5 7 -> 56): two dead ends, each completed by its nearest miss, then the solution.
    text = countdown_trace([3, 5, 7], 56, seed=1)
    assert text == "7-5=2\n3*2=6 no\n7*5=35\n35+3=38 no\n5+3=8\n8*7=56\n</think><answer>(5+3)*7</answer>"
    # nearest misses by hand: from {3, 2}: 5, 1, 6, (3/2 not an integer) -> 6 is closest to 56;
    # from {35, 3}: 38, 32, 105 -> 38 is closest.
    attempts, answer = parse_trace(text)
    assert [a.reached for a in attempts] == [False, False, True]
    assert answer == "(5+3)*7"


def _check_trace(nums, target, text, max_failures):
    attempts, answer = parse_trace(text)
    assert verify_equation(answer, nums, target) is None, (nums, target, text)
    assert 1 <= len(attempts) <= max_failures + 1
    assert all(not a.reached for a in attempts[:-1]) and attempts[-1].reached
    for att in attempts:
        assert len(att.steps) == len(nums) - 1
        pool = Counter(nums)
        for a, op, b, c in att.steps:
            assert apply_op(op, a, b) == c and c > 0 and a >= b  # arithmetic true, positive, larger first
            need = Counter([a, b])
            assert all(pool[x] >= need[x] for x in need), (text, a, b)  # operands available in this attempt
            pool -= need
            pool[c] += 1
        final = att.steps[-1][3]
        assert (final == target) == att.reached  # a dead end misses the target, the last attempt hits it
    return attempts


@pytest.mark.parametrize("n_numbers,max_failures", [(3, 2), (3, 0), (4, 2)])
def test_traces_well_formed_and_correct(n_numbers, max_failures):
    problems = _random_problems(n_numbers, 60 if n_numbers == 3 else 25, seed=n_numbers)
    for i, (nums, target) in enumerate(problems):
        text = countdown_trace(nums, target, seed=i, max_failures=max_failures)
        _check_trace(nums, target, text, max_failures)
        assert text.count(DEAD_END + "\n") == text.count(DEAD_END) <= max_failures


def test_trace_length_is_bounded():
    problems = _random_problems(3, 100, seed=7)
    lines = [countdown_trace(n, t, seed=s).split("</think>")[0].count("\n") for s, (n, t) in enumerate(problems)]
    assert max(lines) <= 6  # 3 attempts x 2 steps
    assert min(lines) == 2  # some traces go straight to a solution
    assert 2 < sum(lines) / len(lines) < 6  # and on average some dead ends are shown


def test_deterministic_and_varied():
    assert countdown_trace([3, 5, 7], 56, seed=3) == countdown_trace([3, 5, 7], 56, seed=3)
    traces = {countdown_trace([3, 5, 7], 56, seed=s) for s in range(40)}
    firsts = {t.split("\n")[0] for t in traces}
    assert len(traces) >= 8 and len(firsts) >= 5  # the order of attempts varies with the seed


def test_fallback_to_reference_when_fractions_needed():
    # 24 from 1 5 5 5 needs 5*(5-1/5): no positive-integer derivation exists, so the reference solution is used
    text = countdown_trace([1, 5, 5, 5], 24, seed=0)
    assert DEAD_END not in text
    answer = text.split("<answer>")[1].split("</answer>")[0]
    assert verify_equation(answer, [1, 5, 5, 5], 24) is None
    with pytest.raises(ValueError, match="no solution"):
        countdown_trace([1, 1, 1], 5)


def test_parse_trace_rejects_malformed_lines():
    with pytest.raises(ValueError, match="line 2"):
        parse_trace("3+5=8\n8*7 = 56\n</think><answer>(3+5)*7</answer>")
    with pytest.raises(ValueError, match="</think>"):
        parse_trace("3+5=8\n8*7=56\n<answer>(3+5)*7</answer>")


def test_render_parse_round_trip():
    attempts = [Attempt(((7, "-", 5, 2), (3, "*", 2, 6)), False), Attempt(((5, "+", 3, 8), (8, "*", 7, 56)), True)]
    text = render_trace(attempts, "(5+3)*7")
    assert text == "7-5=2\n3*2=6 no\n5+3=8\n8*7=56\n</think><answer>(5+3)*7</answer>"
    assert parse_trace(text) == (attempts, "(5+3)*7")


def test_every_step_scores_correct_with_the_task_step_verifier():
    from tokenmdp.tasks import get_task

    task = get_task("countdown", template="compact", num_count=(3, 4), high=20)
    for i, prob in enumerate(task.problems("train", n=40, seed=3)):
        text = countdown_trace(prob.metadata["nums"], prob.answer, seed=i)
        assert task.score(prob, text).correct, text
        steps = task.score_steps(prob, text)
        assert len(steps) == text.split("</think>")[0].count("\n")  # one step a line, all found
        assert all(s.correct for s in steps), (text, [s.reason for s in steps])  # dead ends reset the pool


def _check_give_up_trace(nums, target, text, max_failures, bluff=False):
    """A give-up trace: true lines, dead ends only before the end, and either a hit or a wrong closest near miss."""
    attempts, answer = parse_trace(text)
    assert all(not a.reached for a in attempts[:-1])
    assert 1 <= len(attempts) <= max_failures + 1
    if bluff:
        assert attempts[-1].reached  # never ends on a marked dead end
        value = attempts[-1].steps[-1][3]
        assert verify_equation(answer, nums, value) is None, text  # the answer is the last attempt's
        if value != target:
            assert len(attempts) <= max_failures
        attempts = attempts[:-1] + [Attempt(attempts[-1].steps, value == target)]
    elif attempts[-1].reached:
        assert verify_equation(answer, nums, target) is None, text
    else:
        assert len(attempts) <= max_failures
        assert verify_equation(answer, nums, target) is not None, text  # gave up: a wrong answer
        finals = [a.steps[-1][3] for a in attempts]
        closest = min(finals, key=lambda v: abs(v - target))
        value = next(a.steps[-1][3] for a in attempts if a.steps[-1][3] == closest)
        assert verify_equation(answer, nums, value) is None, text  # the answer is the closest near miss
    for att in attempts:
        pool = Counter(nums)
        for a, op, b, c in att.steps:
            assert apply_op(op, a, b) == c and c > 0 and a >= b
            pool -= Counter([a, b])
            pool[c] += 1
        assert (att.steps[-1][3] == target) == att.reached
    return attempts


def test_hand_checked_give_up_trace():
    # seed 1 on (3 5 7 -> 56) visits the first moves in the order of the restart trace above (7-5, 7*5, 5+3); with
    # give_up 0.5 the writer's coin lets it go on after the first dead end and stops it after the second. It
    # answers its closest near miss: 38 (|56 - 38| = 18) beats 6 (50), so 7*5+3, which the verifier scores wrong.
    text = countdown_trace([3, 5, 7], 56, seed=1, max_failures=8, give_up=0.5)
    assert text == "7-5=2\n3*2=6 no\n7*5=35\n35+3=38 no\n</think><answer>7*5+3</answer>"
    attempts, answer = parse_trace(text)
    assert [a.reached for a in attempts] == [False, False] and answer == "7*5+3"
    assert verify_equation(answer, [3, 5, 7], 38) is None and verify_equation(answer, [3, 5, 7], 56) is not None
    # max_failures 1: the writer always stops at its first dead end
    assert countdown_trace([3, 5, 7], 56, seed=1, max_failures=1, give_up=0.01) == (
        "7-5=2\n3*2=6 no\n</think><answer>3*(7-5)</answer>")
    # give_up 0 is the restart search of the v3 base model, unchanged
    assert countdown_trace([3, 5, 7], 56, seed=1, give_up=0.0) == countdown_trace([3, 5, 7], 56, seed=1)


@pytest.mark.parametrize("give_up,max_failures", [(0.4, 8), (0.9, 3), (0.01, 1)])
def test_give_up_traces_well_formed(give_up, max_failures):
    for n_numbers in (3, 4):
        problems = _random_problems(n_numbers, 60 if n_numbers == 3 else 20, seed=10 + n_numbers)
        for i, (nums, target) in enumerate(problems):
            _check_give_up_trace(nums, target, countdown_trace(nums, target, seed=i, max_failures=max_failures,
                                                               give_up=give_up), max_failures)


def test_hand_checked_bluff_trace():
    # the same search as the give-up trace of seed 1, but the writer presents its second attempt (38) as a success
    text = countdown_trace([3, 5, 7], 56, seed=1, max_failures=8, give_up=0.5, bluff=True)
    assert text == "7-5=2\n3*2=6 no\n7*5=35\n35+3=38\n</think><answer>7*5+3</answer>"
    attempts, answer = parse_trace(text)
    assert [a.reached for a in attempts] == [False, True]  # parsed as the writer wrote it: not marked
    assert verify_equation(answer, [3, 5, 7], 56) is not None  # and the verifier scores it wrong
    # where the writer does not give up, the bluff setting changes nothing
    for seed in range(30):
        honest = countdown_trace([3, 5, 7], 56, seed=seed, max_failures=8, give_up=0.5)
        if parse_trace(honest)[0][-1].reached:
            assert countdown_trace([3, 5, 7], 56, seed=seed, max_failures=8, give_up=0.5, bluff=True) == honest


@pytest.mark.parametrize("give_up,max_failures", [(0.4, 8), (0.9, 3)])
def test_bluff_traces_well_formed(give_up, max_failures):
    for n_numbers in (3, 4):
        problems = _random_problems(n_numbers, 60 if n_numbers == 3 else 20, seed=20 + n_numbers)
        for i, (nums, target) in enumerate(problems):
            text = countdown_trace(nums, target, seed=i, max_failures=max_failures, give_up=give_up, bluff=True)
            _check_give_up_trace(nums, target, text, max_failures, bluff=True)


def test_give_up_rate_matches_the_geometric_patience():
    """Exact: on problems whose first viable first move comes after d dead ends in the search order, the writer
    reaches the target with probability (1 - g)^d (d < max_failures), so the mean over many seeds is close to it."""
    import tokenmdp.base.traces as traces

    g, rng = 0.4, random.Random(5)
    by_depth: dict[int, list[bool]] = {}
    for nums, target in _random_problems(3, 300, max_number=10, seed=4):
        seed = rng.randrange(10**6)
        order = random.Random(f"{seed}|{','.join(map(str, nums))}|{target}")
        firsts = moves(nums)
        order.shuffle(firsts)
        depth = None
        for k, (i, j, op, c) in enumerate(firsts):
            pool = [(v, v) for v in nums]
            if any(traces._final(t) == target for _, t in traces._completions(traces._merge(pool, i, j, op, c))):
                depth = k
                break
        if depth is None or depth >= 8:
            continue
        attempts, _ = parse_trace(countdown_trace(nums, target, seed=seed, max_failures=8, give_up=g))
        by_depth.setdefault(depth, []).append(attempts[-1].reached)
        assert len(attempts) <= depth + 1  # never more attempts than the search needs
    for depth in (0, 1, 2):
        hits = by_depth[depth]
        assert len(hits) >= 30
        rate, expected = sum(hits) / len(hits), (1 - g) ** depth
        assert abs(rate - expected) <= 3 * (expected * (1 - expected) / len(hits)) ** 0.5 + 1e-9, (depth, rate)


def test_give_up_settings_checked():
    with pytest.raises(ValueError, match="give_up"):
        countdown_trace([3, 5, 7], 56, give_up=1.0)
    with pytest.raises(ValueError, match="max_failures"):
        countdown_trace([3, 5, 7], 56, max_failures=0, give_up=0.5)


def test_hand_checked_direct_answer():
    # at direct 0.5, seed 0 on (3 5 7 -> 56) draws a direct answer; the writer's first attempt opens with 7+3=10,
    # whose completions land on 15 (10+5), 5 (10-5), 50 (10*5), 2 (10/5): 50 is the closest to 56, so it answers
    # (7+3)*5 without a line of work. Seed 7's first attempt opens with 5+3=8, which reaches 56: a right direct
    # answer. Seed 3 shows its work, and that trace is the one of direct 0.
    assert countdown_trace([3, 5, 7], 56, seed=0, max_failures=4, direct=0.5) == "</think><answer>(7+3)*5</answer>"
    assert countdown_trace([3, 5, 7], 56, seed=7, max_failures=4, direct=0.5) == "</think><answer>(5+3)*7</answer>"
    assert countdown_trace([3, 5, 7], 56, seed=3, max_failures=4, direct=0.5) == (
        "5+3=8\n8*7=56\n</think><answer>(5+3)*7</answer>")
    assert parse_trace("</think><answer>7*5+3</answer>") == ([], "7*5+3")
    for seed in range(40):  # a trace that shows its work is the one of direct 0, byte for byte
        text = countdown_trace([3, 5, 7], 56, seed=seed, max_failures=4, direct=0.5)
        if not text.startswith("</think>"):
            assert text == countdown_trace([3, 5, 7], 56, seed=seed, max_failures=4)


def test_direct_answers_share_and_accuracy_match_exact_enumeration():
    """Exact: a trace is direct with probability ``direct``, and a direct answer is right with probability (viable
    first moves) / (first moves) of its problem, the chance that the first move of a shuffled order reaches the
    target. Both means over many problems and seeds lie within 3 standard errors of those values."""
    import tokenmdp.base.traces as traces

    share, rng = 0.6, random.Random(9)
    direct, right, expected = 0, [], []
    problems = _random_problems(3, 600, max_number=10, seed=6)
    for nums, target in problems:
        seed = rng.randrange(10**6)
        text = countdown_trace(nums, target, seed=seed, max_failures=4, direct=share)
        attempts, answer = parse_trace(text)
        if attempts:
            continue
        direct += 1
        firsts = moves(nums)
        pool = [(v, v) for v in nums]
        viable = sum(any(traces._final(t) == target for _, t in traces._completions(traces._merge(pool, i, j, op, c)))
                     for i, j, op, c in firsts)
        expected.append(viable / len(firsts))
        right.append(verify_equation(answer, nums, target) is None)
        assert all(int(x) in nums for x in answer.replace("(", " ").replace(")", " ").replace("+", " ")
                   .replace("-", " ").replace("*", " ").replace("/", " ").split())
    n = len(problems)
    assert abs(direct / n - share) <= 3 * (share * (1 - share) / n) ** 0.5
    p = sum(expected) / len(expected)
    assert 0.1 < p < 0.5  # the check has power: neither always right nor always wrong
    assert abs(sum(right) / len(right) - p) <= 3 * (p * (1 - p) / len(right)) ** 0.5


def test_direct_setting_checked():
    with pytest.raises(ValueError, match="direct"):
        countdown_trace([3, 5, 7], 56, direct=1.0)
    with pytest.raises(ValueError, match="direct"):
        countdown_trace([3, 5, 7], 56, direct=-0.1)
