"""Damaged files: a checkpoint whose model, optimizer or RNG state was truncated or bit-flipped after it was
written is detected by its checksums and skipped with a warning naming the file; the previous whole checkpoint is
used, and the resumed run still ends bitwise where a straight run ends. Every checkpoint damaged: one error."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tokenmdp.errors import TokenMDPError
from tokenmdp.train.checkpoint import damage, latest_checkpoint
from tokenmdp.train.config import load_config
from tokenmdp.train.trainer import train

from test_trainer import SMALL  # noqa: E402  (tests/ is on the path: conftest.py; registers the parity task)


def _cfg(model_dir, out, steps):
    return load_config(None, [f"model.path={model_dir}", "algo.name=grpo_nokl", f"run.out={out}", *SMALL,
                              f"run.steps={steps}", "run.save_every=1", "run.keep_last=5"])


def _truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _flip(file):
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_random_dir):
    return train(_cfg(tiny_random_dir, tmp_path_factory.mktemp("s") / "run", 4), progress=False)


@pytest.mark.parametrize("name, hurt", [("model/model.safetensors", _truncate), ("optimizer.pt", _flip),
                                        ("rng.pt", _truncate)])
def test_a_damaged_checkpoint_is_detected_and_the_previous_one_used(tmp_path, tiny_random_dir, straight, name,
                                                                    hurt):
    run = train(_cfg(tiny_random_dir, tmp_path / "run", 3), progress=False)
    hurt(run / "checkpoints" / "step-3" / name)
    assert name in damage(run / "checkpoints" / "step-3")
    with pytest.warns(UserWarning, match=rf"step-3: {name} does not match its checksum.*resuming from .*step-2"):
        train(_cfg(tiny_random_dir, run, 4), resume=True, progress=False)
    a, b = (load_file(str(p / "final" / "model.safetensors")) for p in (straight, run))
    assert all(torch.equal(a[k], b[k]) for k in a)  # redone from step 2: bitwise the straight run
    steps = [line.split(",")[0] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == ['{"step": 1', '{"step": 2', '{"step": 3', '{"step": 4']  # each step logged once


def test_every_checkpoint_damaged_is_one_error(tmp_path, tiny_random_dir):
    run = train(_cfg(tiny_random_dir, tmp_path / "run", 2), progress=False)
    for step in (1, 2):
        _flip(run / "checkpoints" / f"step-{step}" / "model" / "model.safetensors")
    with pytest.raises(TokenMDPError, match=r"every checkpoint under .* is damaged: .*step-2: model/model.safetensors"):
        latest_checkpoint(run / "checkpoints")
    with pytest.raises(TokenMDPError, match="is damaged"):
        train(_cfg(tiny_random_dir, run, 3), resume=True, progress=False)
