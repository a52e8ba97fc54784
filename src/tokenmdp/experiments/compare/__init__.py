"""`tokenmdp compare`: algorithms side by side on the same prompts and seeds. :mod:`.driver` plans and runs a
comparison (:func:`compare`), :mod:`.settings` holds its settings and presets, :mod:`.run` one job and the fairness
check, :mod:`.jobs` the worker pool and its progress."""

from __future__ import annotations

from tokenmdp.experiments.compare.driver import arm_overrides, compare, make_settings
from tokenmdp.experiments.compare.jobs import Tracker, run_jobs
from tokenmdp.experiments.compare.run import FairnessError, Job, check_same_stream
from tokenmdp.experiments.compare.settings import (COMPARE_PRESETS, DEFAULT_ALGOS, HELDOUT_SEED, TINY_LR, Arm,
                                                   CompareSettings, arm_of, preset_settings, validate_settings)

__all__ = [
    "COMPARE_PRESETS", "DEFAULT_ALGOS", "HELDOUT_SEED", "TINY_LR", "Arm", "CompareSettings", "FairnessError", "Job",
    "Tracker", "arm_of", "arm_overrides", "check_same_stream", "compare", "make_settings", "preset_settings",
    "run_jobs", "validate_settings",
]
