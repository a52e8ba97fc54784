"""The dataset task: TRL's GRPO quick-start pattern (a data set with prompt and answer columns, a correctness
reward and a format reward) through `tokenmdp train` and `tokenmdp compare`, verl's compute_score, chat-message
prompts, and one clear error for each bad input."""

from __future__ import annotations

import json

import pytest

from tokenmdp.errors import TokenMDPError
from tokenmdp.tasks import get_task

REWARDS = '''
import math
import re


def correctness(prompts, completions, completion_ids, answer, **kwargs):
    """1 when the last number of the completion is the answer."""
    out = []
    for c, a in zip(completions, answer):
        nums = re.findall(r"-?\\d+", c)
        out.append(1.0 if nums and nums[-1] == str(a) else 0.0)
    return out


def format_reward(completions, **kwargs):
    return [0.5 if re.search(r"\\d", c) else 0.0 for c in completions]


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": 1.0 if solution_str.strip() == ground_truth else 0.0}


def raises(completions, **kwargs):
    raise KeyError("answer_key")


def too_many(completions, **kwargs):
    return [1.0, 0.0]


def not_a_number(completions, **kwargs):
    return ["yes"]


def nan(completions, **kwargs):
    return [math.nan]


def skips(completions, **kwargs):
    return [None]
'''


@pytest.fixture
def files(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b), "source": "sums"} for a in range(6) for b in range(5)]
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def _task(data, *rewards, **kw):
    return get_task("dataset", path=str(data), rewards=[f"my_rewards:{r}" for r in rewards], **kw)


def test_rewards_combine_by_weight_and_correct_is_the_first_function(files):
    task = _task(files, "correctness", "format_reward", reward_weights=[1.0, 0.2])
    assert task.num_problems("test") == 3 and task.num_problems("train") == 27  # ceil(0.1 * 30) test rows
    test = task.problems("test")
    assert not {p.id for p in test} & {p.id for p in task.problems("train")}
    p = next(p for p in task.problems("train") if p.question == "2+3=")
    s = task.score(p, " it is 5")
    assert (s.reward, s.correct, s.formatted, s.parts) == (pytest.approx(1.1), True, True,
                                                          {"correctness": 1.0, "format_reward": 0.5})
    s = task.score(p, " 4")
    assert (s.reward, s.correct, s.formatted) == (pytest.approx(0.1), False, True)
    assert task.score(p, "none").reward == 0.0
    assert task.problems("train", n=60, seed=1)[:27] != task.problems("train", n=60, seed=2)[:27]
    assert len(task.problems("train", n=60)) == 60  # a stream: passes over the 27 rows in new orders


def test_verl_compute_score_and_a_none_value(tmp_path, files):
    rows = [{"prompt": "x", "data_source": "toy", "reward_model": {"ground_truth": "42"}, "extra_info": {"i": 1}}] * 4
    data = tmp_path / "verl.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), data)
    task = _task(data, "compute_score", "skips", test_size=1)
    p = task.problems("test")[0]
    assert task.score(p, " 42").correct and task.score(p, " 42").parts == {"compute_score": 1.0, "skips": 0.0}
    assert task.score(p, "41").reward == 0.0


def test_trls_quick_start_pattern_trains_and_compares(files, tiny_random_dir, tmp_path):
    """One `tokenmdp train` command; the same files through `tokenmdp compare`, whose report has verdicts."""
    from tokenmdp.cli import main

    opts = f"{{path: {files}, rewards: [my_rewards:correctness, my_rewards:format_reward]}}"
    out = tmp_path / "run"
    args = ["train", "--algo", "grpo", "--steps", "2", "--out", str(out), "--no-progress", "--set",
            f"model.path={tiny_random_dir}", "--set", "task.name=dataset", "--set", f"task.options={opts}",
            "--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=4", "--set",
            "rollout.max_new_tokens=4", "--set", "run.threads=1"]
    assert main(args) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["reward/mean"] == pytest.approx(r["reward/correctness"] + r["reward/format_reward"])
    cmp = tmp_path / "cmp"
    assert main(["compare", "--algos", "grpo_nokl,isft+-adv", "--seeds", "1", "--steps", "2", "--model",
                 str(tiny_random_dir), "--task", "dataset", "-o", f"path={files}", "-o",
                 "rewards=[my_rewards:correctness, my_rewards:format_reward]", "--eval-n", "3", "--k", "2",
                 "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--eval-every", "0",
                 "--threads", "1", "--workers", "1", "--out", str(cmp)]) == 0
    claims = json.loads((cmp / "claims.json").read_text())
    claims = claims.get("claims", claims)
    assert claims["C1"]["verdict"] in ("supported", "contradicted")  # measured, with the runs it needs


def test_chat_messages_need_the_chat_template(tmp_path, files, tiny_random):
    from tokenmdp.train.data import render_prompts

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"{i}+1="}], "answer": str(i + 1)})
                            + "\n" for i in range(5)))
    task = _task(data, "correctness", test_size=1)
    _, tok = tiny_random
    probs = task.problems("train")
    with pytest.raises(TokenMDPError, match="list of chat messages.*task.chat_template=true"):
        render_prompts(task, probs, template=None, tokenizer=tok, chat=False)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    assert render_prompts(task, probs[:1], template=None, tokenizer=tok, chat=True)[0] == \
        f"<user>{probs[0].question}<assistant>"


@pytest.mark.parametrize("fn,match", [
    ("raises", r"reward function 'raises' on row \d+ of .*sums.jsonl raised KeyError"),
    ("too_many", r"reward function 'too_many' on row \d+ .* returned 2 values for 1 completion"),
    ("not_a_number", r"reward function 'not_a_number' .* returned 'yes': a reward must be a finite number"),
    ("nan", r"reward function 'nan' .* returned nan"),
])
def test_a_bad_reward_function_is_one_error_naming_it_and_the_row(files, fn, match):
    task = _task(files, fn)
    with pytest.raises(TokenMDPError, match=match):
        task.score(task.problems("train")[0], "5")


def test_bad_data_and_options_are_one_error_each(tmp_path, files):
    no_prompt = tmp_path / "q.jsonl"
    no_prompt.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    with pytest.raises(TokenMDPError, match=r"no 'prompt' column .*; its columns are question, answer"):
        _task(no_prompt, "correctness")
    with pytest.raises(TokenMDPError, match="module 'my_rewards' has no function 'nope'"):
        _task(files, "nope")
    with pytest.raises(TokenMDPError, match="'reward_weights' has 1 values for 2 rewards"):
        _task(files, "correctness", "format_reward", reward_weights=[1.0])
    with pytest.raises(TokenMDPError, match="'correct_reward' is 'x'"):
        _task(files, "correctness", correct_reward="x")
    with pytest.raises(TokenMDPError, match="file not found"):
        _task(tmp_path / "missing.jsonl", "correctness")
