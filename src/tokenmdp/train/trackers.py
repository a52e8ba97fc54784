"""Experiment trackers (``run.report_to``): TensorBoard, trackio, Weights & Biases and MLflow, any number at once.

They run through accelerate's own tracker classes (``Accelerator(log_with=...)``), and each writes inside the run
folder, so a run on a machine without network keeps its logs beside ``metrics.jsonl``:

- ``tensorboard``: event files under ``tokenmdp/`` (the project's name);
- ``trackio``: its SQLite store under ``trackio/`` (``TRACKIO_DIR``, unless that is set already; trackio reads it
  once a process, so a comparison's runs share ``<out>/trackio``);
- ``wandb``: offline, under ``wandb/`` (``wandb sync`` uploads it later); ``WANDB_MODE=online`` logs live;
- ``mlflow``: a local SQLite store, ``mlflow.db`` with ``mlartifacts/`` beside it, unless ``MLFLOW_TRACKING_URI``
  names another (MLflow 3 refuses new file stores, ``mlruns/``, unless told to allow them).

Every metric goes out under tokenmdp's name and, where TRL logs the same quantity, under TRL's name too
(:data:`TRL_NAMES`), so dashboards built for TRL's GRPOTrainer read tokenmdp runs. Sampled completions go out as a
table (step, prompt, completion, reward, correct) where the tracker has tables (trackio, wandb, mlflow), about ten
times a run.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from tokenmdp.errors import TokenMDPError

#: tracker -> (module it imports, pip install line)
INSTALL = {"tensorboard": ("tensorboard", "pip install tensorboard"), "trackio": ("trackio", "pip install trackio"),
           "wandb": ("wandb", "pip install wandb"), "mlflow": ("mlflow", "pip install mlflow")}

#: tokenmdp metric -> TRL GRPOTrainer's name for the same quantity
TRL_NAMES = {
    "reward/mean": "reward",
    "reward/std": "reward_std",
    "reward/frac_zero_std": "frac_reward_zero_std",
    "policy/kl_ref": "kl",
    "policy/entropy": "entropy",
    "policy/clip_frac": "clip_ratio/region_mean",
    "policy/clip_frac_low": "clip_ratio/low_mean",
    "policy/clip_frac_high": "clip_ratio/high_mean",
    "length/mean": "completions/mean_length",
    "length/truncated": "completions/clipped_ratio",
    "policy/grad_norm": "grad_norm",
    "lr": "learning_rate",
}
PROJECT = "tokenmdp"  # every run's project in the trackers; the run's own name tells them apart (run_name)
TABLE_COLUMNS = ("step", "prompt", "completion", "reward", "correct")
_OWN_REWARD_KEYS = {"mean", "std", "accuracy", "format", "groups_mixed", "frac_zero_std"}  # reward/* of tokenmdp's own


def requested(report_to: Any) -> list[str]:
    """The trackers named by ``run.report_to`` (``"none"``, None, one name or a list), in order, each once."""
    if report_to in (None, "none"):
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return list(dict.fromkeys(n for n in names if n != "none"))


def check_installed(names: list[str]) -> None:
    """One error for the first tracker whose package is missing, with the line that installs it."""
    for name in names:
        module, line = INSTALL[name]
        if importlib.util.find_spec(module) is None:
            raise TokenMDPError(f"config field 'run.report_to': tracker {name!r} needs the {module!r} package, "
                                f"which is not installed; install it with `{line}` (or pip install "
                                f"'tokenmdp[track]' for all of them)")


def with_trl_names(values: dict[str, float]) -> dict[str, float]:
    """``values`` plus each metric again under TRL's name (:data:`TRL_NAMES`; a reward function's part
    ``reward/<fn>`` as ``rewards/<fn>/mean``)."""
    out = dict(values)
    for key, value in values.items():
        trl = TRL_NAMES.get(key)
        if trl is None and key.startswith("reward/") and key.count("/") == 1 and key[7:] not in _OWN_REWARD_KEYS:
            trl = f"rewards/{key[7:]}/mean"
        if trl is not None and trl not in values:
            out[trl] = value
    return out



def accelerator_kwargs(names: list[str], run_dir: Path) -> dict:
    """``Accelerator`` arguments for ``names``; points each tracker's local store inside ``run_dir`` first (before
    the tracker's package is imported: trackio reads ``TRACKIO_DIR`` then)."""
    if not names:
        return {}
    run_dir = Path(run_dir).resolve()
    if "trackio" in names:
        os.environ.setdefault("TRACKIO_DIR", str(run_dir / "trackio"))
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
    return {"log_with": names, "project_dir": str(run_dir)}


def run_name(run_dir: Path) -> str:
    """A tracker's name for the run: its folder, with the algorithm's folder above a ``seed-<s>`` folder
    (a comparison's ``runs/<algo>/seed-<s>``) -> ``<algo>/seed-<s>``."""
    run_dir = Path(run_dir)
    return f"{run_dir.parent.name}/{run_dir.name}" if run_dir.name.startswith("seed-") else run_dir.name


def init_kwargs(names: list[str], run_dir: Path, run_name: str) -> dict:
    """``init_trackers``' per-tracker arguments: the run's name, wandb offline inside the run folder."""
    kwargs: dict[str, dict] = {}
    if "wandb" in names:
        kwargs["wandb"] = {"name": run_name, "dir": str(Path(run_dir).resolve())}
        if not os.environ.get("WANDB_MODE"):
            kwargs["wandb"]["mode"] = "offline"
    if "trackio" in names:
        kwargs["trackio"] = {"name": run_name}
    if "mlflow" in names:  # a new experiment keeps its artifacts (the completion tables) beside its database
        kwargs["mlflow"] = {"run_name": run_name, "logging_dir": (Path(run_dir).resolve() / "mlartifacts").as_uri()}
    return kwargs


class Trackers:
    """The run's trackers on the main process: metrics (with TRL's names) every step, completion tables now and
    then, and the close at the end."""

    def __init__(self, accelerator, names: list[str], steps: int):
        self.accelerator, self.names = accelerator, names
        self.table_every = max(1, steps // 10)
        self.last = steps

    def log(self, values: dict[str, float], step: int) -> None:
        self.accelerator.log(with_trl_names(values), step=step)

    def table_due(self, step: int) -> bool:
        return step % self.table_every == 0 or step == self.last

    def log_completions(self, rows: dict[str, list], step: int) -> None:
        """The step's sampled completions as a table, on each tracker that has tables."""
        data = [[row[c] for c in TABLE_COLUMNS] for row in _rows(rows)]
        columns = list(TABLE_COLUMNS)
        for name in self.names:
            if name == "wandb":
                self.accelerator.get_tracker("wandb").log_table("completions", columns=columns, data=data,
                                                                step=step)
            elif name == "trackio":
                import trackio

                table = trackio.Table(columns=columns, data=data)
                self.accelerator.get_tracker("trackio", unwrap=True).log({"completions": table}, step=step)
            elif name == "mlflow":
                import mlflow

                mlflow.log_table({c: [r[i] for r in data] for i, c in enumerate(columns)},
                                 artifact_file=f"completions/step-{step:06d}.json")

    def finish(self) -> None:
        self.accelerator.end_training()


def _rows(columns: dict[str, list]) -> list[dict]:
    n = len(columns["step"])
    return [{c: columns[c][i] for c in TABLE_COLUMNS} for i in range(n)]
