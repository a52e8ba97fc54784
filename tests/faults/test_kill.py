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


def _writing(out):
    """Whether a checkpoint is being written: a hidden temporary folder in checkpoints/."""
    ck = out / "checkpoints"
    try:
        return ck.is_dir() and any(p.name.startswith(".") for p in ck.iterdir())
    except FileNotFoundError:  # a folder renamed while listed
        return False


def kill_until_done(model_dir, out, rng, *, kills, pause=0.3, aim_at_write=0):
    """Kill the run ``kills`` times at seeded random moments, resuming after each, then let it finish. A kill is
    aimed either at start-up (0.3-3 s after launch) or inside training: once the run has logged a seeded number of
    steps, after a further 0-0.6 s (a step here takes about 0.3 s and a checkpoint write is held open ``pause``
    seconds). Returns how many kills landed, how many of them inside a checkpoint write (a hidden temporary folder
    present at the kill), and the steps each resume had to redo (logged but not checkpointed). The first
    ``aim_at_write`` kills wait for a checkpoint write to be under way instead (each must land inside one)."""
    landed, in_write, lost, resume = 0, 0, [], False
    for i in range(kills):
        before = _last_checkpoint(out)
        proc = subprocess.Popen(_cmd(model_dir, out, resume), env=_env(pause), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if i < aim_at_write:
            deadline = time.time() + 120
            while not _writing(out) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
        elif rng.random() < 0.25:
            time.sleep(rng.uniform(0.3, 3.0))
        else:
            target, deadline = rng.randint(_logged_steps(out), STEPS - 1), time.time() + 120
            while _logged_steps(out) < target and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            writing = _writing(out)
            os.kill(proc.pid, signal.SIGKILL)
            landed += 1
            in_write += writing
        proc.wait()
        resume = True
        lost.append(max(0, _logged_steps(out) - _last_checkpoint(out)))  # logged but not checkpointed: redone
        assert _last_checkpoint(out) >= before  # a kill never takes a finished checkpoint away
    proc = subprocess.run(_cmd(model_dir, out, True), env=_env(0), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return landed, in_write, lost


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
    assert not [p for p in out.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]  # no half-written final/


def test_two_kills_then_resume_equal_a_straight_run(tmp_path, tiny_random_dir, straight):
    landed, in_write, lost = kill_until_done(tiny_random_dir, tmp_path / "run", random.Random(1), kills=2,
                                             aim_at_write=1)
    _check(straight, tmp_path / "run")
    assert landed >= 1 and max(lost) <= 1  # at most the steps since the last checkpoint (save_every=1)
    assert 1 <= in_write <= landed  # the aimed kill landed inside a checkpoint write, and the resume got past it


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_many_kills_at_random_moments(tmp_path, tiny_random_dir, straight, seed):
    """Four seeded runs of six kills each (24 in all; two of each aimed inside a checkpoint write, held open 0.3 s,
    the others at random moments)."""
    landed, in_write, lost = kill_until_done(tiny_random_dir, tmp_path / "run", random.Random(100 + seed), kills=6,
                                             aim_at_write=2)
    _check(straight, tmp_path / "run")
    print(f"seed {seed}: {landed} kills landed ({in_write} inside a checkpoint write), steps redone per kill {lost}")
    assert landed >= 2 and max(lost) <= 1
    assert 2 <= in_write <= landed  # at least the two aimed kills landed inside a checkpoint write


@pytest.mark.slow
def test_compare_killed_mid_way_and_started_again_equals_a_straight_one(tmp_path, tiny_random_dir):
    """`tokenmdp compare` killed after its first run finished, then started again with the same arguments: the
    finished run is reused (its DONE untouched), the unfinished one is trained again, and summary.csv equals that of
    an uninterrupted comparison."""
    def cmd(out):
        return [sys.executable, "-m", "tokenmdp.cli", "compare", "--algos", "grpo_nokl,isft+", "--seeds", "1",
                "--steps", "3", "--model", str(tiny_random_dir), "--task", "countdown", "-o", "num_count=3", "-o",
                "high=20", "--template", "compact", "--max-new-tokens", "12", "--eval-n", "4", "--k", "2",
                "--prompts-per-step", "2", "--group-size", "2", "--threads", "1", "--workers", "1", "--out",
                str(out)]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert subprocess.run(cmd(straight), env=_env(0), capture_output=True, timeout=600).returncode == 0
    proc = subprocess.Popen(cmd(killed), env=_env(0), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = killed / "runs" / "grpo_nokl" / "seed-0" / "DONE"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stamp = first.stat().st_mtime_ns
    assert not (killed / "summary.csv").exists()
    assert subprocess.run(cmd(killed), env=_env(0), capture_output=True, timeout=600).returncode == 0
    assert first.stat().st_mtime_ns == stamp  # reused, not retrained
    a, b = (pd.read_csv(p / "summary.csv") for p in (straight, killed))
    pd.testing.assert_frame_equal(a, b)
