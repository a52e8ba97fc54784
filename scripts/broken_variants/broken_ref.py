"""Broken variant: the LoRA reference is the adapted policy itself (adapter_disabled is a no-op)."""
import contextlib

import tokenmdp.train.learner as learner

learner.adapter_disabled = lambda adapter: contextlib.nullcontext()
