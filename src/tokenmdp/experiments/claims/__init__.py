"""The paper's claims and their verdicts, from a comparison's run folders: C1, C2 and :func:`evaluate_claims` in
:mod:`.verdicts`, C3 in :mod:`.collapse`, C4 and C5 in :mod:`.length`, the shared thresholds, readers and
formatting in :mod:`.common`, the tables and ``claims.json`` in :mod:`.render`."""

from __future__ import annotations

from tokenmdp.experiments.claims.common import (
    C1_COSINE_TOL,
    C1_CURVE_ATOL,
    C1_EXACT_ATOL,
    C1_EXACT_RTOL,
    C1_FLIP_SAMPLES,
    C1_PARAM_RTOL,
    C3_COLLAPSE_FRACTION,
    C3_LATE_POINTS,
    C4_RUN_TOKENS,
    C4_SLOPE_MARGIN,
    C5_COSINE_CONTRADICT,
    C5_COSINE_TOL,
    C5_IDENTITIES,
    CLAIM_IDS,
    EQUIV_MARGIN,
    NOT_MEASURED,
    PRIMARY_METRIC,
    SECONDARY_METRIC,
    fmt_seeds,
)
from tokenmdp.experiments.claims.length import length_trend
from tokenmdp.experiments.claims.render import claims_html, claims_markdown, write_claims
from tokenmdp.experiments.claims.verdicts import (
    C1_CURVES,
    changed_samples,
    evaluate_claims,
    first_divergence,
    param_difference,
)

__all__ = [
    "C1_COSINE_TOL", "C1_CURVES", "C1_CURVE_ATOL", "C1_EXACT_ATOL", "C1_EXACT_RTOL", "C1_FLIP_SAMPLES",
    "C1_PARAM_RTOL", "C3_COLLAPSE_FRACTION", "C3_LATE_POINTS", "C4_RUN_TOKENS", "C4_SLOPE_MARGIN",
    "C5_COSINE_CONTRADICT", "C5_COSINE_TOL", "C5_IDENTITIES", "CLAIM_IDS", "EQUIV_MARGIN", "NOT_MEASURED",
    "PRIMARY_METRIC", "SECONDARY_METRIC",
    "changed_samples", "claims_html", "claims_markdown", "evaluate_claims", "first_divergence", "fmt_seeds",
    "length_trend", "param_difference", "write_claims",
]
