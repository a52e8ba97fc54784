"""A tool environment: a calculator that writes the result of each arithmetic step the policy asks for.

The multi-turn case that is not two LLMs (verl's tool agent loop, OpenRLHF's ``step`` agents): the policy writes
its reasoning one step a turn; a turn ends at ``=`` (the environment's stop token), and the environment answers
with the exact value of the line's expression, as tokens of the policy's own vocabulary. On
Countdown's compact format::

    prompt       Numbers: 3 5 7. Target: 56.\\n<think>
    policy       3+5=            <- a turn, ended by the stop token "="
    environment  8               <- an observation: in the context, never the policy's action
    policy       \\n8*7=
    environment  56
    policy       \\n</think><answer>(3+5)*7</answer><EOS>

The line stays open after the value, so the policy can still mark a step that misses the target (the embedded
base model's search traces write ``" no"`` there and try another pair).

The state is the prompt plus the policy's turns *and* the calculator's answers, so it is no longer the
concatenation of the policy's actions (the first assumption of the reduction in arXiv 2505.13697), while the
transitions stay deterministic. The results are written as the task's step notation writes them
(:func:`tokenmdp.tasks.countdown_solve.format_number`: ``8``, ``-3``, ``7/2``). The expression is parsed, never
evaluated as code (:func:`tokenmdp.tasks.countdown_verify.parse_expression`); a line the calculator cannot read
(not an expression, a division by zero, the ``<answer>`` line) gets an empty observation and the policy goes on.
The episode ends when the policy writes EOS; the verifier scores the whole text, observations included (the
answer is the policy's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.env import EnvStep, TokenEnv
from tokenmdp.tasks.countdown_solve import format_number
from tokenmdp.tasks.countdown_verify import Reject, parse_expression

STOP = "="
ANSWER_TAG = "<answer>"
MAX_LINE = 64  # characters of a line the calculator reads; a longer one is not a step


def calculate(line: str) -> str | None:
    """The calculator's answer to one line ending in ``=`` (without it): the value, or None.

    ``"3+5"`` -> ``"8"``; ``"(7/2)*4"`` -> ``"14"``; ``"7/2"`` -> ``"7/2"``; ``"8-11"`` -> ``"-3"``;
    ``"</think><answer>(3+5)*7"`` -> None (the answer line is the policy's own); ``"hello"`` -> None.
    """
    text = line.strip()
    if not text or ANSWER_TAG in text or "<" in text or len(text) > MAX_LINE:
        return None
    try:
        value, literals, claimed = parse_expression(text)
    except (Reject, ZeroDivisionError, ValueError, OverflowError):
        return None
    if claimed is not None or len(literals) < 2:
        return None
    return format_number(value, False)


class CalculatorEnvironment:
    """What the episodes of one run share: the policy's tokenizer, the task (its verifier) and the stop token."""

    def __init__(self, tokenizer, task):
        ids = tokenizer(STOP, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise TokenMDPError(f"config field 'task.env.kind' is 'calculator': the policy's tokenizer writes "
                                f"{STOP!r} as {len(ids)} tokens, and a turn must end at one stop token")
        self.tokenizer, self.task = tokenizer, task
        self.stop_ids = (int(ids[0]),)

    def make_env(self) -> CalculatorEnv:
        return CalculatorEnv(self)

    def begin(self, seed: int) -> None:
        """Nothing to seed: the calculator is deterministic."""

    def encode(self, text: str) -> tuple[int, ...]:
        return tuple(int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


class CalculatorEnv(TokenEnv):
    """One episode of the calculator environment (see the module docstring)."""

    def __init__(self, shared: CalculatorEnvironment):
        self.shared = shared
        self.stop_ids = shared.stop_ids
        self.problem: Any = None
        self.text = ""  # the response so far: the policy's turns and the calculator's answers
        self.calls = 0  # steps the calculator answered

    def reset(self, problem: Any, prompt_ids: Sequence[int]) -> list[int]:
        self.problem, self.text, self.calls = problem, "", 0
        return list(prompt_ids)

    def step(self, action: Sequence[int]) -> EnvStep:
        """A turn whose text ends with ``=`` (the stop token, or a turn cut by its token limit right after one) gets
        the value of its line; any other gets nothing. Never terminal: the policy ends the episode with EOS."""
        s = self.shared
        self.text += s.decode(action)
        answer = None
        if self.text.endswith(STOP):
            answer = calculate(self.text[:-1].rsplit("\n", 1)[-1])
        if answer is None:
            return EnvStep((), 0.0, False, False, {"calculator_calls": self.calls})
        self.text += answer
        self.calls += 1
        return EnvStep(s.encode(answer), 0.0, False, False, {"calculator_calls": self.calls})

    def on_eos(self, action: Sequence[int]) -> EnvStep:
        """The policy wrote EOS: the verifier scores the episode's whole text."""
        self.text += self.shared.decode(action)
        score = self.shared.task.score(self.problem, self.text)
        return EnvStep((), float(score.reward), True, False, {"score": score, "calculator_calls": self.calls})


__all__ = ["CalculatorEnvironment", "CalculatorEnv", "calculate"]
