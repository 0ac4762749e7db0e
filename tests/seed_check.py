"""The greedy-seed check shared by the kernel tests and scripts/gpu_check.py (no pytest, no
interpreter set-up here, so the GPU script can import it)."""

from __future__ import annotations

import torch

from brnpa_triton.ops.common import EPS


def greedy_seed_error(x: torch.Tensor, indices: torch.Tensor, rel: float) -> str | None:
    """None if ``indices`` is, part by part, a float64 argmax of the greedy score up to ``rel`` of
    its range (given the previous seeds), and the lowest index among exact float64 ties;
    otherwise what is wrong."""
    xd = x.detach().cpu().double()
    idx = indices.cpu()
    B, C, N = xd.shape
    rho = torch.linalg.vector_norm(xd, dim=1) + EPS
    score = rho.clone()
    for k in range(idx.shape[1]):
        i = idx[:, k]
        if not bool(((i >= 0) & (i < N)).all()):
            return f"part {k}: index out of range: {i.tolist()}"
        best = score.max(dim=1).values
        spread = best - score.min(dim=1).values + best.abs()
        chosen = score.gather(1, i[:, None])[:, 0]
        if not bool(torch.all(chosen >= best - rel * spread)):
            return f"part {k}: chosen scores {chosen.tolist()} below the best {best.tolist()}"
        exact = score == best[:, None]
        first = exact.float().argmax(dim=1)
        tied = exact.gather(1, i[:, None])[:, 0]
        if not bool(torch.all(~tied | (i == first))):
            return f"part {k}: tie not broken to the lowest index"
        seed = xd.gather(2, i[:, None, None].expand(B, C, 1))
        sim = (seed * xd).sum(1) / (rho * rho.gather(1, i[:, None]))
        score = score * (1 - sim)
    return None
