"""Experiments on top of the trainer: side-by-side comparisons (:mod:`.compare`), the exact tier
(:mod:`.exact`), the paper's claims and their verdicts (:mod:`.claims`) and reports (:mod:`.report`, built from
run folders read by :mod:`.runs`). Held-out evaluation is :mod:`tokenmdp.train.heldout` and the statistics
:mod:`tokenmdp.stats` (lower layers, which the trainer uses too)."""

from __future__ import annotations

from tokenmdp.stats import best_of_n, majority_vote, mean_ci, pass_at_k

__all__ = ["best_of_n", "majority_vote", "mean_ci", "pass_at_k", "evaluate", "compare", "build_report"]


def __getattr__(name: str):
    """``evaluate``, ``compare`` and ``build_report`` are imported on first use (they pull in torch / matplotlib)."""
    if name == "evaluate":
        from tokenmdp.train.heldout import evaluate

        return evaluate
    if name == "compare":
        from tokenmdp.experiments.compare import compare

        return compare
    if name == "build_report":
        from tokenmdp.experiments.report import build_report

        return build_report
    raise AttributeError(name)
