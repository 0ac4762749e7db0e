"""BR-NPA, written as the specification reads: one image at a time, one part at a time.

Nothing here is optimised. It runs in any floating dtype (float64 is the oracle for tests)
and is differentiable with plain autograd. Two project decisions are spelled out where they
apply (see the README, "Semantics"):

* the gradient of ||x_n|| at an all-zero feature vector is 0 (not NaN);
* a part whose similarity sum S_k cancels to (almost) zero gets a uniform map instead of
  dividing by ~0; ``DEGENERATE_SUM_RATIO`` defines "almost".
"""

from __future__ import annotations

import torch
from einops import rearrange

EPS = 1e-5
# A part is degenerate when |S_k| <= DEGENERATE_SUM_RATIO * sum_n |sim_kn|: its map would be
# dominated by cancellation (or is 0/0 for an all-zero feature map). Such a part's map is
# uniform (1/N), so its vector is the mean feature. With non-negative features S_k equals
# sum_n |sim_kn|, so only an all-zero similarity row is degenerate.
DEGENERATE_SUM_RATIO = 1e-4


def _safe_norm(x: torch.Tensor) -> torch.Tensor:
    """||x|| over the last dim, scaled by the largest magnitude so that no square overflows or
    underflows, with gradient 0 (not NaN) where x is the zero vector.

    ``x`` is made contiguous so that every row is reduced in the same order: bitwise-identical
    feature vectors get bitwise-identical norms wherever they sit.
    """
    x = x.contiguous()
    scale = x.detach().abs().amax(-1, keepdim=True)  # the norm is homogeneous: no gradient here
    nonzero = scale > 0
    unit = x / torch.where(nonzero, scale, torch.ones_like(scale))
    squared = (unit * unit).sum(-1, keepdim=True)
    return torch.where(
        nonzero, scale * torch.sqrt(torch.where(nonzero, squared, torch.ones_like(squared))), 0.0
    ).squeeze(-1)


def _dots(x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """x_n . direction for every row of x, each row reduced in the same order (not a matrix
    product, whose rounding depends on the row's position)."""
    return (x.contiguous() * direction).sum(-1)


def brnpa_reference(
    features: torch.Tensor,
    num_parts: int,
    refine: bool = True,
    noise: torch.Tensor | None = None,
    order: str = "selection",
):
    """Reference BR-NPA on ``features`` (B, C, H, W).

    ``noise`` (B, K, H*W), when given, replaces the selection score before every selection
    (the paper's random-seed ablation). Returns ``(vectors (B,K,C), maps (B,K,H,W),
    indices (B,K), activity (B,K), norms (B,H,W))``.
    """
    B, C, H, W = features.shape
    N = H * W
    K = num_parts
    all_vectors, all_maps, all_indices, all_norms = [], [], [], []
    for b in range(B):
        x = rearrange(features[b], "c h w -> (h w) c")  # x[n] is the feature at position n = h*W + w
        feature_norm = _safe_norm(x)  # ||x_n||
        rho = feature_norm + EPS  # rho_n
        score = rho.detach().clone()  # s_n: selection only, carries no gradient
        vectors, maps, indices = [], [], []
        for k in range(K):
            if noise is not None:
                score = noise[b, k].to(x.dtype)
            i_k = int(torch.argmax(score))  # torch.argmax returns the lowest index on ties
            r_k = x[i_k]
            # Dividing the seed by rho_ik first keeps every product below |x_cn|: no overflow.
            sim = _dots(x, r_k / rho[i_k]) / rho
            S_k = sim.sum()
            # Degenerate: S_k cancels, or is too small to invert in x's dtype.
            if S_k.abs() <= DEGENERATE_SUM_RATIO * sim.abs().sum() or torch.isinf(1 / S_k):
                a = torch.full_like(sim, 1.0 / N)  # degenerate part: uniform map
            else:
                a = sim / S_k
            v_k = a @ x
            score = (1 - sim.detach()) * score
            vectors.append(v_k if refine else r_k)
            maps.append(a)
            indices.append(i_k)
        all_vectors.append(torch.stack(vectors))
        all_maps.append(rearrange(torch.stack(maps), "k (h w) -> k h w", h=H))
        all_indices.append(torch.tensor(indices, dtype=torch.int64, device=features.device))
        all_norms.append(rearrange(feature_norm, "(h w) -> h w", h=H))
    vectors = torch.stack(all_vectors)
    maps = torch.stack(all_maps)
    indices = torch.stack(all_indices)
    activity = _safe_norm(vectors)
    if order == "activity":
        rank = torch.sort(activity.detach(), dim=1, descending=True, stable=True).indices
        vectors = vectors.gather(1, rank[:, :, None].expand(-1, -1, C))
        maps = maps.gather(1, rank[:, :, None, None].expand(-1, -1, H, W))
        indices = indices.gather(1, rank)
        activity = activity.gather(1, rank)
    return vectors, maps, indices, activity, torch.stack(all_norms)
