"""The task interface: dataclasses, record reading with file/line errors, the registry and a user-defined task."""

from __future__ import annotations

import dataclasses
import json
import textwrap

import pytest

from tokenmdp.errors import TokenMDPError
from tokenmdp.tasks import Countdown, Problem, Score, StepScore, Task, get_task, known_tasks, register_task
from tokenmdp.tasks.task import read_records

USER_TASK = textwrap.dedent(
    '''
    from tokenmdp.tasks import Problem, Score, Task

    class Parity(Task):
        """Say whether a number is even."""
        name = "parity"
        templates = ("plain",)
        template = "plain"

        def __init__(self, size=10):
            self.size = size

        def problems(self, split="train", n=None, seed=0):
            base = 0 if split == "train" else 1000
            return [Problem(f"par-{base + i}", str(base + i), (base + i) % 2 == 0, {}) for i in range(n or self.size)]

        def render(self, problem, template=None):
            self.resolve_template(template)
            return f"Is {problem.question} even? "

        def score(self, problem, completion):
            said = completion.strip().lower()
            if said not in ("yes", "no"):
                return Score(0.0, False, False, "answer yes or no")
            ok = (said == "yes") == problem.answer
            return Score(float(ok), ok, True, "correct" if ok else "wrong")

    class NotATask:
        pass
    '''
)


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_parity_task.py").write_text(USER_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_parity_task"


def test_dataclasses():
    p = Problem("a", "q", 3, {"nums": [1]})
    assert p == Problem("a", "q", 3, {"nums": [1]}) and p != Problem("a", "q", 4, {"nums": [1]})
    assert hash(p) == hash(Problem("a", "q", 5, {"other": 1}))  # hash by id and question; dict metadata is fine
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.id = "b"
    s = Score(1.0, True, True, "correct")
    assert dataclasses.astuple(s) == (1.0, True, True, "correct", None)  # parts: none (one reward)
    st = StepScore("3+5=8", True, "ok", 0, 5)
    assert "3+5=8\n"[st.start : st.end] == st.text


def test_read_records_jsonl_parquet_and_errors(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"x": 1}\n\n{"x": 2}\n')
    assert list(read_records(path)) == [(1, {"x": 1}), (3, {"x": 2})]
    path.write_text('{"x": 1}\n{"x": \n')
    with pytest.raises(TokenMDPError, match=r"a\.jsonl:2: not valid JSON"):
        list(read_records(path))
    import pandas as pd

    pd.DataFrame({"x": [5, 6]}).to_parquet(tmp_path / "b.parquet")
    assert list(read_records(tmp_path / "b.parquet")) == [(1, {"x": 5}), (2, {"x": 6})]
    with pytest.raises(TokenMDPError, match="file not found"):
        list(read_records(tmp_path / "none.jsonl"))
    (tmp_path / "c.parquet").write_text("not parquet")
    with pytest.raises(TokenMDPError, match="cannot read Parquet"):
        list(read_records(tmp_path / "c.parquet"))


def test_registry_names_and_errors():
    assert {"countdown", "gsm8k"} <= set(known_tasks())
    assert isinstance(get_task("countdown"), Countdown)
    with pytest.raises(TokenMDPError,
                       match="unknown task 'cuontdown'; known tasks: arithmetic, countdown, dataset, gsm8k"):
        get_task("cuontdown")
    with pytest.raises(TokenMDPError, match="has no option 'num_cont'.*num_count"):
        get_task("countdown", num_cont=3)
    with pytest.raises(TokenMDPError, match="cannot import module 'no_such_mod_xyz'"):
        get_task("no_such_mod_xyz:Thing")
    with pytest.raises(TokenMDPError, match="has no attribute 'Nope'"):
        get_task("tokenmdp.tasks.countdown:Nope")
    with pytest.raises(TokenMDPError, match="must look like"):
        get_task("tokenmdp.tasks.countdown:")
    cd = Countdown()
    assert get_task(cd) is cd


def test_user_defined_task(user_module, tmp_path):
    task = get_task(f"{user_module}:Parity", size=4)
    problems = task.problems("test")
    assert [p.id for p in problems] == ["par-1000", "par-1001", "par-1002", "par-1003"]
    assert task.render(problems[1]) == "Is 1001 even? "
    assert [task.score(p, "yes").reward for p in problems] == [1.0, 0.0, 1.0, 0.0]
    assert task.score(problems[0], "maybe") == Score(0.0, False, False, "answer yes or no")
    assert task.score_steps(problems[0], "yes") == [] and task.reference(problems[0]) is None
    # the default dict round trip and loader
    path = tmp_path / "parity.jsonl"
    path.write_text("".join(json.dumps(task.problem_to_dict(p)) + "\n" for p in problems))
    assert task.load_problems(path) == problems
    path.write_text(json.dumps({"id": "x", "question": "1"}) + "\n")
    with pytest.raises(TokenMDPError, match=r"parity\.jsonl:1: missing field 'answer'"):
        task.load_problems(path)
    with pytest.raises(TokenMDPError, match="did not produce a tokenmdp.tasks.Task"):
        get_task(f"{user_module}:NotATask")
    with pytest.raises(TokenMDPError, match="unknown template 'fancy'.*known templates: plain"):
        task.render(problems[0], "fancy")
    register_task("user-parity", task_factory := type(task))  # a name no other test module registers
    try:
        assert "user-parity" in known_tasks() and isinstance(get_task("user-parity", size=2), task_factory)
    finally:
        from tokenmdp.tasks import registry

        registry._REGISTERED.pop("user-parity")


def test_abstract_task_cannot_be_instantiated():
    with pytest.raises(TypeError):
        Task()
