"""Disk full during a checkpoint, the final save, the metrics log or the samples table: one clear error naming the
folder or file, the previous checkpoint intact, no temporary file or half line left, and ``--resume`` finishes the
run, bitwise as a straight run, once there is room.

Where this process may mount (root), the run folder is a real small file system (a tmpfs sized from the straight
run's own files so that the write in question runs out of room half-way through); elsewhere, and always as well, an
``OSError(ENOSPC)`` is injected at the write."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import subprocess
import uuid

import pytest
import torch
from safetensors.torch import load_file

from tokenmdp.errors import TokenMDPError
from tokenmdp.train import checkpoint as ckpt_module
from tokenmdp.train.config import load_config
from tokenmdp.train.trainer import train

from test_trainer import SMALL  # noqa: E402  (tests/ is on the path: conftest.py; registers the parity task)


def _cfg(model_dir, out, steps=3):
    return load_config(None, [f"model.path={model_dir}", "algo.name=grpo_nokl", f"run.out={out}", *SMALL,
                              f"run.steps={steps}", "run.save_every=1", "run.keep_last=5"])


class FullDisk:
    """``torch.save`` (optimizer, scheduler, RNG states) fails with ENOSPC from its ``after``-th call on."""

    def __init__(self, after):
        self.calls, self.after, self.real = 0, after, torch.save

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls >= self.after:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real(*args, **kwargs)


PAGE = 4096


def _pages(folder):
    """Bytes that the files under ``folder`` take on a tmpfs (whole pages)."""
    return sum(math.ceil(p.stat().st_size / PAGE) * PAGE for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def small_disk(tmp_path):
    """``mount(size)``: a tmpfs of ``size`` bytes at a fresh folder (returned), or None where mounting is not
    allowed; ``grow(size)`` makes room on it. Unmounted at teardown."""
    mounted = []

    def mount(size):
        where = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
        where.mkdir()
        if os.geteuid() != 0:
            return None
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            return None
        mounted.append(where)
        return where

    def grow(where, size):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True, capture_output=True)

    mount.grow = grow
    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _full_disk_run(tmp_path, tiny_random_dir, small_disk, where):
    """A straight run, then the same run with its folder on a tmpfs with room for the straight run's files up to
    the write in question and half of that write: the write itself fails with ENOSPC from the kernel, not from an
    injection. Returns (straight, disk, run folder, the exception)."""
    straight = train(_cfg(tiny_random_dir, tmp_path / "straight"), progress=False)
    ck = straight / "checkpoints"
    if where == "checkpoint":  # step-1 checkpoint, the small files, half of the step-2 checkpoint
        before = _pages(ck / "step-1") + _pages(straight) - _pages(ck) - _pages(straight / "final")
        size = before + _pages(ck / "step-2") // 2
    else:  # everything but final/, and half of it
        size = _pages(straight) - _pages(straight / "final") // 2
    size += 16 * PAGE  # the small files still growing (metrics.jsonl, samples.parquet, state files)
    disk = small_disk(size)
    if disk is None:
        pytest.skip("mounting a tmpfs is not allowed here (not root): the injected ENOSPC test covers this")
    run = disk / "run"
    with pytest.raises(Exception) as err:
        train(_cfg(tiny_random_dir, run), progress=False)
    assert "No space left on device" in str(err.value) or "os error 28" in str(err.value) or \
        isinstance(err.value, RuntimeError), repr(err.value)  # torch.save's stream error on ENOSPC
    return straight, disk, run, err.value


@pytest.mark.parametrize("where", ["checkpoint", "final save"])
def test_a_real_full_disk_loses_nothing_and_resume_finishes(tmp_path, tiny_random_dir, small_disk, where):
    straight, disk, run, _ = _full_disk_run(tmp_path, tiny_random_dir, small_disk, where)
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert all(not name.startswith(".") for name in checkpoints)  # no half-written folder
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    assert not (run / "DONE").exists() and not (run / "final").exists()
    every = sorted(p.name for p in (straight / "checkpoints").iterdir())  # the final save comes after them all
    assert checkpoints == (["step-1"] if where == "checkpoint" else every) and len(every) >= 2
    small_disk.grow(disk, 64 * 2**20)  # room again
    train(_cfg(tiny_random_dir, run), resume=True, progress=False)
    a, b = (load_file(str(p / "final" / "model.safetensors")) for p in (straight, run))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("where", ["checkpoint", "final save"])
def test_a_real_full_disk_is_one_clear_error(tmp_path, tiny_random_dir, small_disk, where):
    _, _, _, exc = _full_disk_run(tmp_path, tiny_random_dir, small_disk, where)
    assert isinstance(exc, TokenMDPError), repr(exc)
    assert re.search(r"cannot write .*: No space left on device \(ENOSPC\); (the previous one is intact|nothing)",
                     str(exc)), str(exc)


@pytest.mark.parametrize("where", ["checkpoint", "final save"])
def test_disk_full_loses_nothing_and_resume_finishes(tmp_path, tiny_random_dir, monkeypatch, where):
    straight = train(_cfg(tiny_random_dir, tmp_path / "straight"), progress=False)
    run = tmp_path / "run"
    if where == "checkpoint":  # 3 torch.save calls per checkpoint: the 2nd checkpoint fails
        monkeypatch.setattr(ckpt_module.torch, "save", FullDisk(after=4))
    else:  # the final model's save_pretrained
        real = ckpt_module.save_model

        def full(path, *a, **k):
            if "final" in str(path) or ".final" in str(path):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, *a, **k)

        monkeypatch.setattr("tokenmdp.train.run_dir.save_model", full)
    with pytest.raises(TokenMDPError, match=r"cannot write .*: No space left on device \(ENOSPC\); the previous one "
                                            r"is intact|cannot write .*: No space left on device \(ENOSPC\); nothing"):
        train(_cfg(tiny_random_dir, run), progress=False)
    monkeypatch.undo()
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert all(not name.startswith(".") for name in checkpoints)  # no half-written folder
    assert not (run / "DONE").exists() and not (run / "final").exists()
    if where == "checkpoint":
        assert checkpoints == ["step-1"]
    train(_cfg(tiny_random_dir, run), resume=True, progress=False)
    a, b = (load_file(str(p / "final" / "model.safetensors")) for p in (straight, run))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _nearly_full(small_disk, free_pages: int):
    """A tmpfs with ``free_pages`` pages left (a filler file takes the rest), or a skip where mounting is not
    allowed."""
    disk = small_disk(64 * PAGE)
    if disk is None:
        pytest.skip("mounting a tmpfs is not allowed here (not root)")
    (disk / "filler").write_bytes(b"\0" * (64 - free_pages) * PAGE)
    return disk


def test_a_real_full_disk_while_logging_metrics_is_one_clear_error(tmp_path, tiny_random_dir, small_disk):
    """metrics.jsonl on a disk with room for the small files and a page of metrics: the step whose line does not fit
    stops the run with one error naming the file; no half line is left, every line before it is whole."""
    disk = _nearly_full(small_disk, 3)
    cfg = load_config(None, [f"model.path={tiny_random_dir}", "algo.name=grpo_nokl", f"run.out={disk / 'run'}",
                             *SMALL, "run.steps=40", "run.save_every=0", "run.log_samples=false"])
    with pytest.raises(TokenMDPError, match=r"cannot write step (\d+)'s metrics to .*metrics\.jsonl: No space left on "
                                            r"device \(ENOSPC\); the checkpoints already written are intact") as err:
        train(cfg, progress=False)
    failed = int(re.search(r"step (\d+)'s", str(err.value)).group(1))
    lines = (disk / "run" / "metrics.jsonl").read_text().splitlines()
    assert 1 < failed <= 40 and [json.loads(line)["step"] for line in lines] == list(range(1, failed))


def test_a_real_full_disk_while_saving_samples_is_one_clear_error(tmp_path, tiny_random_dir, small_disk):
    """samples.parquet on a disk with room for the small files but not for the samples table: one error naming
    it, no temporary file left behind."""
    disk = _nearly_full(small_disk, 3)
    cfg = load_config(None, [f"model.path={tiny_random_dir}", "algo.name=grpo_nokl", f"run.out={disk / 'run'}",
                             *SMALL, "run.steps=2", "run.save_every=1"])
    with pytest.raises(TokenMDPError, match=r"cannot write the sampled responses to .*samples\.parquet: .*No space "
                                            r"left on device \(ENOSPC\); the checkpoints already written are"):
        train(cfg, progress=False)
    assert not list((disk / "run").glob("*.tmp"))
