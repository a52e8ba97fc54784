"""The verifiers under fuzzing (hypothesis): the Countdown and GSM8K verifiers and the Countdown step scorer, each
on 10,000 generated completions (`make test-slow`; 300 in `make test`) built from the answer grammar plus
adversarial pieces (huge numbers, exponents, deep nesting, non-ASCII digits, control characters, code, megabyte
answers). Each must never raise, never run the text as code (``eval``, ``exec`` and ``compile`` are booby-trapped
during the run), answer every call within :data:`BOUND_S`, and agree with an independent reference verdict on
well-formed answers."""

from __future__ import annotations

import ast
import builtins
import sys
import time
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenmdp.tasks import Problem, get_task

BOUND_S = 1.0  # the slowest call allowed, in CPU seconds of this process (a megabyte completion included), so a
# preempted call on a loaded machine does not count; the slowest measured are printed (tens of milliseconds)
SLOWEST: dict[str, float] = {}
# 10,000 completions a test in `make test-slow` (about 2 CPU minutes for the four); 300 in `make test`
SIZES = [pytest.param(300, id="300"), pytest.param(10_000, id="10000", marks=pytest.mark.slow)]


def fuzz(n, *strategies):
    """Run the decorated check on ``n`` generated examples (derandomized: the same examples every run)."""
    def wrap(check):
        return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                        suppress_health_check=list(HealthCheck))(given(*strategies)(check))()
    return wrap

ADVERSARIAL = [
    "9" * 5000, "2**99999", "10**10**10", "(" * 400 + "1" + ")" * 400, "-" * 300 + "1",
    "\u0663+\u0664",  # Arabic digits
    "１２", "\x00", "\x1b[31m", "\r\n", "__import__('os').system('echo pwned')", "exec('1')", "lambda: 1",
    "[1]*10**9", "1/0", "0/0", "3 = 3 = 3", "= 5", "1e309", "nan", "inf", "\U0001F600", "𝟙𝟚", "#### ",
    "<answer>", "</answer>", "<think>", "</think>", "\\boxed{", "}", "$", ",", ".", "1,000,000.5", "½",
]
pieces = st.one_of(st.sampled_from(ADVERSARIAL), st.text(max_size=30), st.integers(-10**6, 10**6).map(str),
                   st.sampled_from(list("+-*/()= \n\t0123456789")))
junk = st.lists(pieces, max_size=12).map("".join)


class Trap:
    """Booby-traps eval/exec, and compile to anything but a syntax tree (``ast.parse``, which runs nothing): a
    verifier that ran the text as code would fail the test."""

    def __enter__(self):
        self.saved = {n: getattr(builtins, n) for n in ("eval", "exec", "compile")}
        real_compile = self.saved["compile"]

        def trap(*_a, **_k):
            raise AssertionError("a verifier ran text as code")

        def tree_only(source, filename, mode, flags=0, *a, **k):
            if not flags & ast.PyCF_ONLY_AST:
                raise AssertionError("a verifier compiled text to code")
            return real_compile(source, filename, mode, flags, *a, **k)

        builtins.eval, builtins.exec, builtins.compile = trap, trap, tree_only

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(builtins, name, fn)


def timed(name, fn, *args):
    with Trap():
        t0 = time.process_time()
        out = fn(*args)
        spent = time.process_time() - t0
    SLOWEST[name] = max(SLOWEST.get(name, 0.0), spent)
    assert spent < BOUND_S, f"{name} took {spent:.3f} s"
    return out


# --- Countdown: a reference verdict from an expression tree built here, evaluated with Fractions ----------------
def expressions(nums):
    """Strategy: (text, value) of a random expression using each of ``nums`` once (value None on division by 0)."""

    def build(draw, items):
        if len(items) == 1:
            return str(items[0]), Fraction(items[0])
        cut = draw(st.integers(1, len(items) - 1))
        (lt, lv), (rt, rv) = build(draw, items[:cut]), build(draw, items[cut:])
        op = draw(st.sampled_from("+-*/"))
        if lv is None or rv is None or (op == "/" and rv == 0):
            value = None
        else:
            value = {"+": lv + rv, "-": lv - rv, "*": lv * rv, "/": lv / rv if op == "/" and rv else None}[op]
        return f"({lt}{op}{rt})", value

    @st.composite
    def strat(draw):
        order = draw(st.permutations(nums))
        return build(draw, list(order))

    return strat()


CD = get_task("countdown", num_count=3, low=1, high=10)


@st.composite
def countdown_cases(draw):
    nums = draw(st.lists(st.integers(1, 10), min_size=3, max_size=3))
    text, value = draw(expressions(nums))
    exact = value is not None and value.denominator == 1 and 1 <= value <= 10**6
    target = int(value) if exact else draw(st.integers(1, 100))
    if exact and draw(st.booleans()):
        target += draw(st.integers(1, 5))  # a wrong target for the same equation
    wrap = draw(st.sampled_from(["<answer>{}</answer>", "<think>{j}</think><answer>{}</answer>",
                                 "{j}<answer>{}</answer>{j}", "<answer>{j}</answer><answer>{}</answer>"]))
    noise = draw(junk).replace("<answer>", "").replace("</answer>", "")  # the answer is the LAST tag pair's
    completion = wrap.format(text, j=noise)
    reference = exact and value == target
    return Problem(id="fuzz", question="", answer=target, metadata={"nums": nums}), completion, reference


@pytest.mark.parametrize("n", SIZES)
def test_countdown_verifier_agrees_with_the_reference_on_valid_answers(n):
    @fuzz(n, countdown_cases())
    def check(case):
        problem, completion, reference = case
        score = timed("countdown valid", CD.score, problem, completion)
        assert score.correct == reference and score.formatted


@pytest.mark.parametrize("n", SIZES)
def test_countdown_verifier_and_step_scorer_never_raise(n):
    @fuzz(n, junk, st.lists(st.integers(1, 10), min_size=3, max_size=3), st.integers(1, 100))
    def check(text, nums, target):
        problem = Problem(id="fuzz", question="", answer=target, metadata={"nums": nums})
        for completion in (text, f"<answer>{text}</answer>", f"<think>{text}</think><answer>{text}</answer>"):
            score = timed("countdown junk", CD.score, problem, completion)
            assert isinstance(score.correct, bool) and score.reward in CD.rewards
            steps = timed("step scorer", CD.score_steps, problem, completion)
            assert all(0 <= s.end <= len(completion) for s in steps)
            timed("countdown answer_key", CD.answer_key, problem, completion)


# --- GSM8K: the reference is the last "#### <number>" read here with a regex and Fractions -----------------------
GSM = get_task("gsm8k")
NUMBER = st.one_of(st.integers(-10**7, 10**7).map(str), st.integers(0, 10**6).map(lambda n: f"{n:,}"),
                   st.fractions(max_denominator=8).map(lambda f: f"{float(f):.2f}"))


@st.composite
def gsm_cases(draw):
    gold = draw(st.integers(-1000, 10**6))
    said = draw(st.one_of(st.just(str(gold)), st.just(f"{gold:,}"), NUMBER))
    completion = f"{draw(junk).replace('####', '')}\n#### {said}"
    ref = Fraction(said.replace(",", "")) == gold
    return Problem(id="fuzz", question="", answer=str(gold)), completion, ref


@pytest.mark.parametrize("n", SIZES)
def test_gsm8k_verifier_agrees_with_the_reference_on_valid_answers(n):
    @fuzz(n, gsm_cases())
    def check(case):
        problem, completion, reference = case
        assert timed("gsm8k valid", GSM.score, problem, completion).correct == reference


@pytest.mark.parametrize("n", SIZES)
def test_gsm8k_verifier_never_raises(n):
    @fuzz(n, junk, st.integers(-1000, 10**6))
    def check(text, gold):
        problem = Problem(id="fuzz", question="", answer=str(gold))
        for completion in (text, f"#### {text}", f"\\boxed{{{text}}}", f"{text}\n#### {text}"):
            score = timed("gsm8k junk", GSM.score, problem, completion)
            assert isinstance(score.correct, bool)
            timed("gsm8k answer_key", GSM.answer_key, problem, completion)


@pytest.mark.parametrize("task", ["countdown", "gsm8k"])
def test_a_megabyte_answer_is_answered_in_bounded_time(task):
    big = "(" * 200_000 + "1+" * 200_000 + "9" * 300_000 + ")" * 200_000
    obj, problem = (CD, Problem("m", "", 24, {"nums": [3, 5, 7]})) if task == "countdown" else \
        (GSM, Problem("m", "", "7"))
    for completion in (f"<answer>{big}</answer>", f"#### {big}", big):
        assert not timed(f"{task} megabyte", obj.score, problem, completion).correct
    if task == "countdown":
        timed("step scorer megabyte", CD.score_steps, problem, f"<think>{big}</think><answer>1</answer>")


def test_report_the_slowest_calls(monkeypatch):
    """Every verifier entry point on every adversarial piece (and a megabyte of it) answers under BOUND_S: the
    kinds this test times are all recorded, each under the bound, and the slowest of each kind is printed (-s).
    The harness itself can fail: a call over the bound, and a verifier that runs text as code, are caught."""
    problem_cd = Problem(id="fuzz", question="", answer=24, metadata={"nums": [3, 5, 7]})
    problem_gsm = Problem(id="fuzz", question="", answer="7")
    mine = set()
    for piece in ADVERSARIAL + ["".join(ADVERSARIAL) * 300]:
        for completion in (piece, f"<answer>{piece}</answer>", f"#### {piece}"):
            for name, fn, problem in (("countdown score", CD.score, problem_cd),
                                      ("countdown answer_key", CD.answer_key, problem_cd),
                                      ("step scorer", CD.score_steps, problem_cd),
                                      ("gsm8k score", GSM.score, problem_gsm),
                                      ("gsm8k answer_key", GSM.answer_key, problem_gsm)):
                timed(name, fn, problem, completion)
                mine.add(name)
    print({k: f"{v * 1e3:.1f} ms" for k, v in sorted(SLOWEST.items())})
    assert len(mine) == 5 and mine <= set(SLOWEST) and all(SLOWEST[k] > 0 for k in mine)
    assert all(v < BOUND_S for v in SLOWEST.values())
    # the harness: a call over the bound fails, and so does running the text as code
    monkeypatch.setattr(sys.modules[__name__], "BOUND_S", 0.02)
    with pytest.raises(AssertionError, match="took"):
        timed("harness slow", _spin, 0.05)
    with pytest.raises(AssertionError, match="ran text as code"):
        timed("harness eval", lambda text: eval(text), "1+1")  # looked up at the call: the trap
    with pytest.raises(AssertionError, match="compiled text to code"):
        timed("harness compile", lambda text: compile(text, "<x>", "eval"), "1")
    SLOWEST.pop("harness slow", None), SLOWEST.pop("harness eval", None), SLOWEST.pop("harness compile", None)


def _spin(seconds):
    """Burn ``seconds`` of this process's CPU time."""
    t0 = time.process_time()
    while time.process_time() - t0 < seconds:
        pass
