"""Non-finite steps: a NaN reward (so a NaN loss and gradient) skips the optimizer step, is counted in
``update/nonfinite_steps``, leaves the parameters as they were, and ``optim.max_nonfinite_steps`` in a row stop the
run with one error that names the intact last checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tokenmdp.errors import TokenMDPError
from tokenmdp.train.config import load_config
from tokenmdp.train.trainer import train

# the parity task of the trainer tests: a random tiny model passes it about half of the time
from test_trainer import SMALL  # noqa: E402  (tests/ is on the path: conftest.py; registers the task)


class NaNRewards:
    """Poisons the rewards of the steps in ``steps`` before the update (as a broken verifier would)."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_batch(self, learner, batch, step):
        if step in self.steps:
            batch.rewards[:] = math.nan
        return {}


def _cfg(tmp_path, model_dir, name, *extra):
    return load_config(None, [f"model.path={model_dir}", "algo.name=grpo_nokl", f"run.out={tmp_path / name}", *SMALL,
                              "run.steps=4", "run.save_every=1", "run.keep_last=10", *extra])


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _params(folder):
    return load_file(str(folder / "model" / "model.safetensors"))


def test_a_nan_step_is_skipped_and_counted(tmp_path, tiny_random_dir):
    run = train(_cfg(tmp_path, tiny_random_dir, "one"), progress=False, callbacks=[NaNRewards({2})])
    rows = _rows(run)
    assert [r["update/nonfinite_steps"] for r in rows] == [0, 1, 0, 0]
    before, after = _params(run / "checkpoints" / "step-1"), _params(run / "checkpoints" / "step-2")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the poisoned step changed nothing
    later = _params(run / "checkpoints" / "step-3")
    assert any(not torch.equal(after[k], later[k]) for k in after)  # training went on
    assert all(torch.isfinite(t).all() for t in later.values())
    assert (run / "DONE").is_file()


def test_too_many_in_a_row_stop_with_one_error(tmp_path, tiny_random_dir):
    cfg = _cfg(tmp_path, tiny_random_dir, "stop", "optim.max_nonfinite_steps=2")
    with pytest.raises(TokenMDPError, match=r"2 optimizer steps in a row had a non-finite loss or gradient \(up to "
                                            r"training step 3.*the last checkpoint, step 2, is intact"):
        train(cfg, progress=False, callbacks=[NaNRewards({2, 3})])
    run = tmp_path / "stop"
    assert not (run / "DONE").exists() and not (run / "final").exists()
    assert [r["update/nonfinite_steps"] for r in _rows(run)] == [0, 1, 1]
    assert not (run / "checkpoints" / "step-3").exists()  # the step that hit the limit is not saved
    first, second = _params(run / "checkpoints" / "step-1"), _params(run / "checkpoints" / "step-2")
    assert all(torch.equal(first[k], second[k]) for k in first)  # the last checkpoint: the last good parameters
    with pytest.raises(TokenMDPError, match="'optim.max_nonfinite_steps' in --set must be non-negative, got -1"):
        load_config(None, ["optim.max_nonfinite_steps=-1"])
