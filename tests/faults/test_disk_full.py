"""Disk full (an injected ``OSError(ENOSPC)`` at the write) during a checkpoint or the final save: one clear error
naming the folder, the previous checkpoint intact, no temporary folder left, and ``--resume`` finishes the run,
bitwise as a straight run, once there is room."""

from __future__ import annotations

import errno

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
