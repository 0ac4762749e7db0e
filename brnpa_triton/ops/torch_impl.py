"""Vectorised PyTorch BR-NPA: the CPU fast path (and the fallback for any device).

Everything works on ``x`` of shape (B, C, N) with whatever strides the caller's layout gives
(NCHW, channels_last and (B, N, C) tokens are all views of this shape), so nothing is
permuted or copied, except a single upcast of float16/bfloat16 inputs to float32.

Forward: one pass for the norms, one matrix-vector pass per part, one pass for all refined
vectors. Backward: the spec's closed form in four passes over X whatever K is; nothing of
size (B, N, C) is saved, and the only (B, N, C) allocation is dX itself.
"""

from __future__ import annotations

import torch

from brnpa_triton.ops.common import (
    DEGENERATE_SUM_RATIO,
    EPS,
    Forward,
    SavedForward,
    accumulation_dtype,
    to_output_dtype,
)
from brnpa_triton.ops.hugepages import empty_like_hugepages


def _gather_positions(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x (B, C, N), indices (B, K) -> the feature vectors at those positions, (B, K, C)."""
    B, C, _ = x.shape
    return x.gather(2, indices[:, None, :].expand(B, C, -1)).transpose(1, 2)


def _norms(x: torch.Tensor, block_bytes: int = 8 << 20) -> torch.Tensor:
    """||x_n|| over C for x (B, C, N), in one pass without an (B, C, N) temporary.

    ``vector_norm`` is fast when C is the contiguous dim (channels_last, tokens) but takes a
    slow strided path over NCHW's C; there, squares are summed a block of channels at a time,
    each block's temporary at most a few MB (in cache, and few enough ops to keep threads busy).
    """
    if x.stride(1) == 1:
        return torch.linalg.vector_norm(x, dim=1)
    B, C, N = x.shape
    # At most a quarter of X, so that small inputs get no X-sized temporary either.
    channels = max(1, min(block_bytes // (B * N * x.element_size()), C // 4))
    squared = torch.zeros(B, N, dtype=x.dtype, device=x.device)
    for block in x.split(channels, dim=1):
        squared += block.square().sum(1)
    return squared.sqrt_()


def _weighted_sums(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_n weights_kn x_n for x (B, C, N), weights (B, K, N): (B, K, C) contiguous, one pass.

    The product is oriented so that BLAS streams X along its contiguous dim (measured ~2x
    faster at 1 thread for NCHW than the (B,K,N) @ (B,N,C) form).
    """
    if x.stride(2) == 1:
        return torch.bmm(x, weights.transpose(1, 2)).transpose(1, 2).contiguous()
    return torch.bmm(weights, x.transpose(1, 2))


# On CPU the batch is processed a few images at a time, so that each chunk of X stays in the
# last-level cache across its passes and only the first pass reads DRAM (at (8, 2048, 28x28)
# on the 2-core dev machine: forward 8.4 -> ~7.3 ms).
CACHE_CHUNK_BYTES = 16 << 20


def _batch_chunks(x: torch.Tensor) -> list[slice]:
    B, C, N = x.shape
    if x.device.type != "cpu":
        return [slice(0, B)]
    per_image = C * N * torch.empty((), dtype=accumulation_dtype(x.dtype)).element_size()
    step = max(1, CACHE_CHUNK_BYTES // per_image)
    return [slice(i, min(i + step, B)) for i in range(0, B, step)]


def forward(
    x: torch.Tensor,
    num_parts: int,
    refine: bool,
    seed_indices: torch.Tensor | None = None,
    by_activity: bool = False,
) -> Forward:
    """BR-NPA forward on x (B, C, N). ``seed_indices`` (B, K) replaces the greedy selection;
    ``by_activity`` ranks the parts by activity, descending (stable)."""
    chunks = [
        _forward_images(x[s], num_parts, refine, None if seed_indices is None else seed_indices[s], by_activity)
        for s in _batch_chunks(x)
    ]
    if len(chunks) == 1:
        return chunks[0]
    return Forward(*(torch.cat(outputs) for outputs in zip(*chunks)))


def _forward_images(
    x: torch.Tensor, num_parts: int, refine: bool, seed_indices: torch.Tensor | None, by_activity: bool
) -> Forward:
    B, C, N = x.shape
    K = num_parts
    xc = x.to(accumulation_dtype(x.dtype))  # no-op (no copy) for float32 / float64
    norms = _norms(xc)
    rho = norms + EPS
    score = rho
    sims = xc.new_empty(B, K, N)
    chosen = []
    for k in range(K):
        # Only what the next selection needs stays in the loop; the per-part normalisation
        # is done for all parts at once below (the loop's ops are small and their count shows).
        idx = score.argmax(dim=1) if seed_indices is None else seed_indices[:, k]
        chosen.append(idx)
        seed = xc.gather(2, idx[:, None, None].expand(B, C, 1))  # (B, C, 1)
        dots = torch.bmm(seed.transpose(1, 2), xc).squeeze(1)  # (B, N): one pass over X
        sim = torch.div(dots, rho * rho.gather(1, idx[:, None]), out=sims[:, k])
        if seed_indices is None:
            score = score.addcmul(score, sim, value=-1.0)  # s * (1 - sim)
    indices = torch.stack(chosen, 1)
    totals = sims.sum(dim=2)
    degenerate = totals.abs() <= DEGENERATE_SUM_RATIO * sims.abs().sum(dim=2)
    inv_sums = torch.where(degenerate, 0.0, torch.where(degenerate, 1.0, totals).reciprocal())
    maps = torch.where(degenerate[..., None], 1.0 / N, sims * inv_sums[..., None])
    if refine:
        vectors = _weighted_sums(xc, maps)  # one pass over X for all parts
    else:
        vectors = _gather_positions(xc, indices).contiguous()  # outputs are contiguous (B, K, C)
    activity = torch.linalg.vector_norm(vectors, dim=2)
    if by_activity:
        rank = torch.sort(activity, dim=1, descending=True, stable=True).indices
        vectors = vectors.gather(1, rank[:, :, None].expand(-1, -1, C))
        maps = maps.gather(1, rank[:, :, None].expand(-1, -1, N))
        indices, activity, inv_sums = (t.gather(1, rank) for t in (indices, activity, inv_sums))
    return Forward(
        to_output_dtype(vectors, x.dtype),
        to_output_dtype(maps, x.dtype),
        indices,
        to_output_dtype(activity, x.dtype),
        to_output_dtype(norms, x.dtype) if norms.dtype != x.dtype else norms.clone(),
        norms,
        inv_sums,
    )


def backward(
    x: torch.Tensor,
    grad_vectors: torch.Tensor | None,
    grad_maps: torch.Tensor | None,
    grad_activity: torch.Tensor | None,
    grad_norms: torch.Tensor | None,
    saved: SavedForward,
    refine: bool,
) -> torch.Tensor:
    """dL/dx (B, C, N), in x's dtype (and strides, for dense x), from the spec's closed form.

    Gradients of outputs that did not reach the loss may be None. float16 gradients overflow
    to inf where the true gradient exceeds the dtype's range, as PyTorch's own do.
    """
    dx = empty_like_hugepages(x)  # fresh, so huge pages spare it most first-touch page faults
    for s in _batch_chunks(x):
        _backward_images(
            x[s],
            None if grad_vectors is None else grad_vectors[s],
            None if grad_maps is None else grad_maps[s],
            None if grad_activity is None else grad_activity[s],
            None if grad_norms is None else grad_norms[s],
            SavedForward(*(t[s] for t in saved)),
            refine,
            out=dx[s],
        )
    return dx


def _backward_images(
    x, grad_vectors, grad_maps, grad_activity, grad_norms, saved: SavedForward, refine: bool, out: torch.Tensor
):
    """Writes dL/dx of these images into ``out``."""
    B, C, N = x.shape
    K = saved.indices.shape[1]
    ct = accumulation_dtype(x.dtype)
    xc = x.to(ct)
    maps = saved.maps.to(ct)
    norms = saved.norms.to(ct)
    rho = norms + EPS
    seeds = _gather_positions(xc, saved.indices)  # r_k, (B, K, C)
    rho_seed = rho.gather(1, saved.indices)
    seed_norm = norms.gather(1, saved.indices)
    g_vec = xc.new_zeros(B, K, C) if grad_vectors is None else grad_vectors.to(ct)
    if grad_activity is not None:  # activity = ||v_k||: its gradient joins v_k's
        vectors = saved.vectors.to(ct)
        length = torch.linalg.vector_norm(vectors, dim=2, keepdim=True)
        g_vec = g_vec + grad_activity.to(ct)[..., None] * torch.where(length > 0, vectors / length, 0.0)
    g_map = xc.new_zeros(B, K, N) if grad_maps is None else grad_maps.to(ct)

    # Pass 1: the seed dot products (to rebuild sim) and, when refining, gV_k . x_n.
    lhs = torch.cat([seeds, g_vec], 1) if refine else seeds
    products = torch.bmm(lhs, xc)  # (B, 2K or K, N)
    sim = products[:, :K] / (rho[:, None, :] * rho_seed[:, :, None])
    if refine:
        abar = g_map + products[:, K:]
        total = (g_map * maps).sum(-1) + (g_vec * saved.vectors.to(ct)).sum(-1)
    else:
        abar = g_map
        total = (g_map * maps).sum(-1)
    # simbar is 0 for degenerate parts (inv_sums == 0): their uniform maps have no gradient.
    simbar = (abar - total[..., None]) * saved.inv_sums.to(ct)[..., None]
    simbar_over_rho = simbar / rho[:, None, :]

    # Pass 2: u_k = sum_n simbar_kn x_n / rho_n, the seed rows' share.
    u = _weighted_sums(xc, simbar_over_rho)  # (B, K, C)
    w = (simbar * sim).sum(-1)

    # Passes 3-4: dx_n = c_n x_n / ||x_n|| + sum_k [a_kn gV_k + simbar_kn r_k / (rho_n rho_ik)]
    radial = -(simbar_over_rho * sim).sum(1)  # coefficient of x_n / ||x_n||
    if grad_norms is not None:
        radial = radial + grad_norms.to(ct)
    radial = torch.where(norms > 0, radial / torch.where(norms > 0, norms, 1.0), 0.0)
    dx = out if out.dtype == ct else torch.empty_like(xc)
    torch.mul(xc, radial[:, None, :], out=dx)
    seeds_scaled = seeds / rho_seed[..., None]
    if refine:
        dx.baddbmm_(torch.cat([g_vec, seeds_scaled], 1).transpose(1, 2), torch.cat([maps, simbar_over_rho], 1))
    else:
        dx.baddbmm_(seeds_scaled.transpose(1, 2), simbar_over_rho)

    # Seed rows: dx_ik += u_k / rho_ik - w_k r_k / (rho_ik ||r_k||); accumulate on repeats.
    inv_seed_norm = torch.where(seed_norm > 0, 1.0 / (rho_seed * torch.where(seed_norm > 0, seed_norm, 1.0)), 0.0)
    seed_grad = u / rho_seed[..., None] - (w * inv_seed_norm)[..., None] * seeds
    if not refine:
        seed_grad = seed_grad + g_vec
    dx.scatter_add_(2, saved.indices[:, None, :].expand(B, C, K), seed_grad.transpose(1, 2))
    if dx is not out:
        out.copy_(dx)
