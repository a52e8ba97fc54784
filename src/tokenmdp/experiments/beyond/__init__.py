"""Beyond the degenerate MDP: does the paper's reduction survive an environment or per-step credit? The measures
per arm are :mod:`.analysis` (:func:`analyse`), their tables :mod:`.render`."""

from __future__ import annotations

from tokenmdp.experiments.beyond.analysis import HOLDS, KEY, analyse
from tokenmdp.experiments.beyond.render import beyond_html, beyond_markdown, exact_two_llm_markdown

__all__ = ["HOLDS", "KEY", "analyse", "beyond_html", "beyond_markdown", "exact_two_llm_markdown"]
