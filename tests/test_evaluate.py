"""Held-out evaluation: every metric against a hand-enumerated case (a scripted engine), the real Countdown verifier
with reference completions, a real tiny model through a rollout engine (reproducible), and `tokenmdp eval`."""

from __future__ import annotations

import json

import pytest
import torch

from tokenmdp.errors import TokenMDPError
from tokenmdp.train.heldout import evaluate, save_eval
from tokenmdp.rollout import Rollout
from tokenmdp.tasks.task import Problem, Score, Task


class ScriptedEngine:
    """Returns fixed completions: ``greedy[prompt]`` at temperature 0, ``samples[prompt][j]`` otherwise.

    Each completion of c characters is c + 1 tokens long (one token per character plus EOS)."""

    name = "scripted"

    def __init__(self, greedy, samples):
        self.greedy, self.samples, self.calls = greedy, samples, []

    def generate(self, prompts, *, n=1, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, seed=None):
        self.calls.append((len(prompts), n, temperature, seed))
        texts = [self.greedy[p] if temperature == 0 else self.samples[p][j] for p in prompts for j in range(n)]
        b, t = len(texts), max(len(x) for x in texts) + 1
        mask = torch.zeros(b, t, dtype=torch.long)
        for i, x in enumerate(texts):
            mask[i, : len(x) + 1] = 1
        return Rollout(prompt_ids=torch.ones(b, 1, dtype=torch.long), prompt_mask=torch.ones(b, 1, dtype=torch.long),
                       response_ids=mask.clone(), response_mask=mask, logprobs=torch.zeros(b, t),
                       terminated=torch.ones(b, dtype=torch.bool), truncated=torch.zeros(b, dtype=torch.bool),
                       prompts=[p for p in prompts for _ in range(n)], responses=texts)


class AnswerTask(Task):
    """Completions "A:<n>": correct when n is the answer (reward 1), formatted but wrong 0.1, otherwise 0."""

    name = "answer"
    templates = ("plain",)

    def problems(self, split="train", n=None, seed=0):
        return [Problem(f"p{i}", f"q{i}", a) for i, a in enumerate([5, 7, 9])]

    def render(self, problem, template=None):
        return problem.question

    def score(self, problem, completion):
        if not completion.startswith("A:"):
            return Score(0.0, False, False, "no A:")
        ok = completion[2:] == str(problem.answer)
        return Score(1.0 if ok else 0.1, ok, True, "ok" if ok else "wrong")

    def answer_key(self, problem, completion):
        return completion[2:] if completion.startswith("A:") else None


GREEDY = {"q0": "A:5", "q1": "A:1", "q2": "zz"}
SAMPLES = {
    "q0": ["A:5", "A:3", "A:3", "x", "A:3", "x"],  # c = 1 of 4; majority "3" (wrong); best-of-n "A:5" (right)
    "q1": ["A:7", "A:7", "A:2", "A:7", "A:7", "A:7"],  # c = 3 of 4; majority right
    "q2": ["no", "no", "no", "no", "no", "no"],  # c = 0; no answer to vote on
}


def test_metrics_hand_enumerated():
    task = AnswerTask()
    engine = ScriptedEngine(GREEDY, SAMPLES)
    res = evaluate(None, None, task, task.problems(), k=4, engine=engine, batch_size=8, max_new_tokens=8)
    m = res["metrics"]
    assert m["n_problems"] == 3 and m["k"] == 4
    assert m["greedy/pass@1"] == pytest.approx(1 / 3)
    assert m["greedy/format_rate"] == pytest.approx(2 / 3)
    assert m["greedy/length_correct"] == 4 and m["greedy/length_incorrect"] == pytest.approx((4 + 3) / 2)
    assert m["sampled/pass@1"] == pytest.approx((1 / 4 + 3 / 4 + 0) / 3)
    # pass@2: q0 1 - C(3,2)/C(4,2) = 1/2; q1 1 (one wrong sample only); q2 0
    assert m["pass@2"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["pass@4"] == m["pass@k"] == pytest.approx(2 / 3)
    assert m["pass@1"] == pytest.approx(m["sampled/pass@1"])
    assert m["majority@k"] == pytest.approx(1 / 3)
    assert m["best_of_k"] == pytest.approx(2 / 3)
    assert m["sampled/format_rate"] == pytest.approx(7 / 12)
    # lengths (chars + EOS): correct samples are all 4 tokens; incorrect: 4, 4, 2 | 4 | 3, 3, 3, 3
    assert m["sampled/length_correct"] == 4
    assert m["sampled/length_incorrect"] == pytest.approx(26 / 8)
    r0 = res["records"][0]
    assert r0["n_correct"] == 1 and not r0["majority_correct"] and r0["best_of_n_correct"]
    assert [s["answer_key"] for s in r0["samples"]] == ["5", "3", "3", None]
    # batch_size 8 = 8 greedy prompts a call, then 8 // 4 = 2 prompts x 4 samples a call
    assert [c[:3] for c in engine.calls] == [(3, 1, 0.0), (2, 4, 1.0), (1, 4, 1.0)]


def test_unbiased_pass_at_k_with_more_samples_than_k():
    task = AnswerTask()
    res = evaluate(None, None, task, task.problems(), k=2, n_samples=6, engine=ScriptedEngine(GREEDY, SAMPLES),
                   greedy=False)
    m = res["metrics"]
    assert "greedy/pass@1" not in m
    # q0: c = 1 of 6: 1 - C(5,2)/C(6,2) = 1 - 10/15; q1: c = 5 of 6: 1; q2: 0
    assert m["pass@2"] == m["pass@k"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert m["sampled/pass@1"] == pytest.approx((1 / 6 + 5 / 6) / 3)


def test_bad_arguments():
    task = AnswerTask()
    with pytest.raises(TokenMDPError, match="n_samples >= k"):
        evaluate(None, None, task, task.problems(), k=4, n_samples=2, engine=ScriptedEngine(GREEDY, SAMPLES))
    with pytest.raises(TokenMDPError, match="at least one problem"):
        evaluate(None, None, task, [], k=1, engine=ScriptedEngine(GREEDY, SAMPLES))


def test_countdown_reference_completions_score_perfectly():
    from tokenmdp.tasks import get_task

    task = get_task("countdown", template="compact")
    problems = task.problems("test", n=6, seed=0)
    refs = {task.render(p): task.reference(p) for p in problems}
    wrong = {task.render(p): "1+1=2\n</think><answer>1+1</answer>" for p in problems}
    engine = ScriptedEngine(refs, {p: [refs[p], wrong[p], refs[p]] for p in refs})
    m = evaluate(None, None, task, problems, k=3, engine=engine)["metrics"]
    assert m["greedy/pass@1"] == 1.0 and m["pass@k"] == 1.0 and m["majority@k"] == 1.0
    assert m["sampled/pass@1"] == pytest.approx(2 / 3)
    assert m["sampled/format_rate"] == 1.0


def test_real_tiny_model_is_reproducible(tiny_random, tmp_path):
    from tokenmdp.tasks import get_task

    model, tok = tiny_random
    task = get_task("countdown", template="compact")
    problems = task.problems("test", n=4, seed=0)
    seen = []
    kw = dict(k=2, engine="hf", max_new_tokens=12, batch_size=8, seed=3, progress=seen.append)
    a = evaluate(model, tok, task, problems, **kw)
    b = evaluate(model, tok, task, problems, **kw)
    assert sum(seen) == 2 * 4 * (2 + 1)
    assert [s["completion"] for r in a["records"] for s in r["samples"]] == \
           [s["completion"] for r in b["records"] for s in r["samples"]]
    assert len(a["records"]) == 4 and all(len(r["samples"]) == 2 for r in a["records"])
    m = a["metrics"]
    assert 0 <= m["greedy/pass@1"] <= 1 and 1 <= m["sampled/length"] <= 12
    # the values themselves, from the records, every completion scored again by the verifier
    greedy = [task.score(p, r["greedy"]["completion"]) for p, r in zip(problems, a["records"])]
    sampled = [[task.score(p, s["completion"]) for s in r["samples"]] for p, r in zip(problems, a["records"])]
    assert m["greedy/pass@1"] == pytest.approx(sum(g.correct for g in greedy) / 4)
    assert m["sampled/pass@1"] == pytest.approx(sum(sum(s.correct for s in row) / 2 for row in sampled) / 4)
    assert m["sampled/format_rate"] == pytest.approx(sum(s.formatted for row in sampled for s in row) / 8)
    lengths = [s["length"] for r in a["records"] for s in r["samples"]]
    assert m["sampled/length"] == pytest.approx(sum(lengths) / 8)
    assert a["settings"]["engine"] == "hf" and a["settings"]["k"] == 2
    path = save_eval(a, tmp_path / "eval.json", records=tmp_path / "rec.jsonl", algo="grpo", seed=1)
    doc = json.loads(path.read_text())
    assert doc["algo"] == "grpo" and "records" not in doc and doc["metrics"] == pytest.approx(m)
    assert len((tmp_path / "rec.jsonl").read_text().splitlines()) == 4


def test_task_answer_keys_group_equivalent_answers():
    from tokenmdp.tasks import get_task
    from tokenmdp.tasks.task import Problem

    cd = get_task("countdown", template="compact")
    p = Problem("c", "Numbers: 3 5 7. Target: 56.", 56, {"nums": [3, 5, 7]})
    key = cd.answer_key
    assert key(p, "<answer>(3+5)*7</answer>") == key(p, "x</think><answer>7*(5+3)</answer>") == (56, (3, 5, 7), True)
    assert key(p, "<answer>(3+5)*7 = 55</answer>") != key(p, "<answer>(3+5)*7</answer>")  # a wrong claim
    assert key(p, "<answer>3+5+7</answer>") == (15, (3, 5, 7), True)
    assert key(p, "<answer>3/0</answer>") is None and key(p, "no tag") is None
    gs = get_task("gsm8k", data_dir="/nonexistent")  # data is read lazily; answer_key needs none
    q = Problem("g", "q", "1000", {})
    assert gs.answer_key(q, "so #### 1,000.0") == gs.answer_key(q, "#### 1000") and gs.answer_key(q, "none") is None


def test_eval_cli(tiny_random_dir, tmp_path, capsys):
    from tokenmdp.cli import main
    from tokenmdp.tasks import get_task

    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(tiny_random_dir), "--task", "countdown", "--template", "compact", "--n", "3",
            "--k", "2", "--engine", "hf", "--max-new-tokens", "8", "--seed", "1"]
    assert main(args + ["--json", "--out", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["metrics"]["n_problems"] == 3 and doc["settings"]["k"] == 2 and doc["settings"]["template"] == "compact"
    full = json.loads(out.read_text())
    assert len(full["records"]) == 3 and full["metrics"] == doc["metrics"]
    # a local problems file: the first 2 of its lines
    task = get_task("countdown")
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(task.problem_to_dict(p)) + "\n" for p in task.problems("test", n=4, seed=5)))
    assert main(args[:-4] + ["--data", str(data), "--n", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["n_problems"] == 2
    assert main(args + ["--data", str(data), "--n", "9"]) == 2
    assert "holds only 4 problems" in capsys.readouterr().err
    data.write_text(data.read_text() + "{not json\n")
    assert main(args + ["--data", str(data)]) == 2
    assert f"{data}:5" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "nope"), "--task", "countdown"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["eval", "--help"]) == 0
