"""Broken variant: the trainer ignores optim.micro_batch_size (the whole minibatch in one pass)."""
import tokenmdp.train.algorithms as a
import tokenmdp.train.learner as learner

_real = learner.micro_batches


def micro_batches(rows, size, lengths=None, groups=None, prompt_lengths=None, *, max_tokens=None):
    return _real(rows, 1 << 30, lengths, groups, prompt_lengths, max_tokens=max_tokens)


learner.micro_batches = micro_batches
a.micro_batches = micro_batches
