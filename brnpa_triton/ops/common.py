"""What every backend shares: the operator's constants, dtypes, casts and the forward record.

The backends (``torch_impl``, ``triton_impl``) import from here and never from each other.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

EPS = 1e-5  # rho_n = ||x_n|| + EPS
# A part is degenerate (uniform map) when |S_k| <= DEGENERATE_SUM_RATIO * sum_n |sim_kn|.
DEGENERATE_SUM_RATIO = 1e-4

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_output_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a forward output to ``dtype``, saturating at its largest finite value.

    Norms of large features and vectors of signed features can exceed float16's range; the
    outputs stay finite (NaN stays NaN). Gradients are cast plainly instead: they overflow to
    inf, as PyTorch's do, so that a gradient scaler sees the overflow.
    """
    if t.dtype != dtype and dtype in (torch.float16, torch.bfloat16):
        big = torch.finfo(dtype).max
        t = t.clamp(-big, big)
    return t.to(dtype)


class SavedForward(NamedTuple):
    """What the backward needs from the forward (parts in output order)."""

    vectors: torch.Tensor  # (B, K, C) input dtype
    maps: torch.Tensor  # (B, K, N) input dtype
    indices: torch.Tensor  # (B, K) int64
    norms: torch.Tensor  # (B, N) accumulation dtype, ||x_n|| without eps
    inv_sums: torch.Tensor  # (B, K) accumulation dtype: 1 / S_k, 0 for degenerate (uniform) parts


class Forward(NamedTuple):
    """What a backend's forward returns: the op's outputs, in this order."""

    vectors: torch.Tensor  # (B, K, C) input dtype
    maps: torch.Tensor  # (B, K, N) input dtype
    indices: torch.Tensor  # (B, K) int64
    activity: torch.Tensor  # (B, K) input dtype, ||v_k||
    norms: torch.Tensor  # (B, N) input dtype: the user's copy
    saved_norms: torch.Tensor  # (B, N) accumulation dtype: the backward's copy
    inv_sums: torch.Tensor  # (B, K) accumulation dtype

    def saved(self) -> SavedForward:
        return SavedForward(self.vectors, self.maps, self.indices, self.saved_norms, self.inv_sums)
