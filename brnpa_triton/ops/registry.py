"""BR-NPA as ``torch.library`` custom ops, with autograd, fake (meta) and vmap rules.

Two ops: ``brnpa_triton::forward`` and ``brnpa_triton::backward``. The forward's autograd
rule (registered in ``autograd.py``, shared with the ``autograd.Function`` there) calls the
backward op, so ``torch.compile(fullgraph=True)`` sees two opaque ops and never traces into
the kernels. Each op
picks its implementation by ``backend`` ("torch": vectorised PyTorch, "triton": the fused
kernels) - the choice is made by the public API before the call.
"""

from __future__ import annotations

import torch

from brnpa_triton.ops import torch_impl

_TRITON_FORWARD = None
_TRITON_BACKWARD = None


def _triton():
    """Import the Triton launchers lazily: triton is optional on CPU-only installs."""
    global _TRITON_FORWARD, _TRITON_BACKWARD
    if _TRITON_FORWARD is None:
        from brnpa_triton.ops import triton_impl

        _TRITON_FORWARD, _TRITON_BACKWARD = triton_impl.forward, triton_impl.backward
    return _TRITON_FORWARD, _TRITON_BACKWARD


def _no_seeds(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0, dtype=torch.int64)


@torch.library.custom_op("brnpa_triton::forward", mutates_args=())
def brnpa_forward(
    x: torch.Tensor, num_parts: int, refine: bool, seed_indices: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, C, N), any strides. ``seed_indices`` (B, K) int64, or empty for greedy selection.

    Returns (vectors (B,K,C), maps (B,K,N), indices (B,K), norms (B,N), inv_sums (B,K)); norms
    and inv_sums are in the compute dtype (float32, or float64), the rest in x's dtype.
    """
    seeds = seed_indices if seed_indices.numel() else None
    impl = _triton()[0] if backend == "triton" else torch_impl.forward
    return tuple(impl(x, num_parts, refine, seeds))


@brnpa_forward.register_fake
def _(x, num_parts, refine, seed_indices, backend):
    B, C, N = x.shape
    K = num_parts
    return (
        x.new_empty(B, K, C),
        x.new_empty(B, K, N),
        x.new_empty(B, K, dtype=torch.int64),
        x.new_empty(B, N, dtype=torch_impl.compute_dtype(x.dtype)),
        x.new_empty(B, K, dtype=torch_impl.compute_dtype(x.dtype)),
    )


@torch.library.custom_op("brnpa_triton::backward", mutates_args=())
def brnpa_backward(
    x: torch.Tensor,
    grad_vectors: torch.Tensor,
    grad_maps: torch.Tensor,
    grad_norms: torch.Tensor,
    vectors: torch.Tensor,
    maps: torch.Tensor,
    indices: torch.Tensor,
    norms: torch.Tensor,
    inv_sums: torch.Tensor,
    refine: bool,
    backend: str,
) -> torch.Tensor:
    """dL/dx for ``brnpa_triton::forward``, in x's dtype and shape (B, C, N)."""
    saved = torch_impl.Forward(vectors, maps, indices, norms, inv_sums)
    impl = _triton()[1] if backend == "triton" else torch_impl.backward
    return impl(x, grad_vectors, grad_maps, grad_norms, saved, refine)


@brnpa_backward.register_fake
def _(x, grad_vectors, grad_maps, grad_norms, vectors, maps, indices, norms, inv_sums, refine, backend):
    return torch.empty_like(x)
