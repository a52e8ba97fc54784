"""Environments packaged as modules with ``load_environment(**kwargs)``, as a task: ``env:<module>``.

``<module>`` is an import name (``my_envs.guess``) or a ``.py`` file. ``load_environment(**options)`` returns one
environment object, of OpenEnv's shape (``openenv.core.env_server.interfaces.Environment``, or any object with the
same two methods):

- ``reset(seed=...)`` starts an episode and returns the first observation;
- ``step(action)`` answers the policy's turn and returns the next observation.

An observation is a string, or an object or dict with its text (the first of the fields ``text``, ``message``,
``content``, ``prompt``, ``observation`` that holds a string) and OpenEnv's ``reward`` and ``done``. An action is
the policy's text, wrapped in the environment's action class where it declares one (OpenEnv's
``Environment[ActionClass, ...]`` with one text field).

Problems are episodes: each is a seed (train seeds ``0 .. size-1``, test seeds ``size .. size+test_size-1``, so
the splits never meet), and its prompt is the first observation. An environment of finitely many rows
(``num_episodes``: a verifiers taskset, :mod:`tokenmdp.tasks.verifiers_env`) keeps its last ``test_size`` rows
for the test split.

Single turn (``task.env.kind`` none), a completion is one ``step``: its reward is the score. Multi-turn
(``task.env.kind=module``, :class:`ModuleEnv`), the policy and the environment alternate; the environment's text
goes into the context as an observation, which the policy never trains on. The episode's return is the sum of its
step rewards; an observation's ``parts`` (named reward parts) are logged as ``reward/<name>``. **Correct** means
the return reaches ``correct_threshold`` (default 1.0); **formatted** means it is above 0.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenmdp.errors import TokenMDPError
from tokenmdp.mdp.env import EnvStep, TokenEnv
from tokenmdp.tasks.task import Problem, Score, Task, check_split, shuffled_passes
from tokenmdp.tasks.verifiers_env import VerifiersEpisodes, is_verifiers_env

PREFIX = "env:"
TEXT_FIELDS = ("text", "message", "content", "prompt", "observation")


def load_module(spec: str):
    """The module ``spec`` names: a ``.py`` file, or an import name; one error when it cannot be loaded."""
    if spec.endswith(".py"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise TokenMDPError(f"environment module file not found: {path}")
        name = f"tokenmdp_env_{path.stem}"
        if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path.resolve()):
            return sys.modules[name]
        module_spec = importlib.util.spec_from_file_location(name, path.resolve())
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise TokenMDPError(f"environment module {path}: importing it raised {type(exc).__name__}: {exc}") from exc
        return module
    try:
        return importlib.import_module(spec)
    except ImportError as exc:
        raise TokenMDPError(f"environment module {spec!r} cannot be imported: {exc}") from None


def environment_factory(spec: str, options: dict):
    """A function making a new environment of module ``spec`` (``load_environment(**options)``) each call."""
    module = load_module(spec)
    load = getattr(module, "load_environment", None)
    if not callable(load):
        defined = sorted(n for n in vars(module) if not n.startswith("_"))[:12]
        raise TokenMDPError(f"environment module {spec!r} has no load_environment function (it defines: "
                            f"{', '.join(defined) or 'nothing'})")

    def make():
        try:
            env = load(**options)
        except TypeError as exc:
            raise TokenMDPError(f"{spec}.load_environment rejects the task options {options}: {exc}") from None
        if is_verifiers_env(env):  # a vf.Env: driven turn by turn (tokenmdp.tasks.verifiers_env)
            env = VerifiersEpisodes(env, spec)
        for method in ("reset", "step"):
            if not callable(getattr(env, method, None)):
                raise TokenMDPError(f"{spec}.load_environment returned a {type(env).__name__}, which has no "
                                    f"{method}() (an environment needs reset(seed=...) and step(action))")
        return env

    return make


def observation_text(obs: Any, where: str) -> str:
    """The text of an observation (see the module docstring)."""
    if isinstance(obs, str):
        return obs
    fields = obs if isinstance(obs, dict) else {n: getattr(obs, n) for n in TEXT_FIELDS if hasattr(obs, n)}
    for name in TEXT_FIELDS:
        if isinstance(fields.get(name), str):
            return fields[name]
    have = sorted(obs) if isinstance(obs, dict) else sorted(n for n in dir(obs) if not n.startswith("_"))[:12]
    raise TokenMDPError(f"{where}: the observation ({type(obs).__name__}) has no text field; expected one of "
                        f"{', '.join(TEXT_FIELDS)}, it has {', '.join(have)}")


def _close(env: Any) -> None:
    """End an episode that will get no more turns (OpenEnv's and verifiers' environments hold resources)."""
    close = getattr(env, "close", None)
    if callable(close):
        close()


def _field(obs: Any, name: str, default: Any) -> Any:
    return obs.get(name, default) if isinstance(obs, dict) else getattr(obs, name, default)


def action_maker(env: Any):
    """Text -> the environment's action: its declared action class's one text field, or the text itself."""
    for base in getattr(type(env), "__orig_bases__", ()):
        args = typing.get_args(base)
        cls = args[0] if args and inspect.isclass(args[0]) else None
        fields = getattr(cls, "model_fields", None)
        if fields is None:
            continue
        text = [n for n, f in fields.items() if n != "metadata" and f.annotation is str]
        if len(text) != 1:
            raise TokenMDPError(f"{type(env).__name__}'s action class {cls.__name__} needs one text field to hold "
                                f"the policy's turn; it has {', '.join(fields)}")
        return lambda s, cls=cls, name=text[0]: cls(**{name: s})
    return lambda s: s


class EnvModuleTask(Task):
    """An environment module's episodes as problems, scored by the environment's own rewards."""

    templates = ("plain",)

    def __init__(self, module: str, size: int = 1000, test_size: int = 100, correct_threshold: float = 1.0,
                 template: str | None = None, **options):
        for name, value in (("size", size), ("test_size", test_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TokenMDPError(f"task option {name!r} must be an integer >= 1, got {value!r}")
        self.module, self.options = module, dict(options)
        self.make = environment_factory(module, self.options)
        self.name = f"{PREFIX}{module}"
        self.template = self.resolve_template(template)
        rows = getattr(self.make(), "num_episodes", None)  # an environment of finitely many rows: split them
        if rows is not None:
            if not test_size < rows:
                raise TokenMDPError(f"task option 'test_size' {test_size} leaves no train rows of the {rows} of "
                                    f"{module}")
            size = rows - test_size
        self.size, self.test_size = size, test_size
        self.correct_threshold = float(correct_threshold)
        self._prompts: dict[int, str] = {}

    def _seeds(self, split: str) -> range:
        return range(self.size) if split == "train" else range(self.size, self.size + self.test_size)

    def start(self, env: Any, seed: int) -> str:
        """Reset ``env`` for the episode of ``seed``; its first observation's text."""
        return observation_text(env.reset(seed=seed), f"{self.module} reset(seed={seed})")

    def prompt(self, seed: int) -> str:
        if seed not in self._prompts:
            env = self.make()
            self._prompts[seed] = self.start(env, seed)
            _close(env)
        return self._prompts[seed]

    def problems(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[Problem]:
        seeds = list(self._seeds(check_split(split)))
        if split == "test" and n is not None and n > len(seeds):
            raise TokenMDPError(f"the {self.name} test split holds {len(seeds)} episodes, not {n} (raise "
                                "'test_size')")
        return [Problem(id=f"{self.module}-{s}", question=self.prompt(s), answer=s, metadata={"seed": s})
                for s in shuffled_passes(seeds, split, n, f"env-module-{split}-{seed}")]  # an episode's "answer"
        # is its seed: the environment holds the rest

    def num_problems(self, split: str = "train") -> int | None:
        return len(self._seeds(check_split(split)))

    def render(self, problem: Problem, template: str | None = None) -> str:
        self.resolve_template(template)
        return problem.question

    def verdict(self, total: float, reason: str, parts: dict | None = None) -> Score:
        return Score(float(total), total >= self.correct_threshold, total > 0, reason, parts or None)

    def score(self, problem: Problem, completion: str) -> Score:
        """One turn: a fresh episode of the problem's seed, ``completion`` as its one action."""
        env = self.make()
        self.start(env, problem.metadata["seed"])
        obs = env.step(action_maker(env)(completion))
        _close(env)
        reward = float(_field(obs, "reward", 0.0) or 0.0)
        return self.verdict(reward, f"{self.module}: reward {reward:g}", _field(obs, "parts", None))


class ModuleEnv(TokenEnv):
    """One multi-turn episode of an environment module (``task.env.kind=module``): each policy turn (ended by EOS,
    by the turn's stop token or by its token budget) goes to ``step`` as text; the environment's answer comes back
    as an observation, a line of its own (``"\\n" + text + "\\n"``); ``done`` ends the episode."""

    def __init__(self, task: EnvModuleTask, tokenizer, stop_ids: tuple[int, ...] = ()):
        self.task, self.tokenizer, self.stop_ids = task, tokenizer, stop_ids
        self.env: Any = None
        self.total, self.turns = 0.0, 0

    def reset(self, problem: Any, prompt_ids: Sequence[int]) -> list[int]:
        self.env = self.task.make()
        self.task.start(self.env, problem.metadata["seed"])
        self.act = action_maker(self.env)
        self.total, self.turns = 0.0, 0
        return list(prompt_ids)

    def _turn(self, action: Sequence[int], *, eos: bool) -> EnvStep:
        text = self.tokenizer.decode(list(action), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        obs = self.env.step(self.act(text))
        if eos and not _field(obs, "done", False) and callable(getattr(self.env, "finish", None)):
            obs = self.env.finish()  # an environment that scores at its end (verifiers) scores the turns so far
        self.turns += 1
        reward = float(_field(obs, "reward", 0.0) or 0.0)
        self.total += reward
        done = bool(_field(obs, "done", False)) or eos
        score = self.task.verdict(self.total, f"{self.task.module}: return {self.total:g} in {self.turns} turns",
                                  _field(obs, "parts", None))
        if done:
            _close(self.env)
            return EnvStep((), reward, True, False, {"score": score})
        said = observation_text(obs, f"{self.task.module} step {self.turns}")
        ids = self.tokenizer("\n" + said + "\n", add_special_tokens=False)["input_ids"]
        return EnvStep(tuple(int(i) for i in ids), reward, False, False, {"score": score})

    def step(self, action: Sequence[int]) -> EnvStep:
        return self._turn(action, eos=False)

    def on_eos(self, action: Sequence[int]) -> EnvStep:
        """The policy ended the episode: its last turn still goes to the environment, for its reward."""
        return self._turn(action, eos=True)


__all__ = ["EnvModuleTask", "ModuleEnv", "PREFIX", "environment_factory", "load_module", "observation_text"]
