"""The oracle: a plain, line-by-line transcription of the operator in ``docs/SPEC.md``."""

from reference.brnpa import DEGENERATE_SUM_RATIO, EPS, brnpa_reference

__all__ = ["EPS", "DEGENERATE_SUM_RATIO", "brnpa_reference"]
