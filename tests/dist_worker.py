"""Worker of tests/test_distributed.py (started by torch.distributed.run): trains, then each rank saves its
parameters."""

import faulthandler
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_trainer import ParityTask  # noqa: E402
from tokenmdp.train.config import load_config  # noqa: E402
from tokenmdp.train.trainer import train  # noqa: E402

class RankZeroTask(ParityTask):
    """The parity verifier in process 0; in every other process no response is right, so their shares keep no
    row for filtered SFT and give GRPO groups of equal rewards (advantage 0): they only join the optimizer steps."""

    def score(self, problem, completion):
        score = super().score(problem, completion)
        if os.environ.get("RANK", "0") != "0":
            score = type(score)(reward=0.0, correct=False, formatted=True, reason="not process 0")
        return score


out, overrides = Path(sys.argv[1]), [a for a in sys.argv[2:] if a != "--resume"]
resume = "--resume" in sys.argv[2:]  # continue the run folder from its newest checkpoint


config = load_config(None, overrides)


def on_step(step, record, c):
    rank = c.accelerator.process_index
    if c.fsdp is not None:  # run.fsdp: what this process holds after the update (its shard only)
        from tokenmdp.train.sharding import local_fraction

        moments = [s["exp_avg"] for s in c.optimizer.state_dict()["state"].values() if "exp_avg" in s]
        shards = {"params": [local_fraction(p) for p in c.unwrapped().parameters()],
                  "moments": [local_fraction(m) for m in moments]}
        with open(out / f"shards{rank}-{step}.json", "w") as fh:
            json.dump(shards, fh)
    if step == config.run.steps:
        if c.fsdp is not None:  # every process gathers, each saves the whole
            from tokenmdp.train.sharding import full_state_dict

            state = full_state_dict(c.model, main=True)
        else:
            state = c.unwrapped().state_dict()
        state = {k: v.detach().contiguous().clone() for k, v in state.items()}
        save_file(state, str(out / f"rank{rank}.safetensors"))


if os.environ.get("TOKENMDP_TEST_LATE_RANK") == os.environ.get("RANK"):  # this process looks for the last checkpoint
    import time  # 3 s after the others: after the main process has written it, as a slow machine may

    import tokenmdp.train.run_dir as run_dir

    _latest = run_dir.latest_checkpoint

    def late_latest_checkpoint(*args, **kwargs):
        time.sleep(3)
        return _latest(*args, **kwargs)

    run_dir.latest_checkpoint = late_latest_checkpoint

# a run here takes about 15 s: past 120 s, print every thread's stack (where it waits) and exit
faulthandler.dump_traceback_later(120, exit=True)
torch.set_num_threads(1)
train(config, resume=resume, progress=False, callbacks=[on_step])
