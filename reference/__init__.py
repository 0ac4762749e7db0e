"""The oracle: a plain, line-by-line transcription of ``shared/BRNPA_SPEC.md``."""

from reference.brnpa import DEGENERATE_SUM_RATIO, EPS, brnpa_reference

__all__ = ["EPS", "DEGENERATE_SUM_RATIO", "brnpa_reference"]
