"""Update metrics: the meter that adds up a step's micro-batch metrics, and their combination over processes.

A process's metrics of a step come from :class:`MetricMeter` (losses summed within a minibatch, other metrics
weighted by tokens, extremes kept); with several processes :func:`reduce_over_processes` combines them (sums for
row counts, min / max for extremes, means otherwise). :func:`gather_parts` is the one collective behind both.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any


def gather_parts(accelerator, part: dict[str, list]) -> list[dict[str, list]]:
    """``part`` of every process, in process order (just ``[part]`` in a single process or without an
    ``accelerator``)."""
    acc = accelerator
    if acc is None or acc.num_processes <= 1:
        return [part]
    from accelerate.utils import gather_object

    return gather_object([part])


def total_over_processes(accelerator, count: int) -> int:
    """``count`` summed over the run's processes (``count`` itself in a single process)."""
    return int(sum(p["n"] for p in gather_parts(accelerator, {"n": int(count)})))


#: Update metrics that add up over processes (each process counts its own rows); ``*_min`` / ``*_max`` keep the
#: extreme; every other metric is averaged over processes.
SUMMED_OVER_PROCESSES = ("update/rows", "update/skipped_rows", "dpo/pairs")


def reduce_over_processes(accelerator, metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` of this process's share of a step combined with those of the other processes (unchanged in a
    single process): sums for :data:`SUMMED_OVER_PROCESSES`, min / max for ``*_min`` / ``*_max``, else means."""
    parts = gather_parts(accelerator, metrics)
    if len(parts) == 1:
        return metrics
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for p in parts for k in p):
        values = [p[key] for p in parts if isinstance(p.get(key), (int, float))]
        if not values:
            out[key] = None
        elif key in SUMMED_OVER_PROCESSES:
            out[key] = float(sum(values))
        elif key.endswith("_min"):
            out[key] = min(values)
        elif key.endswith("_max"):
            out[key] = max(values)
        else:
            out[key] = sum(values) / len(values)
    return out


SUMMED = ("policy/loss", "policy/pg_loss", "value/loss", "isft/loss", "dpo/loss", "update/loss")


class MetricMeter:
    """Averages metrics over micro-batches and minibatches.

    Keys in :data:`SUMMED` are summed within a minibatch (micro-batch losses add up to the minibatch loss) and
    averaged over minibatches; ``*_min`` / ``*_max`` keys keep the extreme; every other key is a mean weighted by
    the micro-batch's token count.
    """

    def __init__(self) -> None:
        self.weighted: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)
        self.extremes: dict[str, float] = {}
        self.current: dict[str, float] = defaultdict(float)
        self.summed: dict[str, list[float]] = defaultdict(list)

    def add(self, metrics: dict[str, float], weight: float) -> None:
        for key, value in metrics.items():
            if value is None:
                continue
            if key in SUMMED:
                self.current[key] += value
            elif key.endswith("_min"):
                self.extremes[key] = min(value, self.extremes.get(key, value))
            elif key.endswith("_max"):
                self.extremes[key] = max(value, self.extremes.get(key, value))
            else:
                self.weighted[key] += value * weight
                self.weights[key] += weight

    def end_minibatch(self, **extra: float) -> None:
        for key, value in {**self.current, **extra}.items():
            self.summed[key].append(value)
        self.current = defaultdict(float)

    def result(self) -> dict[str, float]:
        out = {k: self.weighted[k] / self.weights[k] for k in self.weighted if self.weights[k] > 0}
        out.update(self.extremes)
        out.update({k: sum(v) / len(v) for k, v in self.summed.items() if v})
        return out


__all__ = ["MetricMeter", "SUMMED", "SUMMED_OVER_PROCESSES", "gather_parts", "reduce_over_processes",
           "total_over_processes"]
