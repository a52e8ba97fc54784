"""`tokenmdp score` and `tokenmdp tasks list/show` through the CLI entry point."""

from __future__ import annotations

import json

import pytest

from tokenmdp.cli import main

CD_ROWS = [
    {"nums": [3, 5, 7], "target": 56, "completion": "3+5=8\n8*7=56\n</think><answer>(3+5)*7</answer>"},
    {"nums": [3, 5, 7], "target": 56, "completion": "<answer>3*5*7</answer>"},
    {"nums": [4, 4, 10, 10], "target": 24, "completion": "<answer>(10*10-4)/4</answer>"},
    {"id": "x", "question": "q", "answer": 2, "metadata": {"nums": [1, 1]}, "completion": "1+1=2 no tag"},
]


def write_jsonl(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines))
    return path


def run_json(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else None), out.err


def test_score_countdown_counts_and_output(tmp_path, capsys):
    inp = write_jsonl(tmp_path / "c.jsonl", CD_ROWS)
    out = tmp_path / "scored.jsonl"
    code, summary, _ = run_json(capsys, ["score", "--task", "countdown", "--input", str(inp), "--output", str(out),
                                         "--json"])
    assert code == 0
    assert {k: summary[k] for k in ("lines", "scored", "skipped", "correct", "formatted")} == {
        "lines": 4, "scored": 4, "skipped": 0, "correct": 2, "formatted": 3}
    assert summary["accuracy"] == 0.5 and summary["format_rate"] == 0.75
    assert summary["mean_reward"] == pytest.approx((1.0 + 0.1 + 1.0 + 0.0) / 4)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reward"] for r in rows] == [1.0, 0.1, 1.0, 0.0]
    assert rows[1]["reason"] == "value 105 is not the target 56"
    assert rows[0]["completion"] == CD_ROWS[0]["completion"]
    assert (rows[0]["steps_correct"], rows[0]["steps_total"]) == (2, 2)
    assert (rows[3]["steps_correct"], rows[3]["steps_total"]) == (1, 1)


def test_score_bad_line_stops_with_line_number(tmp_path, capsys):
    rows = CD_ROWS[:2] + [{"nums": [1, 2], "completion": "x"}] + CD_ROWS[2:]
    inp = write_jsonl(tmp_path / "c.jsonl", rows, ["{not json\n"])
    code = main(["score", "--task", "countdown", "--input", str(inp)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"error: {inp}:3: missing field 'target'"
    code, summary, _ = run_json(capsys, ["score", "--task", "countdown", "--input", str(inp), "--skip-bad", "--json"])
    assert code == 0 and (summary["lines"], summary["scored"], summary["skipped"]) == (6, 4, 2)
    assert summary["bad_lines"][1].startswith(f"{inp}:6: not valid JSON")
    inp = write_jsonl(tmp_path / "d.jsonl", [{"nums": [1, 1], "target": 2}])
    assert main(["score", "--task", "countdown", "--input", str(inp)]) == 2
    assert "d.jsonl:1: missing or non-string field 'completion'" in capsys.readouterr().err


def test_score_gsm8k_with_options_and_parquet(tmp_path, capsys):
    rows = [
        {"question": "2+2?", "answer": "2+2=4\n#### 4", "completion": "It is 4.\n#### 4"},
        {"question": "3+3?", "answer": "#### 6", "completion": "It is 6."},
        {"question": "1,000+200?", "answer": "#### 1,200", "completion": "\\boxed{1,200}"},
    ]
    inp = write_jsonl(tmp_path / "g.jsonl", rows)
    code, summary, _ = run_json(capsys, ["score", "--task", "gsm8k", "--input", str(inp), "--json"])
    assert (code, summary["correct"], summary["formatted"]) == (0, 1, 1)
    out = tmp_path / "g.parquet"
    code, summary, _ = run_json(capsys, ["score", "--task", "gsm8k", "-o", "extraction=any", "--input", str(inp),
                                         "--output", str(out), "--json"])
    assert (code, summary["correct"], summary["formatted"]) == (0, 3, 3)
    import pandas as pd

    assert pd.read_parquet(out)["correct"].tolist() == [True, True, True]


def test_score_human_output_and_errors(tmp_path, capsys):
    inp = write_jsonl(tmp_path / "c.jsonl", CD_ROWS)
    assert main(["score", "--task", "countdown", "--input", str(inp)]) == 0
    assert "accuracy 0.5000 (2)" in capsys.readouterr().out
    assert main(["score", "--task", "nope", "--input", str(inp)]) == 2
    assert "unknown task 'nope'; known tasks: arithmetic, countdown, dataset, gsm8k" in capsys.readouterr().err
    assert main(["score", "--task", "countdown", "--input", str(tmp_path / "missing.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["score", "--task", "countdown", "-o", "bad option", "--input", str(inp)]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_tasks_list_and_show(capsys):
    code, rows, _ = run_json(capsys, ["tasks", "list", "--json"])
    assert code == 0 and {r["name"]: r["templates"] for r in rows}["countdown"] == ["r1", "compact"]
    code, doc, _ = run_json(capsys, ["tasks", "show", "countdown", "--n", "3", "--template", "compact", "--seed",
                                     "2", "-o", "num_count=3", "--json"])
    assert code == 0 and len(doc["problems"]) == 3 and doc["template"] == "compact"
    for item in doc["problems"]:
        nums, target = item["problem"]["nums"], item["problem"]["target"]
        assert item["prompt"] == f"Numbers: {' '.join(map(str, nums))}. Target: {target}.\n<think>"
        assert item["reference_score"] == {"reward": 1.0, "correct": True}
    assert main(["tasks", "show", "countdown", "--n", "2"]) == 0
    assert "<answer>" in capsys.readouterr().out


def test_tasks_show_gsm8k(gsm8k_dir, capsys):
    code, doc, _ = run_json(capsys, ["tasks", "show", "gsm8k", "--n", "2", "--split", "test", "--template", "boxed",
                                     "-o", f"data_dir={gsm8k_dir}", "--json"])
    assert code == 0 and [i["reference_score"]["correct"] for i in doc["problems"]] == [True, True]
    assert "\\boxed{}" in doc["problems"][0]["prompt"]


@pytest.mark.parametrize("argv", [["score", "--help"], ["tasks", "--help"], ["tasks", "show", "--help"],
                                  ["tasks", "list", "--help"]])
def test_help(argv, capsys):
    assert main(argv) == 0
    assert "Usage" in capsys.readouterr().out
