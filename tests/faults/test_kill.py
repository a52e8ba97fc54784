"""Kill -9 at random moments: a seeded harness starts `tokenmdp train` in a subprocess, sends SIGKILL at a random
time (during start-up, rollout, update, checkpoint writing (widened by $TOKENMDP_TEST_WRITE_PAUSE), sample
logging), then runs `--resume` (killed again at random) until the run is done. Every time: the final parameters
equal those of an uninterrupted run bitwise, metrics.jsonl and samples.parquet hold each step exactly once, no
partial checkpoint is ever loaded, and the work lost per kill is at most the steps since the last checkpoint."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

STEPS = 6
PARITY = "test_trainer:ParityTask"  # importable: tests/ is on the path of the subprocess (PYTHONPATH below)


def _cmd(model_dir, out, resume):
    sets = [f"model.path={model_dir}", f"task.name={PARITY}", "rollout.prompts_per_step=2", "rollout.group_size=4",
            "rollout.max_new_tokens=6", f"run.steps={STEPS}", "run.save_every=1", "run.keep_last=2",
            "optim.lr=1e-3", "run.threads=1"]
    args = [sys.executable, "-m", "tokenmdp.cli", "train", "--algo", "grpo_nokl", "--out", str(out), "--no-progress"]
    args += [x for s in sets for x in ("--set", s)]
    return args + (["--resume"] if resume else [])


def _env(pause):
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": tests + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "TOKENMDP_TEST_WRITE_PAUSE": str(pause), "OMP_NUM_THREADS": "1"}


def _steps_logged(run):
    metrics = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    samples = pd.read_parquet(run / "samples.parquet")
    return metrics, samples.groupby("step").size().to_dict()


def kill_until_done(model_dir, out, rng, *, kills, pause=0.3, window=(0.5, 6.0)):
    """Kill the run ``kills`` times at seeded random moments, resuming after each, then let it finish; returns
    the kills that landed (the process was still running) and the steps each resume had to redo."""
    landed, lost, resume = 0, [], False
    for _ in range(kills):
        before = _last_checkpoint(out)
        proc = subprocess.Popen(_cmd(model_dir, out, resume), env=_env(pause), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(*window))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            landed += 1
        proc.wait()
        resume = True
        done_steps = _logged_steps(out)
        lost.append(max(0, done_steps - _last_checkpoint(out)))  # logged but not checkpointed: redone
        assert _last_checkpoint(out) >= before  # a kill never takes a finished checkpoint away
    proc = subprocess.run(_cmd(model_dir, out, True), env=_env(0), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return landed, lost


def _last_checkpoint(out):
    ck = out / "checkpoints"
    steps = [int(p.name.split("-")[1]) for p in ck.iterdir() if p.name.startswith("step-")
             and (p / "trainer_state.json").is_file()] if ck.is_dir() else []
    return max(steps, default=0)


def _logged_steps(out):
    file = out / "metrics.jsonl"
    return len(file.read_text().splitlines()) if file.is_file() else 0


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_random_dir):
    out = tmp_path_factory.mktemp("straight") / "run"
    proc = subprocess.run(_cmd(tiny_random_dir, out, False), env=_env(0), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _check(straight, out):
    a, b = (load_file(str(p / "final" / "model.safetensors")) for p in (straight, out))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise the uninterrupted run
    metrics, samples = _steps_logged(out)
    assert metrics == list(range(1, STEPS + 1))  # each step exactly once
    assert samples == _steps_logged(straight)[1]  # each step's samples exactly once
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no partial checkpoint


def test_two_kills_then_resume_equal_a_straight_run(tmp_path, tiny_random_dir, straight):
    landed, lost = kill_until_done(tiny_random_dir, tmp_path / "run", random.Random(1), kills=2)
    _check(straight, tmp_path / "run")
    assert landed >= 1 and max(lost) <= 1  # at most the steps since the last checkpoint (save_every=1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_many_kills_at_random_moments(tmp_path, tiny_random_dir, straight, seed):
    """Four seeded runs of six kills each (24 in all; many inside a checkpoint write, widened to 0.3 s)."""
    landed, lost = kill_until_done(tiny_random_dir, tmp_path / "run", random.Random(100 + seed), kills=6)
    _check(straight, tmp_path / "run")
    print(f"seed {seed}: {landed} kills landed, steps redone per kill {lost}")
    assert landed >= 2 and max(lost) <= 1
