"""Broken variant: the trainer ignores optim.micro_batch_tokens (its micro-batches are cut by rows only)."""
import tokenmdp.train.learner as learner

_real = learner.micro_batches


def micro_batches(rows, size, lengths=None, groups=None, prompt_lengths=None, *, max_tokens=None):
    return _real(rows, size, lengths, groups, prompt_lengths, max_tokens=None)


learner.micro_batches = micro_batches
