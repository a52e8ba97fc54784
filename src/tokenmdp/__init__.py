"""tokenmdp: post-training language models with RL on an explicit Markov decision process."""

from tokenmdp.errors import TokenMDPError

__version__ = "0.1.0"

__all__ = ["TokenMDPError", "__version__"]
