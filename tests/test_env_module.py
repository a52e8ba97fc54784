"""Environment modules (``load_environment(**kwargs)``, OpenEnv's reset/step shape) as a task, ``env:<module>``:
episodes as problems, one turn scored by the environment, and multi-turn episodes whose environment text goes
into the context as observations; one clear error for each bad module."""

from __future__ import annotations

import json

import pytest

from tokenmdp.errors import TokenMDPError
from tokenmdp.tasks import get_task

COUNTING = '''
class Counting:
    """Each turn's reward is the length of the policy's text / 100; the episode ends after `turns` turns."""

    def __init__(self, turns=2):
        self.turns, self.said = turns, []

    def reset(self, seed=None):
        self.said = []
        return {"text": f"Game {seed}: say anything.", "reward": None, "done": False}

    def step(self, action):
        self.said.append(action)
        done = len(self.said) >= self.turns
        return {"text": f"You said {len(action)} characters.", "reward": len(action) / 100, "done": done}


def load_environment(turns=2):
    return Counting(turns)
'''


@pytest.fixture()
def counting(tmp_path):
    path = tmp_path / "counting_env.py"
    path.write_text(COUNTING)
    return path


def test_episodes_are_problems_with_disjoint_splits_and_the_first_observation_as_prompt(counting):
    task = get_task(f"env:{counting}", size=6, test_size=3)
    train = task.problems("train", n=8, seed=1)
    test = task.problems("test", n=3)
    assert {p.metadata["seed"] for p in train} == set(range(6)) and len(train) == 8  # a second pass after 6
    assert {p.metadata["seed"] for p in test} == {6, 7, 8}
    assert task.problems("train", n=3, seed=1) == train[:3]  # prefix-stable
    assert task.render(test[0]) == f"Game {test[0].metadata['seed']}: say anything."
    assert task.num_problems("test") == 3
    with pytest.raises(TokenMDPError, match="test split holds 3 episodes, not 4"):
        task.problems("test", n=4)


def test_one_turn_is_scored_by_the_environment(counting):
    task = get_task(f"env:{counting}", size=4, test_size=2, correct_threshold=0.05)
    p = task.problems("test", n=1)[0]
    s = task.score(p, "abcdef")
    assert s.reward == pytest.approx(0.06) and s.correct and s.formatted
    s = task.score(p, "abc")
    assert s.reward == pytest.approx(0.03) and not s.correct and s.formatted
    assert not task.score(p, "").formatted


def test_multi_turn_episodes_alternate_policy_and_environment(counting, tiny_random):
    """The environment gets each decoded policy turn; its answer is an observation line; the return is the sum
    of its rewards, and the episode ends when it says done."""
    from tokenmdp.mdp.env import EpisodeLimits
    from tokenmdp.rollout.fast import FastEngine
    from tokenmdp.rollout.multiturn import run_episodes
    from tokenmdp.tasks.env_module import ModuleEnv

    model, tok = tiny_random
    task = get_task(f"env:{counting}", size=4, test_size=2, turns=2)
    problems = task.problems("train", n=2)
    made: list[ModuleEnv] = []

    def make():
        made.append(ModuleEnv(task, tok))
        return made[-1]

    ep = run_episodes(FastEngine(model, tok), tok, make, problems, [task.render(p) for p in problems], group_size=2,
                      limits=EpisodeLimits(3, 5, 64), seed=0)
    obs = ep.rollout.observation_mask
    for b, env in enumerate(made):
        said = env.env.said
        ids = ep.rollout.response_ids[b].tolist()
        observed = [i for i, m in zip(ids, obs[b].tolist()) if m]
        text = tok.decode(observed, clean_up_tokenization_spaces=False)
        if len(said) == 2:  # no EOS in the first turn: the environment answered it, then said done
            assert text == f"\nYou said {len(said[0])} characters.\n"
            assert int(ep.turns[b]) == 2
        assert float(ep.rewards[b]) == pytest.approx(sum(len(s) for s in said) / 100)
        assert ep.infos[b]["score"].reward == pytest.approx(float(ep.rewards[b]))
    assert any(len(env.env.said) == 2 for env in made)


def test_train_runs_an_environment_module_for_a_few_steps(counting, tiny_random_dir, tmp_path):
    from tokenmdp.cli import main

    out = tmp_path / "run"
    args = ["train", "--algo", "grpo", "--steps", "2", "--out", str(out), "--no-progress", "--set",
            f"model.path={tiny_random_dir}", "--set", f"task.name=env:{counting}", "--set",
            "task.options={size: 8, test_size: 2, turns: 2}", "--set", "task.env.kind=module", "--set",
            "task.env.max_turns=3", "--set", "task.env.turn_tokens=4", "--set", "rollout.prompts_per_step=2",
            "--set", "rollout.group_size=2", "--set", "run.threads=1"]
    assert main(args) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert all(r["env/observation_tokens"] > 0 and 1 < r["env/turns"] <= 2 for r in rows)
    assert all(0 < r["reward/mean"] <= 0.08 for r in rows)  # at most 2 turns of 4 characters


def test_bad_modules_get_one_clear_error(tmp_path, counting):
    bare = tmp_path / "bare_env.py"
    bare.write_text("def make_env():\n    return None\n")
    with pytest.raises(TokenMDPError, match=r"has no load_environment function \(it defines: make_env\)"):
        get_task(f"env:{bare}")
    no_step = tmp_path / "no_step_env.py"
    no_step.write_text("class E:\n    def reset(self, seed=None):\n        return 'hi'\n\n"
                       "def load_environment():\n    return E()\n")
    with pytest.raises(TokenMDPError, match=r"returned a E, which has no step\(\)"):
        get_task(f"env:{no_step}").problems("test", n=1)[0]
    with pytest.raises(TokenMDPError, match="cannot be imported"):
        get_task("env:no_such_module_here")
    with pytest.raises(TokenMDPError, match="rejects the task options"):
        get_task(f"env:{counting}", colour="red").problems("test", n=1)
    from tokenmdp.train.config import load_config

    with pytest.raises(TokenMDPError, match=r"'task.env.turn_stop' in --set is set, but only task.env.kind 'module'"):
        load_config(None, ["task.env.turn_stop=x"])
    with pytest.raises(TokenMDPError, match=r"is 'module': the task must be.*task.name=env:<module>, not 'countdown'"):
        load_config(None, ["task.env.kind=module"])


OPENENV_GUESS = '''
import re

from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import Action, Observation, State


class GuessAction(Action):
    message: str


class GuessObservation(Observation):
    text: str = ""


class GuessEnvironment(Environment[GuessAction, GuessObservation, State]):
    """Guess a digit: "higher" / "lower" after each wrong guess, reward 1 for the right one."""

    def __init__(self, max_turns=3):
        super().__init__()
        self.max_turns, self.target, self._state = max_turns, 0, State()

    def reset(self, seed=None, episode_id=None, **kwargs):
        self.target, self._state = (seed or 0) % 10, State(step_count=0)
        return GuessObservation(text="Guess my digit.")

    def step(self, action, timeout_s=None, **kwargs):
        self._state.step_count += 1
        found = re.findall(r"\\d", action.message)
        guess = int(found[0]) if found else None
        right = guess == self.target
        hint = "right" if right else ("higher" if guess is None or guess < self.target else "lower")
        return GuessObservation(text=hint, reward=1.0 if right else 0.0,
                                done=right or self._state.step_count >= self.max_turns)

    @property
    def state(self):
        return self._state


def load_environment(max_turns=3):
    return GuessEnvironment(max_turns)
'''


@pytest.mark.integrations
def test_an_openenv_environment_trains_for_a_few_steps(tiny_random_dir, tmp_path):
    """A server-side OpenEnv Environment, in process: its typed action built from the policy's text."""
    pytest.importorskip("openenv")
    from tokenmdp.cli import main

    path = tmp_path / "guess_env.py"
    path.write_text(OPENENV_GUESS)
    task = get_task(f"env:{path}", size=20, test_size=10)
    p = task.problems("test", n=1)[0]
    target = p.metadata["seed"] % 10
    assert task.score(p, f"is it {target}?").correct and not task.score(p, "no idea").formatted
    out = tmp_path / "run"
    assert main(["train", "--algo", "grpo", "--steps", "2", "--out", str(out), "--no-progress", "--set",
                 f"model.path={tiny_random_dir}", "--set", f"task.name=env:{path}", "--set",
                 "task.options={size: 20, test_size: 10}", "--set", "task.env.kind=module", "--set",
                 "task.env.turn_tokens=3", "--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=2",
                 "--set", "run.threads=1"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["env/turns"] >= 1 for r in rows)


VERIFIERS_COUNT = '''
import re

import verifiers.v1 as vf


class CountData(vf.TaskData):
    start: int
    turns: int = 3


class CountTask(vf.Task[CountData]):
    """Count on from `start`: the reward is the share of the policy's turns that say the next number."""

    @vf.reward(weight=1.0)
    async def counted(self, trace: vf.Trace) -> float:
        said = [m.content for m in trace.assistant_messages]
        right = [str(self.data.start + i + 1) in (s or "") for i, s in enumerate(said)]
        return sum(right) / self.data.turns

    @vf.reward(weight=0.5)
    async def digits(self, trace: vf.Trace) -> float:
        said = [m.content for m in trace.assistant_messages]
        return sum(bool(re.search(r"\\d", s or "")) for s in said) / self.data.turns


class CountConfig(vf.TasksetConfig):
    rows: int = 6


class CountTaskset(vf.Taskset[CountTask, CountConfig]):
    def load(self):
        for i in range(self.config.rows):
            yield CountTask(CountData(name=f"count-{i}", start=10 * i, prompt=f"Count on from {10 * i}."),
                            self.config.task)


class CountEnvConfig(vf.EnvConfig):
    player: vf.AgentConfig = vf.AgentConfig(harness={"id": "null"})


class CountEnv(vf.Env[CountEnvConfig]):
    async def run(self, task, agents):
        async with agents.player.interaction(task) as chat:
            segment = await chat.turn()
            for n in range(1, task.data.turns):
                if segment.terminated:
                    break
                segment = await chat.turn(f"After {task.data.start + n}?")


__all__ = ["CountTaskset", "CountEnv"]


def load_environment(**options):
    return vf.load_environment(vf.resolve_env_config({"taskset": {"id": __name__, **options}}))
'''


@pytest.mark.integrations
def test_a_verifiers_environment_is_scored_by_its_rubric_and_trains(tiny_random_dir, tmp_path):
    """A verifiers (0.4) multi-turn environment: its turns answered by the policy, its weighted rewards as the
    return and as reward/<name>; a few GRPO steps through `tokenmdp train`."""
    pytest.importorskip("verifiers.v1")
    from tokenmdp.cli import main

    path = tmp_path / "count_env.py"
    path.write_text(VERIFIERS_COUNT)
    task = get_task(f"env:{path}", test_size=2)
    assert (task.size, task.num_problems("test")) == (4, 2)  # 6 rows: the last 2 are the test split
    env = task.make()
    assert env.reset(seed=5) == {"text": "Count on from 50.", "reward": None, "done": False}
    assert env.step("51")["text"] == "After 51?"
    assert env.step("52, I think")["text"] == "After 52?"
    last = env.step("no")
    assert last["done"] and last["reward"] == pytest.approx(2 / 3 + 0.5 * 2 / 3)
    assert last["parts"] == pytest.approx({"counted": 2 / 3, "digits": 0.5 * 2 / 3})
    env.reset(seed=0)
    env.step("1")
    early = env.finish()  # the policy ended the episode (EOS): the turns so far are scored
    assert early["done"] and early["reward"] == pytest.approx(1 / 3 + 0.5 * 1 / 3)
    one = task.score(task.problems("test", n=1)[0], "41")  # one turn of three: scored when the run is cut
    assert one.reward == 0.0
    out = tmp_path / "run"
    assert main(["train", "--algo", "grpo", "--steps", "2", "--out", str(out), "--no-progress", "--set",
                 f"model.path={tiny_random_dir}", "--set", f"task.name=env:{path}", "--set",
                 "task.options={test_size: 2}", "--set", "task.env.kind=module", "--set", "task.env.max_turns=3",
                 "--set", "task.env.turn_tokens=3", "--set", "rollout.prompts_per_step=2", "--set",
                 "rollout.group_size=2", "--set", "run.threads=1"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert r["reward/mean"] == pytest.approx(r.get("reward/counted", 0.0) + r.get("reward/digits", 0.0))
        assert r["env/turns"] > 1 and r["env/observation_tokens"] > 0


def test_compare_runs_a_multi_turn_environment_module(counting, tiny_random_dir, tmp_path):
    """The same module through `tokenmdp compare`: every run's episodes and the held-out evaluation go through
    the environment, and the report has its verdicts."""
    from tokenmdp.cli import main

    out = tmp_path / "cmp"
    assert main(["compare", "--algos", "grpo_nokl,isft+-adv", "--seeds", "1", "--steps", "2", "--model",
                 str(tiny_random_dir), "--task", f"env:{counting}", "-o", "size=8", "-o", "test_size=3",
                 "-o", "correct_threshold=0.06", "--set", "task.env.kind=module", "--set", "task.env.max_turns=2",
                 "--set", "task.env.turn_tokens=4", "--eval-n", "3", "--k", "2", "--prompts-per-step", "2",
                 "--group-size", "2", "--eval-every", "0", "--threads", "1", "--workers", "1", "--out", str(out)]) == 0
    claims = json.loads((out / "claims.json").read_text())
    claims = claims.get("claims", claims)
    assert claims["C1"]["verdict"] in ("supported", "contradicted")
    records = [json.loads(x) for x in (out / "runs" / "grpo_nokl" / "seed-0" / "eval_records.jsonl")
               .read_text().splitlines()]
    assert len(records) == 3
