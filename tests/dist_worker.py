"""Worker of tests/test_distributed.py (started by torch.distributed.run): trains, then each rank saves its
parameters."""

import faulthandler
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


out, overrides = Path(sys.argv[1]), sys.argv[2:]


def on_step(step, record, c):
    if step == c.config.run.steps:
        rank = c.accelerator.process_index
        state = {k: v.detach().contiguous().clone() for k, v in c.unwrapped().state_dict().items()}
        save_file(state, str(out / f"rank{rank}.safetensors"))


# a run here takes about 15 s: past 120 s, print every thread's stack (where it waits) and exit
faulthandler.dump_traceback_later(120, exit=True)
torch.set_num_threads(1)
train(load_config(None, overrides), progress=False, callbacks=[on_step])
