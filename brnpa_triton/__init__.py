"""brnpa-triton: fast, faithful BR-NPA (Bilinear Representative Non-Parametric Attention)."""

from brnpa_triton.api import BRNPAOutput, brnpa, brnpa_tokens
from brnpa_triton.baselines import grad_cam_pp, hires_cam, rise, score_cam, xgrad_cam
from brnpa_triton.dispatch import available_backends
from brnpa_triton.distill import distillation_loss
from brnpa_triton.explain import grad_cam, overlay, saliency
from brnpa_triton.highres import make_high_resolution
from brnpa_triton.metrics import deletion_insertion, sparsity
from brnpa_triton.nn import BilinearAttentionPooling, BRNPAClassifier, BRNPAHead, BRNPAPool

__version__ = "0.1.0"

__all__ = [
    "BRNPAOutput", "brnpa", "brnpa_tokens", "available_backends", "__version__",
    "BRNPAPool", "BRNPAHead", "BRNPAClassifier", "BilinearAttentionPooling",
    "saliency", "grad_cam", "overlay", "sparsity", "deletion_insertion",
    "grad_cam_pp", "hires_cam", "xgrad_cam", "score_cam", "rise",
    "distillation_loss", "make_high_resolution",
]
