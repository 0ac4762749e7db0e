"""What the tests add to ``brnpa_triton.testing``: the line-by-line oracle of ``reference/``
(kept out of the installed package), as the public API's output record."""

from __future__ import annotations

import brnpa_triton as bt
from reference import brnpa_reference


def reference(features, num_parts, **options) -> bt.BRNPAOutput:
    """The oracle on (B, C, H, W) ``features``, computed in their dtype (float64 in the tests)."""
    return bt.BRNPAOutput(*brnpa_reference(features, num_parts, **options))
