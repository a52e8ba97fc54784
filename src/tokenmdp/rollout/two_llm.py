"""The two-LLM formulation: a frozen base LLM is the environment, the trained policy probes it.

The policy writes a prompt augmentation (for Countdown: a hint line or a first move, one line ending in a newline)
and the frozen base model continues the episode from ``prompt + the policy's text so far + its own text so far``;
the task's verifier scores the *base's* text (what the policy wrote is never scored, so it cannot answer for the
base). The transition is stochastic and the environment is not the policy: states are (question, augmentations,
responses), not a bare prefix of the policy's tokens.

Variants (:data:`VARIANTS`)

* ``hint``: one policy turn, then the base writes the rest of the answer (up to EOS or ``base_tokens``); the
  episode ends there and is scored.
* ``alternate``: the policy writes a line, the base continues one line, ... The episode ends when the base writes
  EOS or a closing ``</answer>``, or at turn ``max_turns``, where the base writes the rest of the answer. A policy
  turn that starts the answer (``</think>`` or ``<answer>``) hands it to the base: the base continues from the
  text before that point and writes the rest, and the episode ends, so the answer is always the scored base's
  (``benchmarks/RESULTS.md``, "Beyond the degenerate MDP", has what it was without).

Tokenizers: the base's text becomes the observation in the *policy's* vocabulary. With the same vocabulary (a
copy of the base as the policy, the default) the base's token ids are the observation as they are. With a
different tokenizer the text is re-tokenised by the policy's tokenizer, and refused with one clear error when it
does not round-trip (a character the policy's tokenizer cannot write); the policy's text goes to the base the same
way, checked the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.env import EnvStep, TokenEnv
from tokenmdp.rollout.types import Engine, encode_prompts

VARIANTS = ("hint", "alternate")
ANSWER_END = "</answer>"
#: Text that starts the answer: a policy turn holding one hands the answer to the base (see ``alternate``)
ANSWER_STARTS = ("</think>", "<answer>")


def answer_cut(text: str) -> int | None:
    """Where ``text`` starts to answer (the first of :data:`ANSWER_STARTS`), or None.

    ``"8*7=56\\n</think><answer>(3+5)*7"`` -> 7; ``"3+5=8\\n"`` -> None."""
    found = [i for i in (text.find(tag) for tag in ANSWER_STARTS) if i >= 0]
    return min(found) if found else None


def _single_token(tokenizer, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers map every token to the same id."""
    return a is b or a.get_vocab() == b.get_vocab()


def retokenize(text: str, tokenizer, *, what: str) -> list[int]:
    """``text`` as ids of ``tokenizer`` (no special tokens), or one :class:`TokenMDPError` when the ids do not
    decode back to ``text``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if back != text:
        raise TokenMDPError(f"two-LLM environment: {what} {text!r} does not round-trip through the other model's "
                            f"tokenizer (it reads back as {back!r}); use a policy and a base model (config field "
                            f"'task.env.base_path') whose tokenizers can write each other's text, or the same "
                            f"tokenizer")
    return [int(i) for i in ids]


class BaseModelEnvironment:
    """What the episodes of one run share: the frozen base model and its sampler, both tokenizers, the task.

    Parameters
    ----------
    engine : a sampling engine over the frozen base model (:class:`~tokenmdp.rollout.fast.FastEngine`).
    base_tokenizer, policy_tokenizer : the two tokenizers (the same object, or equal vocabularies, is the fast path).
    task, template : the task whose ``render`` gives the base's prompt and whose ``score`` is the verifier.
    variant : ``"hint"`` or ``"alternate"``; ``max_turns``: the policy's turns in ``alternate``.
    base_tokens : the most tokens the base writes in one turn; ``base_temperature``: its sampling temperature.
    """

    def __init__(self, engine: Engine, base_tokenizer, policy_tokenizer, task, *, template: str | None = None,
                 variant: str = "hint", max_turns: int = 1, base_tokens: int = 64, base_temperature: float = 1.0,
                 seed: int = 0):
        if variant not in VARIANTS:
            raise TokenMDPError(f"config field 'task.env.kind': unknown two-LLM variant {variant!r}; choose "
                                f"{', '.join(VARIANTS)}")
        self.engine, self.base_tok, self.policy_tok, self.task = engine, base_tokenizer, policy_tokenizer, task
        self.template, self.variant, self.max_turns = template, variant, int(max_turns)
        self.base_tokens, self.base_temperature = int(base_tokens), float(base_temperature)
        self.same_vocab = same_vocabulary(base_tokenizer, policy_tokenizer)
        self.base_eos = set(getattr(engine, "eos_ids", None) or [base_tokenizer.eos_token_id])
        newline = _single_token(policy_tokenizer, "\n")
        self.stop_ids = () if newline is None else (newline,)
        self.base_newline = _single_token(base_tokenizer, "\n")
        self.seed, self.calls = int(seed), 0

    def begin(self, seed: int) -> None:
        """Seed the base's sampling for the next batch of episodes (a function of the step's seed)."""
        self.seed, self.calls = int(seed), 0

    def make_env(self) -> TwoLLMEnv:
        return TwoLLMEnv(self)

    def _to_base(self, ids: Sequence[int]) -> str:
        return self.policy_tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _observation(self, base_ids: list[int], text: str) -> tuple[int, ...]:
        if self.same_vocab:
            return tuple(base_ids)
        return tuple(retokenize(text, self.policy_tok, what="the base model's text"))

    def _sample(self, texts: list[str], *, final: bool) -> tuple[list[list[int]], list[str]]:
        """The base's continuation of each text: ids (cut at its first EOS, or newline unless ``final``) and text."""
        ids, mask = encode_prompts(self.base_tok, texts, add_special_tokens=getattr(self.engine,
                                                                                   "add_special_tokens", None))
        stops = () if final or self.base_newline is None else (self.base_newline,)
        seed = (self.seed * 7_919 + self.calls * 104_729) % (2**31 - 1)
        self.calls += 1
        out, _ = self.engine.sample_ids(ids, mask, n=1, max_new_tokens=self.base_tokens,
                                        temperature=self.base_temperature, seed=seed, stop_ids=stops)
        ends = self.base_eos | set(stops)
        rows = []
        for row in out.cpu().tolist():
            cut = next((k + 1 for k, t in enumerate(row) if t in ends), len(row))
            rows.append(row[:cut])
        texts_out = self.base_tok.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return rows, texts_out

    def step_batch(self, envs: Sequence[TwoLLMEnv], actions: Sequence[Sequence[int]]) -> list[EnvStep]:
        final = []
        for env, action in zip(envs, actions):
            hint = self._to_base(action)
            if not self.same_vocab:
                retokenize(hint, self.base_tok, what="the policy's text")
            cut = answer_cut(hint) if self.variant == "alternate" else None
            env.text += hint if cut is None else hint[:cut]  # an answer is the base's to write
            env.turn += 1
            final.append(self.variant == "hint" or env.turn >= self.max_turns or cut is not None)
        results: list[EnvStep | None] = [None] * len(envs)
        for want in (True, False):
            idx = [i for i, f in enumerate(final) if f == want]
            if not idx:
                continue
            rows, texts = self._sample([envs[i].text for i in idx], final=want)
            for i, row, text in zip(idx, rows, texts):
                results[i] = envs[i].answer(row, text, final=want)
        return results  # type: ignore[return-value]


class TwoLLMEnv(TokenEnv):
    """One episode of the two-LLM formulation (see the module docstring); made by
    :meth:`BaseModelEnvironment.make_env`."""

    def __init__(self, shared: BaseModelEnvironment):
        self.shared = shared
        self.stop_ids = shared.stop_ids
        self.problem: Any = None
        self.text = ""
        self.base_text = ""
        self.turn = 0

    def reset(self, problem: Any, prompt_ids: Sequence[int]) -> list[int]:
        s = self.shared
        self.problem = problem
        self.text = s.task.render(problem, template=s.template)
        self.base_text, self.turn = "", 0
        return list(prompt_ids)

    def step(self, action: Sequence[int]) -> EnvStep:
        return self.shared.step_batch([self], [action])[0]

    @classmethod
    def step_batch(cls, envs: Sequence[TokenEnv], actions: Sequence[Sequence[int]]) -> list[EnvStep]:
        return envs[0].shared.step_batch(envs, actions) if envs else []  # type: ignore[attr-defined]

    def answer(self, base_ids: list[int], text: str, *, final: bool) -> EnvStep:
        """The base's turn ``base_ids`` (``text``): the observation, and the verifier's score when it ends."""
        s = self.shared
        self.text += text
        self.base_text += text
        ended = final or (bool(base_ids) and base_ids[-1] in s.base_eos) or ANSWER_END in text
        obs = s._observation(base_ids, text)
        if not ended:
            return EnvStep(obs, 0.0, False, False, {})
        score = s.task.score(self.problem, self.base_text)
        return EnvStep(obs, float(score.reward), True, False, {"score": score, "base_text": self.base_text})

    def on_eos(self, action: Sequence[int]) -> EnvStep:
        """The policy ended the episode itself: the base has answered nothing, so the verifier scores its text so
        far (usually no answer: the task's lowest reward)."""
        score = self.shared.task.score(self.problem, self.base_text)
        return EnvStep((), float(score.reward), True, False, {"score": score, "base_text": self.base_text})


__all__ = ["BaseModelEnvironment", "TwoLLMEnv", "VARIANTS", "retokenize", "same_vocabulary"]
