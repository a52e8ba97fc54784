"""``compare --executor ray``: the same summary as the local executor, bit for bit; a Ray worker killed during a
run is retried, and the comparison finishes with nothing lost and nothing counted twice."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tokenmdp.errors import TokenMDPError

pytest.importorskip("ray")
pytestmark = pytest.mark.integrations  # make test-integrations (Ray's start and the workers' imports take a while)

STEPS = 6


def _args(model, out) -> list[str]:
    return ["compare", "--algos", "grpo,isft+", "--seeds", "1", "--steps", str(STEPS), "--model", str(model),
            "--task", "countdown", "-o", "num_count=3", "-o", "high=20", "--template", "compact",
            "--max-new-tokens", "8", "--eval-n", "4", "--k", "2", "--prompts-per-step", "2", "--group-size", "2",
            "--threads", "1", "--out", str(out)]


@pytest.fixture(scope="module")
def local_summary(tiny_random_dir, tmp_path_factory):
    from tokenmdp.cli import main

    out = tmp_path_factory.mktemp("local") / "cmp"
    assert main(_args(tiny_random_dir, out) + ["--workers", "1"]) == 0
    return (out / "summary.csv").read_bytes()


def test_ray_executor_gives_the_local_summary_bit_for_bit(tiny_random_dir, tmp_path, local_summary, capsys):
    from tokenmdp.cli import main

    out = tmp_path / "cmp"
    assert main(_args(tiny_random_dir, out) + ["--executor", "ray", "--workers", "2"]) == 0
    assert (out / "summary.csv").read_bytes() == local_summary
    info = json.loads((out / "compare.json").read_text())
    assert info["settings"]["executor"] == "ray" and info["fairness"]["seed-0"]["identical"]


def _ray_job_pids() -> list[int]:
    """Ray names a worker process after the task it runs (``ray::_ray_job``)."""
    found = subprocess.run(["pgrep", "-f", "ray::_ray_job"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def test_a_killed_ray_worker_is_retried_and_nothing_is_lost_or_counted_twice(tiny_random_dir, tmp_path,
                                                                             local_summary):
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "tokenmdp.cli", *_args(tiny_random_dir, out), "--executor", "ray", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    metrics = out / "runs" / "grpo" / "seed-0" / "metrics.jsonl"
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:  # a run part-way through
            pids = _ray_job_pids()
            if pids:
                killed = pids[0]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=600)
    assert killed is not None, "no Ray worker was seen running a job"
    assert proc.returncode == 0, stderr[-3000:]
    starts = re.findall(r"(?:done|left): ((?:train|eval) \S+)$", stderr, flags=re.M)  # a plain line per job start
    assert max(starts.count(s) for s in starts) == 2, starts  # the killed job started again, once
    assert (out / "summary.csv").read_bytes() == local_summary  # nothing lost, nothing counted twice
    for algo in ("grpo", "isft+"):
        steps = [json.loads(line)["step"] for line in (out / "runs" / algo / "seed-0" / "metrics.jsonl")
                 .read_text().splitlines()]
        assert steps == list(range(1, STEPS + 1)), algo
    timings = json.loads((out / "compare.json").read_text())["timings"]
    assert {"grpo/seed-0", "isft+/seed-0"} <= set(timings)


def test_no_ray_cluster_at_the_address_is_one_error():
    from tokenmdp.experiments.compare.ray_executor import start_ray

    with pytest.raises(TokenMDPError, match=r"could not reach a Ray cluster at --address 127\.0\.0\.1:9"):
        start_ray("127.0.0.1:9", cpus=1)


def test_address_without_the_ray_executor_is_refused():
    from tokenmdp.experiments.compare import make_settings

    with pytest.raises(TokenMDPError, match="--address applies to --executor ray only"):
        make_settings(address="127.0.0.1:6379")
    with pytest.raises(TokenMDPError, match="--executor: unknown executor 'slurm'"):
        make_settings(executor="slurm")
