"""The functional API: pure functions, a NamedTuple out, randomness passed in explicitly."""

from __future__ import annotations

from typing import NamedTuple

import torch

from brnpa_triton import _validation as check
from brnpa_triton.dispatch import resolve_backend
from brnpa_triton.ops.autograd import BRNPAFunction


class BRNPAOutput(NamedTuple):
    """What ``brnpa`` returns. Spatial outputs follow the input: (H, W) for maps, (N,) for tokens."""

    vectors: torch.Tensor  # (B, K, C) refined vectors v_k (seed vectors r_k when refine=False)
    maps: torch.Tensor  # (B, K, H, W) attention maps, each summing to 1
    indices: torch.Tensor  # (B, K) int64 flat seed positions h*W + w
    activity: torch.Tensor  # (B, K) ||v_k||
    norms: torch.Tensor  # (B, H, W) ||x_n||


def brnpa(
    features: torch.Tensor,
    num_parts: int = 3,
    *,
    refine: bool = True,
    seeds: str = "norm",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    order: str = "selection",
    backend: str = "auto",
    check_finite: bool = False,
) -> BRNPAOutput:
    """BR-NPA pooling of a feature map ``features`` (B, C, H, W) into ``num_parts`` parts.

    Any strides work (channels_last included) and nothing is copied. ``seeds="random"`` is the
    paper's ablation: each part's seed is the argmax of fresh uniform noise, drawn from
    ``generator`` or given as ``noise`` (B, K, H, W); the global RNG is never touched.
    ``order="activity"`` re-ranks the parts by ``activity``, descending (stable).
    ``check_finite=True`` rejects NaN/Inf input (this synchronises with the device).
    """
    check.check_features("features", features, "BCHW")
    B, C, H, W = features.shape
    out = _run(
        features.flatten(2), features, num_parts, refine, seeds, generator, noise, order, backend,
        check_finite, noise_shape=(B, num_parts, H, W),
    )
    return BRNPAOutput(
        out.vectors,
        out.maps.unflatten(2, (H, W)),
        out.indices,
        out.activity,
        out.norms.unflatten(1, (H, W)),
    )


def brnpa_tokens(
    tokens: torch.Tensor,
    num_parts: int = 3,
    *,
    refine: bool = True,
    seeds: str = "norm",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    order: str = "selection",
    backend: str = "auto",
    check_finite: bool = False,
) -> BRNPAOutput:
    """BR-NPA over transformer tokens (B, N, C): as ``brnpa`` with positions n = 0..N-1.

    ``maps`` come out as (B, K, N), ``norms`` as (B, N) and ``noise`` is (B, K, N).
    """
    check.check_features("tokens", tokens, "BNC")
    B, N, _ = tokens.shape
    return _run(
        tokens.transpose(1, 2), tokens, num_parts, refine, seeds, generator, noise, order, backend,
        check_finite, noise_shape=(B, num_parts, N),
    )


def _run(x, features, num_parts, refine, seeds, generator, noise, order, backend, finite, noise_shape):
    """x is the (B, C, N) view of ``features``; outputs are (B, K, N)-shaped."""
    B, C, N = x.shape
    check.check_num_parts(num_parts, N)
    check.check_choice("seeds", seeds, check.SEED_MODES)
    check.check_choice("order", order, check.ORDERS)
    check.check_choice("backend", backend, check.BACKENDS)
    check.check_random_source(seeds, generator, noise, noise_shape, features.device)
    if finite:
        check.check_finite("features" if features.dim() == 4 else "tokens", features)
    backend = resolve_backend(backend, features.device)

    if seeds == "random":
        if noise is None:
            noise = torch.rand(noise_shape, generator=generator, device=features.device)
        seed_indices = noise.reshape(B, num_parts, N).argmax(dim=2)  # lowest index on ties
    else:
        seed_indices = x.new_empty(0, dtype=torch.int64)

    vectors, maps, indices, activity, norms, saved_norms, _ = BRNPAFunction.apply(
        x, num_parts, bool(refine), seed_indices, order == "activity", backend
    )
    if finite:
        check.check_norms_finite("features" if features.dim() == 4 else "tokens", saved_norms)
    return BRNPAOutput(vectors, maps, indices, activity, norms)
