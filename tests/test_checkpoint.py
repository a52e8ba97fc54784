"""Checkpoints: complete contents, atomic writes (a crash leaves no folder that looks finished), pruning,
and exact restoration of optimizer, scheduler and random-generator states; run-folder logs survive a resume."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from tokenmdp.train import checkpoint as ckpt
from tokenmdp.train.log import MetricsLogger, SampleLogger, read_metrics


def _trained_optimizer(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ids = torch.randint(3, 50, (2, 6))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    return opt, sched


@pytest.fixture()
def model_copy(tiny_random):
    from tokenmdp.policy.tiny import build_tiny_random

    model, tok = build_tiny_random(seed=1)
    return model, tok


def test_checkpoint_contents_and_exact_restore(tmp_path, model_copy):
    model, tok = model_copy
    opt, sched = _trained_optimizer(model)
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(6)
    path = ckpt.save_checkpoint(tmp_path, 3, model=model, tokenizer=tok, optimizer=opt, scheduler=sched,
                                state={"baseline": 0.25})
    expected = (torch.rand(3), random.random(), np.random.rand())
    assert path == tmp_path / "step-3"
    names = {p.name for p in path.iterdir()}
    assert {"model", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"} <= names
    assert (path / "model" / "config.json").is_file() and (path / "model" / "model.safetensors").is_file()
    assert (path / "model" / "tokenizer.json").is_file()
    assert json.loads((path / "trainer_state.json").read_text()) == {"step": 3, "baseline": 0.25}

    found = ckpt.latest_checkpoint(tmp_path)
    assert found.step == 3 and found.state["baseline"] == 0.25
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    torch.manual_seed(0)
    found.load_into(optimizer=opt2, scheduler=sched2)
    # the RNG streams continue exactly where they were at save time
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]
    assert sched2.last_epoch == 1 and sched2.get_last_lr() == sched.get_last_lr()
    for group_a, group_b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(group_a["exp_avg"], group_b["exp_avg"])
        assert torch.equal(group_a["exp_avg_sq"], group_b["exp_avg_sq"])

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(found.model_dir)
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_crash_during_save_leaves_no_finished_folder(tmp_path, model_copy, monkeypatch):
    model, tok = model_copy
    opt, sched = _trained_optimizer(model)
    ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt)
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, model=model, optimizer=opt)
    monkeypatch.setattr(torch, "save", real_save)
    assert not (tmp_path / "step-2").exists()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    assert ckpt.latest_checkpoint(tmp_path).step == 1
    # a folder named like a checkpoint but without its state file is not one
    (tmp_path / "step-9").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).step == 1
    # the next save cleans the leftover temp folder
    ckpt.save_checkpoint(tmp_path, 3, model=model, optimizer=opt)
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_keep_last_prunes_oldest(tmp_path, model_copy):
    model, _ = model_copy
    for step in (2, 4, 6, 8):
        ckpt.save_checkpoint(tmp_path, step, model=model, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [6, 8]


def test_logs_drop_steps_after_resume_point(tmp_path):
    log = MetricsLogger(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.log(step, {"reward/mean": step / 10, "nan": float("nan"), "t": torch.tensor(2.5)})
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 4, "torn')  # a crash mid-line
    assert read_metrics(tmp_path / "metrics.jsonl")[0] == {"step": 1, "nan": None, "reward/mean": 0.1, "t": 2.5}
    MetricsLogger(tmp_path / "metrics.jsonl", resume_step=2)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]

    samples = SampleLogger(tmp_path / "samples.parquet")
    for step in (1, 2, 3):
        samples.add({"prompt": ["p", "q"], "completion": ["a", "b"], "reward": [1.0, 0.0], "correct": [True, False],
                     "length": [3, 4], "step": [step, step], "group": [0, 1], "algo": ["grpo"] * 2, "seed": [0, 0]})
    samples.flush()
    resumed = SampleLogger(tmp_path / "samples.parquet", resume_step=2)
    assert len(resumed) == 4 and resumed.columns["step"] == [1, 1, 2, 2]
    import pandas as pd

    frame = pd.read_parquet(tmp_path / "samples.parquet")
    assert len(frame) == 6 and list(frame.columns)[:3] == ["prompt", "completion", "reward"]
