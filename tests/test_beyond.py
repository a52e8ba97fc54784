"""The report's section beyond the degenerate MDP (tokenmdp.experiments.beyond) on hand-made comparison folders:
hand-computed slopes, cosines, paired differences and CPU minutes; each arm against the plain arm of its own
algorithm; steps without a gradient left out of the cosine; the two-LLM hints by kind of step; and Countdown's
step classifier by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tokenmdp.experiments.beyond import analyse
from tokenmdp.experiments.beyond.render import beyond_markdown
from tokenmdp.experiments.report import build_report
from tokenmdp.experiments.runs import collect
from tokenmdp.tasks.countdown import classify_step, parse_question

from test_report import eval_doc

T975_2 = 4.302652729911275


@pytest.mark.parametrize("line, kind", [
    ("3+5=8", "on a solution path"), ("3*5=15", "dead end"), ("3+5=9", "false arithmetic"),
    ("5+5=10", "unavailable operand"), ("hello", "not a step"), ("7-3=4\n4*5=20", "dead end"),
])
def test_classify_step_by_hand(line, kind):
    assert classify_step(line, [3, 5, 7], 56) == kind


def test_parse_question():
    assert parse_question("Numbers: 3 5 7. Target: 56.\n<think>") == ([3, 5, 7], 56)
    assert parse_question("countdown-3_5_7-56") == ([3, 5, 7], 56)
    assert parse_question("What is 2+2?") is None


def _run(root: Path, arm: str, seed: int, *, cfg: dict, inc: list[float], cos: list[float] | None, acc: float,
         records: list[tuple[str, float]], norms: list[float] | None = None, samples: list | None = None):
    path = root / "runs" / arm / f"seed-{seed}"
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg | {"run": {"seed": seed}}))
    rows = []
    for i, length in enumerate(inc):
        row = {"step": i + 1, "length/incorrect": length, "reward/mean": 0.3}
        if cos is not None:
            row["equiv/cosine_on_policy"] = cos[i]
            row["equiv/grad_norm_grpo"] = 1.0 if norms is None else norms[i]
        rows.append(json.dumps(row))
    (path / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    (path / "DONE").write_text("")
    (path / "eval.json").write_text(json.dumps(eval_doc(acc, acc, acc, 30.0, algo=arm, seed=seed)))
    (path / "eval_records.jsonl").write_text("".join(
        json.dumps({"id": pid, "pass@1": v, "samples": [{"completion": "3+5=8\nx", "correct": v > 0.5}]}) + "\n"
        for pid, v in records))
    if samples is not None:
        pq.write_table(pa.table({k: [s[i] for s in samples] for i, k in enumerate(
            ["step", "prompt", "completion", "correct"])}), path / "samples.parquet")


PLAIN = {"algo": {"name": "grpo_nokl"}}
HINT = {"algo": {"name": "grpo_nokl"}, "task": {"env": {"kind": "two_llm_hint"}}}
PPO = {"algo": {"name": "ppo"}}
PPO_PROCESS = {"algo": {"name": "ppo", "credit": "process"}}  # as a run folder's config.yaml writes overrides
PROMPT = "Numbers: 3 5 7. Target: 56.\n<think>"


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "cmp"
    ids = ["countdown-3_5_7-56", "countdown-1_2_3-6"]
    for seed in range(3):
        # plain GRPO: incorrect length 30, 32, 34 (slope +2), cosine 1 at every step
        _run(root, "grpo_nokl", seed, cfg=PLAIN, inc=[30, 32, 34], cos=[1.0, 1.0, 1.0], acc=[0.3, 0.4, 0.5][seed],
             records=[(ids[0], 0.5), (ids[1], 0.25)])
        # the two-LLM arm: slope seed (0, 1, 2); a step with no gradient logs cosine 0 and is left out
        _run(root, "hint", seed, cfg=HINT, inc=[5, 5 + seed, 5 + 2 * seed], cos=[1.0, 0.0, 0.9995],
             norms=[1.0, 0.0, 2.0], acc=[0.4, 0.4, 0.7][seed], records=[(ids[0], 0.75), (ids[1], 0.25)],
             samples=[(1, PROMPT, "3*5=15\nno", False), (1, PROMPT, "3+5=8\n", True), (3, PROMPT, "3+5=8\n", True)])
        _run(root, "hint-sft", seed, cfg={"algo": {"name": "isft+-"}, "task": {"env": {"kind": "two_llm_hint"}}},
             inc=[5, 5, 5], cos=None, acc=0.35, records=[(ids[0], 0.5), (ids[1], 0.25)])
        _run(root, "ppo", seed, cfg=PPO, inc=[30, 30, 30], cos=None, acc=0.3, records=[(ids[0], 0.5)])
        _run(root, "process-ppo", seed, cfg=PPO_PROCESS, inc=[30, 31, 32], cos=None, acc=0.35,
             records=[(ids[0], 0.5)])
    (root / "base_eval.json").write_text(json.dumps(eval_doc(0.2, 0.25, 0.5, 40.0)))
    (root / "base_eval_records.jsonl").write_text(json.dumps({"id": ids[0], "pass@1": 0.25}) + "\n"
                                                   + json.dumps({"id": ids[1], "pass@1": 0.25}) + "\n")
    timings = {f"{a}/seed-{s}": {"train_s": 70.0, "train_cpu_s": 60.0 * (1 + s)} for a in ("grpo_nokl", "hint")
               for s in range(3)}
    timings["hint/seed-2"] |= {"train_s": None, "train_cpu_s": 0.1}  # reused by a second comparison: not counted
    (root / "compare.json").write_text(json.dumps({"settings": {"algos": ["grpo_nokl", "hint", "ppo",
                                                                          "process-ppo"], "seeds": 3},
                                                   "timings": timings}))
    return root


def test_hand_computed_measurements(folder):
    result = analyse(collect([folder]))
    assert result["reference"] == "grpo_nokl" and list(result["arms"])[:2] == ["grpo_nokl", "ppo"]
    plain, hint = result["arms"]["grpo_nokl"], result["arms"]["hint"]
    assert plain["length_slope"]["mean"] == pytest.approx(2.0) and plain["cosine"]["holds"]
    assert hint["length_slope"]["per_seed"] == pytest.approx({0: 0.0, 1: 1.0, 2: 2.0})
    # slope differences (hint - plain) = -2, -1, 0: mean -1, sd 1, half width t * 1 / sqrt 3
    d = hint["length_slope"]["vs_reference"]
    assert d["mean"] == pytest.approx(-1.0) and d["high"] - d["mean"] == pytest.approx(T975_2 / 3 ** 0.5)
    # the no-gradient step is left out: per seed mean (1 + 0.9995) / 2, min 0.9995 -> holds at 0.999
    assert hint["cosine"]["mean"] == pytest.approx(0.99975) and hint["cosine"]["min"] == pytest.approx(0.9995)
    assert hint["cosine"]["steps"] == 6 and hint["cosine"]["holds"]
    # held-out: over seeds (0.4 - 0.3, 0.4 - 0.4, 0.7 - 0.5) = (0.1, 0, 0.2): mean 0.1
    assert hint["vs_reference"]["over_seeds"]["mean"] == pytest.approx(0.1)
    # over problems: (0.75 - 0.5, 0.25 - 0.25) = (0.25, 0): mean 0.125; against the base (0.5, 0): 0.25
    assert hint["vs_reference"]["over_problems"]["mean"] == pytest.approx(0.125)
    assert hint["vs_base"]["over_problems"]["mean"] == pytest.approx(0.25)
    assert hint["train_cpu_min"] == pytest.approx(1.5)  # (1 + 2) minutes / 2: the reused run is left out
    # process-ppo is measured against ppo (its own algorithm's plain arm), not grpo_nokl
    assert result["arms"]["process-ppo"]["reference"] == "ppo"
    assert result["arms"]["process-ppo"]["vs_reference"]["over_seeds"]["mean"] == pytest.approx(0.05)
    assert "cosine" not in result["arms"]["ppo"]
    # filtered SFT inside the two-LLM formulation against GRPO there: (0.35 - 0.4, 0.35 - 0.4, 0.35 - 0.7)
    sft = result["arms"]["hint-sft"]
    assert sft["vs_grpo_same_mdp"]["arm"] == "hint" and "vs_grpo_same_mdp" not in hint
    assert sft["vs_grpo_same_mdp"]["over_seeds"]["mean"] == pytest.approx(-0.15)
    # the hints: kinds of step by hand (3*5=15 is a dead end on 3 5 7 -> 56, 3+5=8 is on a path)
    classes = hint["hints"]["classes"]
    assert classes["first_step"]["dead end"] == {"share": 0.5, "accuracy": 0.0, "n": 3}
    assert classes["first_step"]["on a solution path"] == {"share": 0.5, "accuracy": 1.0, "n": 3}
    assert classes["last_step"]["on a solution path"]["share"] == 1.0
    assert hint["hints"]["heldout"] == [("3+5=8", 6)]
    md = beyond_markdown(result)
    assert "| hint | grpo_nokl, env two_llm_hint | 3 |" in md and "n/a (a critic's per-token GAE)" in md
    assert "**process-ppo**: against ppo" in md


def test_an_arm_without_its_evaluation_keeps_its_name(folder):
    """An arm's config names only its preset: a run whose eval.json is missing (killed in evaluation) is still
    the arm's, by its folder, never counted as the plain preset's run of that seed."""
    (folder / "runs" / "hint" / "seed-1" / "eval.json").unlink()
    col = collect([folder])
    assert [r.seed for r in col.runs_of("hint")] == [0, 1, 2]
    assert [r.seed for r in col.runs_of("grpo_nokl")] == [0, 1, 2]
    hint = analyse(col)["arms"]["hint"]
    assert hint["length_slope"]["per_seed"] == pytest.approx({0: 0.0, 1: 1.0, 2: 2.0})


def test_plain_comparisons_get_no_section(folder, tmp_path):
    import shutil

    for arm in ("hint", "hint-sft", "process-ppo"):
        shutil.rmtree(folder / "runs" / arm)
    assert analyse(collect([folder])) == {}
    out = build_report(folder)
    assert not (out / "beyond.json").exists() and "Beyond the degenerate MDP" not in (out / "summary.md").read_text()


def test_the_exact_two_llm_case_is_reported_from_exact_json(folder):
    from tokenmdp.experiments.beyond.render import exact_two_llm_markdown

    two = {"comparison": {"grpo_nokl": {"hint": {"cosine": 0.9977}, "degenerate": {"cosine": 0.9994}},
                          "isft+": {"hint": {"cosine": 0.9735}, "degenerate": {"cosine": 1.0}}},
           "variants": {"hint": {"identities": {"isft+-adv_vs_grpo_nokl_group_rel_diff": 1.3e-8,
                                                "env_rows_max_abs_update": 0.0, "transcript_sft_cosine": 0.5493}}}}
    md = exact_two_llm_markdown({"two_llm": two})
    assert "| grpo_nokl | 0.9977 | 0.9994 |" in md and "| isft+ | 0.9735 | 1.0000 |" in md
    assert "cosine 0.549 with grad J" in md and exact_two_llm_markdown({}) == ""
    (folder / "exact.json").write_text(json.dumps({"two_llm": two}))
    out = build_report(folder)
    assert "| isft+ | 0.9735 | 1.0000 |" in (out / "summary.md").read_text()
    assert "0.9735" in (out / "report.html").read_text()
