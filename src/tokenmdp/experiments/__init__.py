"""Experiments on top of the trainer: held-out evaluation (:mod:`.evaluate`), statistics (:mod:`.stats`),
side-by-side comparisons (:mod:`.compare`), the equivalence diagnostic (:mod:`.equivalence`) and reports
(:mod:`.report`, built from run folders read by :mod:`.runs`)."""

from __future__ import annotations

from tokenmdp.experiments.stats import best_of_n, majority_vote, mean_ci, pass_at_k

__all__ = ["best_of_n", "majority_vote", "mean_ci", "pass_at_k", "evaluate", "compare", "build_report"]


def __getattr__(name: str):
    """``evaluate``, ``compare`` and ``build_report`` are imported on first use (they pull in torch / matplotlib)."""
    if name == "evaluate":
        from tokenmdp.experiments.evaluate import evaluate

        return evaluate
    if name == "compare":
        from tokenmdp.experiments.compare import compare

        return compare
    if name == "build_report":
        from tokenmdp.experiments.report import build_report

        return build_report
    raise AttributeError(name)
