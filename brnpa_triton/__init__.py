"""brnpa-triton: fast, faithful BR-NPA (Bilinear Representative Non-Parametric Attention)."""

from brnpa_triton.api import BRNPAOutput, brnpa, brnpa_tokens
from brnpa_triton.dispatch import available_backends

__version__ = "0.1.0"

__all__ = ["BRNPAOutput", "brnpa", "brnpa_tokens", "available_backends", "__version__"]
