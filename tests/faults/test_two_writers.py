"""Two writers: a second `train` or `compare` into a folder that a live process writes refuses at once, naming
the folder and the process; the lock of a process killed with SIGKILL is taken over by the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tokenmdp.errors import TokenMDPError
from tokenmdp.locks import exclusive, lock_path

HOLD = ("import sys, time\nfrom tokenmdp.locks import exclusive\nwith exclusive(sys.argv[1]):\n"
        "    print('locked', flush=True)\n    time.sleep(60)\n")


def _holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_live_writer_is_named_and_a_killed_ones_lock_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    proc = _holder(folder)
    try:
        with pytest.raises(TokenMDPError, match=rf"run folder {folder} is in use by process {proc.pid} on "):
            with exclusive(folder):
                pass
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert lock_path(folder).is_file()  # left behind by the killed process ...
    with exclusive(folder):  # ... and taken over at once
        assert str(os.getpid()) in lock_path(folder).read_text()
    with exclusive(folder):  # released at the end of the block
        pass


def test_train_and_compare_refuse_a_folder_in_use(tmp_path, tiny_random_dir):
    from tokenmdp.experiments.compare import compare
    from tokenmdp.train.config import load_config
    from tokenmdp.train.trainer import train

    run, cmp = tmp_path / "run", tmp_path / "cmp"
    holders = [_holder(run), _holder(cmp)]
    try:
        with pytest.raises(TokenMDPError, match=f"run folder {run} is in use by process {holders[0].pid}"):
            train(load_config(None, [f"model.path={tiny_random_dir}", f"run.out={run}"]), progress=False)
        with pytest.raises(TokenMDPError, match=f"comparison folder {cmp} is in use by process {holders[1].pid}"):
            compare(["grpo"], 1, steps=1, model=str(tiny_random_dir), out=cmp, progress=False)
        assert not run.exists() and not cmp.exists()  # nothing written
    finally:
        for p in holders:
            p.kill()
            p.wait()
