"""Sharded training (``run.fsdp``, FSDP2 over gloo in two CPU processes): the same run ends with the same
parameters as the unsharded two-process run, each process holds half of every parameter and optimizer moment,
a resumed sharded run equals the straight one, and what cannot be sharded is one clear error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from test_distributed import _launch

# the sharded runs (two processes each, 75 s in all on a 2-core machine) go with the learning runs (make test-slow),
# so that make test stays well inside its 10 minutes; the unsharded two-process runs stay (tests/test_distributed.py)
SHARDED_RUN = pytest.mark.slow

FSDP = "run.fsdp=true"


def _dir(path):
    path.mkdir()
    return path


def _final(out):
    rank0, rank1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    assert [k for k in rank0 if not torch.equal(rank0[k], rank1[k])] == []  # the processes agree
    return rank0


def _close(a, b, atol):
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, worst


@SHARDED_RUN
@pytest.mark.parametrize("algo,task", [("grpo", "test_trainer:ParityTask"), ("isft+", "dist_worker:RankZeroTask")])
def test_sharded_run_matches_unsharded(tmp_path, tiny_random_dir, algo, task):
    """With ``RankZeroTask`` process 1 keeps no row for filtered SFT: it joins process 0's scoring passes with
    passes of zero loss (the collectives of a sharded model must match)."""
    plain_out = _launch(_dir(tmp_path / "plain"), tiny_random_dir, algo, task)
    plain = _final(plain_out)
    out = _launch(_dir(tmp_path / "fsdp"), tiny_random_dir, algo, task, FSDP)
    sharded = _final(out)
    start = load_file(str(tiny_random_dir / "model.safetensors"))
    assert [k for k in start if torch.equal(start[k], sharded[k])] == []  # every parameter moved
    _close(sharded, plain, atol=1e-5)
    lines = [(o / "run" / "metrics.jsonl").read_text().splitlines() for o in (out, plain_out)]
    norms = [[json.loads(line).get("policy/grad_norm") for line in part] for part in lines]
    assert None not in norms[1]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)  # the norm over the shards is that of the whole gradient
    final = load_file(str(out / "run" / "final" / "model.safetensors"))  # save_pretrained of the gathered whole
    _close({k: sharded[k] for k in final}, final, atol=0.0)
    for rank in (0, 1):
        for step in (1, 2):
            shards = json.loads((out / f"shards{rank}-{step}.json").read_text())
            # every parameter and AdamW moment: this process's half (dim 0 split; 99 rows -> 50 and 49)
            assert all(0.49 <= f <= 0.51 for f in shards["params"] + shards["moments"]), shards
            assert len(shards["moments"]) == len(shards["params"])


@SHARDED_RUN
def test_sharded_resume_equals_straight_run(tmp_path, tiny_random_dir):
    straight = _final(_launch(_dir(tmp_path / "straight"), tiny_random_dir, "grpo", "test_trainer:ParityTask", FSDP))
    first = _launch(_dir(tmp_path / "split"), tiny_random_dir, "grpo", "test_trainer:ParityTask", FSDP, "run.steps=1")
    ckpt = first / "run" / "checkpoints" / "step-1"
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "model" / "model.safetensors").is_file()
    state = torch.load(ckpt / "optimizer.pt", weights_only=False)
    full = load_file(str(ckpt / "model" / "model.safetensors"))
    moment = state["state"]["model.embed_tokens.weight"]["exp_avg"]
    assert moment.shape == full["model.embed_tokens.weight"].shape  # the full moments, not a shard
    for f in first.glob("rank*.safetensors"):
        f.unlink()
    resumed = _final(_launch_again(first, tiny_random_dir, "--resume", FSDP))
    _close(resumed, straight, atol=1e-6)


def _launch_again(out, model_dir, *extra):
    """The launch of :func:`test_distributed._launch` into an existing folder (``--resume``), two steps."""
    import os
    import subprocess
    import sys

    from test_distributed import G, P, WORKER

    overrides = [f"model.path={model_dir}", "algo.name=grpo", "task.name=test_trainer:ParityTask",
                 f"rollout.prompts_per_step={P}", f"rollout.group_size={G}", "rollout.max_new_tokens=6",
                 "run.steps=2", "run.save_every=0", "optim.lr=1e-3", f"run.out={out / 'run'}", *extra]
    env = {"GLOO_SOCKET_IFNAME": "lo", **os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(out), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_one_process_is_one_clear_error(tiny_random_dir):
    from tokenmdp.algos.presets import get_algo
    from tokenmdp.errors import TokenMDPError
    from tokenmdp.train.config import load_config
    from tokenmdp.train.setup import check_processes

    cfg = load_config(None, [f"model.path={tiny_random_dir}", FSDP])
    with pytest.raises(TokenMDPError, match=r"'run.fsdp' is true but the run has one process"):
        check_processes(cfg, get_algo("grpo"), 1)
    check_processes(cfg, get_algo("grpo"), 2)


def test_one_process_train_refuses(tmp_path, tiny_random_dir):
    """Through ``train`` in this (single) process: refused before anything is written."""
    from tokenmdp.errors import TokenMDPError
    from tokenmdp.train.config import load_config
    from tokenmdp.train.trainer import train

    cfg = load_config(None, [f"model.path={tiny_random_dir}", FSDP, "run.steps=1", f"run.out={tmp_path / 'run'}",
                             "task.name=test_trainer:ParityTask"])
    with pytest.raises(TokenMDPError, match=r"run.fsdp"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting,named", [
    ("model.lora.enabled=true", "model.lora.enabled"),
    ("algo.name=ppo", "critic is not sharded"),
    ("run.equivalence=true", "run.equivalence"),
    ("rollout.engine=vllm", "rollout.engine 'vllm'"),
])
def test_what_cannot_be_sharded(tiny_random_dir, setting, named):
    from tokenmdp.errors import TokenMDPError
    from tokenmdp.train.config import load_config

    with pytest.raises(TokenMDPError, match=rf"'run.fsdp'.* is true: it cannot be combined with .*{named}"):
        load_config(None, [f"model.path={tiny_random_dir}", FSDP, setting])


def test_accelerate_config_parses():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp.yaml"))
    assert cfg.distributed_type.value == "MULTI_GPU" and cfg.num_processes == 2
