"""Vectorised PyTorch BR-NPA: the CPU fast path, and ``backend="torch"`` (and the float64
reference) on any other device.

Everything works on ``x`` of shape (B, C, N) with whatever strides the caller's layout gives
(NCHW, channels_last and (B, N, C) tokens are all views of this shape), so nothing is
permuted or copied; float16/bfloat16 inputs are upcast to float32 a block at a time.

Forward: one pass for the norms, one dot-product pass per part, one pass for all refined
vectors. Norms and seed dot products round every column alike whatever its position, so
bitwise-identical columns get identical scores (ties then go to the lowest position), and
they are computed scaled, so that no finite input whose norms are finite overflows. On CPU
the seed dot products are matrix products where ``blas_ties`` has checked that the BLAS
rounds every column alike for that problem, and fixed-order multiply-adds elsewhere.
The blocking of the passes is per device (``Plan``): cache-sized on CPU; a few large blocks and
no host synchronisation elsewhere, so that a CUDA graph can capture a forward and backward.
Backward: the spec's closed form in four passes over X whatever K is; nothing of size
(B, N, C) is saved, and the only (B, N, C) allocation is dX itself.
"""

from __future__ import annotations

import glob
from typing import NamedTuple

import torch

from brnpa_triton.ops.blas_ties import DOT_ROWS, columns_round_alike, rows_times
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
    """x (B, C, N), indices (B, K) -> the feature vectors at those positions, (B, K, C).
    (Advanced indexing: 47 us against 136 us for ``gather`` at (8, 2048, 784), 2 threads.)"""
    images = torch.arange(x.shape[0], device=x.device)[:, None]
    return x[images, :, indices]


# How a pass over X is cut into blocks, per device (see ``Plan``). The CPU plan's sizes:
# float16/bfloat16 features are upcast to float32 a block of positions at a time, each block
# at most this: a small fraction of any large input.
BLOCK_BYTES = 4 << 20
# The per-column accumulators of a pass over NCHW-like x: small enough to stay in cache, large
# enough that few calls do the pass (at (8, 2048, 784) float32 on a 2-core Xeon, 24-32 rows took
# 2.7 / 1.7 ms at 1 / 2 threads; 16 rows 2.7 / 2.2, 64 rows 4.0 / 2.1).
ACCUMULATOR_BYTES = 768 << 10
# The product temporaries of a pass over channels_last / tokens x.
DOT_BLOCK_BYTES = 1 << 20
# A GPU's launches cost far more than its cache misses: there every pass over X is cut into at
# most this many blocks, each temporary a fraction of X.
DEVICE_BLOCKS = 4


class Plan(NamedTuple):
    """How the passes over X are blocked, chosen from the device (``plan_for``).

    ``cpu``: blocks sized for the CPU's caches, the batch in cache-sized chunks, and the rare
    out-of-range norms recomputed on the columns that need it (finding them reads a count back
    to the host, which costs nothing on CPU). Otherwise: a few large blocks per pass and
    branch-free scaled norms, so that nothing waits for the host (CUDA graphs, torch.compile).
    Both round every column alike whatever its position (on CPU the seed dot products may be
    matrix products: see ``blas_ties``).
    """

    cpu: bool


CPU_PLAN = Plan(cpu=True)
DEVICE_PLAN = Plan(cpu=False)
# Tests set this to run the device plan on CPU tensors.
FORCED_PLAN: Plan | None = None


def plan_for(x: torch.Tensor) -> Plan:
    if FORCED_PLAN is not None:
        return FORCED_PLAN
    return CPU_PLAN if x.device.type == "cpu" else DEVICE_PLAN


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _block(total: int, per_item_bytes: int, cap_bytes: int, plan: Plan) -> int:
    """Items per block: CPU, at most ``cap_bytes`` and a quarter of the items (so that small
    inputs get no X-sized temporary either); otherwise ``DEVICE_BLOCKS`` blocks in all."""
    if not plan.cpu:
        return max(1, _ceil_div(total, DEVICE_BLOCKS))
    return max(1, min(total // 4, cap_bytes // per_item_bytes))


def _workspace(x: torch.Tensor, acc: torch.dtype, plan: Plan) -> torch.Tensor:
    """The temporary of ``_column_dots``; one per forward, reused by its passes (a fresh one per
    pass would pay its page faults every time).

    Where C is contiguous: a block of products, (B, C, P) with C contiguous. Otherwise: the
    (B, G, N) accumulator of G rows.
    """
    B, C, N = x.shape
    size = _element_size(acc)
    if x.stride(1) == 1 and C > 1:
        step = _block(N, B * C * size, DOT_BLOCK_BYTES, plan)
        return torch.empty(B, step, C, dtype=acc, device=x.device).transpose(1, 2)
    rows = _block(C, B * N * size, ACCUMULATOR_BYTES, plan)
    return torch.empty(B, rows, N, dtype=acc, device=x.device)


def _column_dots(
    x: torch.Tensor, weights: torch.Tensor | None, acc: torch.dtype, workspace: torch.Tensor
) -> torch.Tensor:
    """sum_c x_cn w_c for x (B, C, N) and weights w (B, C), as (B, N) in ``acc``: one pass over
    x, float16/bfloat16 upcast a block at a time. ``weights=None`` gives the squared norms.
    ``workspace`` is ``_workspace(x, acc, plan)``: its size sets the blocks.

    Every column is reduced over C in the same order whatever its position, so bitwise-identical
    columns get bitwise-identical results. A matrix product need not: a BLAS may round a column
    according to where it falls in its blocking (``blas_ties`` checks where it does not), and so
    does ``sum`` over a non-contiguous dim (vector lanes and a row's tail round differently).
    Where C is contiguous (channels_last, tokens), each column is one contiguous reduction;
    otherwise (NCHW) G rows of elementwise multiply-adds accumulate channels c = g, g + G, ...,
    and each column's G sums are then reduced contiguously.
    """
    B, C, N = x.shape
    if _c_contiguous(x):
        out = torch.empty(B, N, dtype=acc, device=x.device)
        step = workspace.shape[2]
        for lo in range(0, N, step):
            block = x[:, :, lo : lo + step]
            buffer = workspace[:, :, : block.shape[2]]
            other = block if weights is None else weights[:, :, None]
            torch.mul(block, other, out=buffer)  # computed in acc
            torch.sum(buffer, 1, out=out[:, lo : lo + step])
        return out
    total = workspace.zero_()
    rows = total.shape[1]
    blocks = x.split(rows, 1)
    others = blocks if weights is None else weights[:, :, None].split(rows, 1)
    for block, other in zip(blocks, others, strict=True):
        part = total if block.shape[1] == rows else total[:, : block.shape[1]]
        part.addcmul_(block, other)  # computed in acc: the products are exact
    return _sum_rows(total)


def _seed_dots(
    x: torch.Tensor, direction: torch.Tensor, acc: torch.dtype, workspace: torch.Tensor, blas: bool
) -> torch.Tensor:
    """sum_c x_cn d_c for x (B, C, N), direction d (B, C), as (B, N) in ``acc``. ``blas``
    (``columns_round_alike(x)``): one matrix product, which rounds every column alike on this
    machine and this problem; otherwise ``_column_dots``, which does so by construction."""
    if not blas:
        return _column_dots(x, direction, acc, workspace)
    B, C, _ = x.shape
    return rows_times(x, direction[:, None, :].expand(B, DOT_ROWS, C).contiguous())[:, 0]


def _c_contiguous(x: torch.Tensor) -> bool:
    """Channels are contiguous (channels_last, tokens): each column is one contiguous reduction."""
    return x.stride(1) == 1 and x.shape[1] > 1


def _sum_rows(t: torch.Tensor) -> torch.Tensor:
    """t (B, G, N) summed over G, the same way for every position: made contiguous in G first,
    so that each position is one contiguous reduction (summing over G in place would vectorise
    across positions, and vector lanes and a row's tail round differently)."""
    return t.transpose(1, 2).contiguous().sum(2)


def _small_norm(dtype: torch.dtype) -> float:
    """Below this norm, squares may have lost precision to underflow: such columns are rescaled."""
    info = torch.finfo(dtype)
    return (info.tiny / info.eps) ** 0.5


def _scaled_norms(rows: torch.Tensor) -> torch.Tensor:
    """||row|| over the last dim, without overflow or underflow: each row is divided by its
    largest magnitude first (0 for an all-zero row). A fresh tensor, not a view."""
    scale = rows.abs().amax(-1)
    safe = torch.where((scale > 0) & (scale < float("inf")), scale, 1.0)  # inf input: inf norm
    return torch.linalg.vector_norm(rows / safe[..., None], dim=-1) * torch.where(scale > 0, safe, 0.0)


def _norms(x: torch.Tensor, acc: torch.dtype, workspace: torch.Tensor, plan: Plan) -> torch.Tensor:
    """||x_n|| over C for x (B, C, N), in ``acc``, accurate for every finite x whose norms are finite.

    CPU: the plain sum of squares (one pass) serves every column whose result is comfortably
    inside the range; the rare others (norm overflowed, or so small that squares underflowed,
    or an all-zero column) are recomputed scaled, found by reading their count back to the
    host. Elsewhere: ``_power_of_two_scaled_norms``, branch-free. Each path reduces every
    column in the same order.
    """
    if not plan.cpu:
        return _power_of_two_scaled_norms(x, acc, workspace)
    if _c_contiguous(x):  # one contiguous reduction per column, no temporary
        B, C, N = x.shape
        norms = torch.empty(B, N, dtype=acc, device=x.device)
        step = max(1, BLOCK_BYTES // (B * C * _element_size(acc)))
        for lo in range(0, N, step):
            norms[:, lo : lo + step] = torch.linalg.vector_norm(x[:, :, lo : lo + step], dim=1, dtype=acc)
    else:
        norms = _column_dots(x, None, acc, workspace).sqrt_()
    redo = ~((norms >= _small_norm(acc)) & (norms < float("inf")))  # NaN input stays NaN
    b, n = redo.nonzero(as_tuple=True)
    if b.numel():
        columns = x.permute(0, 2, 1)[b, n].to(acc)  # (M, C): only the columns to redo
        norms[b, n] = _scaled_norms(columns)
    return norms


def _power_of_two_scale(amax: torch.Tensor) -> torch.Tensor:
    """2^-e with amax = m 2^e, m in [0.5, 1) (1 where amax is 0, inf or NaN), in amax's dtype,
    e clamped so that the scale is a normal number. Built from its bits: exact on every device."""
    # exponent bias (= the largest normal exponent), mantissa bits, the same-width integer
    bias, mantissa_bits, int_dtype = (1023, 52, torch.int64) if amax.dtype == torch.float64 else (127, 23, torch.int32)
    _, e = torch.frexp(amax)
    e = torch.where(torch.isfinite(amax), e, 0).clamp(1 - bias, bias - 1).to(int_dtype)
    return ((bias - e) << mantissa_bits).view(amax.dtype)


def _power_of_two_scaled_norms(x: torch.Tensor, acc: torch.dtype, workspace: torch.Tensor) -> torch.Tensor:
    """||x_n|| with each column scaled by a power of two near 1 / max_c |x_cn| first (``amax``
    is exact whatever the reduction order): no square overflows or underflows to a loss of
    precision, and where none did unscaled the result is bitwise the unscaled one (scaling by a
    power of two is exact). Two passes over x, no data-dependent branch."""
    B, C, N = x.shape
    scale = _power_of_two_scale(torch.linalg.vector_norm(x, float("inf"), dim=1).to(acc))  # (B, N)
    if _c_contiguous(x):
        out = torch.empty(B, N, dtype=acc, device=x.device)
        step = workspace.shape[2]
        for lo in range(0, N, step):
            block = x[:, :, lo : lo + step]
            buffer = workspace[:, :, : block.shape[2]]
            torch.mul(block, scale[:, None, lo : lo + step], out=buffer)
            torch.linalg.vector_norm(buffer, dim=1, out=out[:, lo : lo + step])
        return out.div_(scale)
    total = torch.zeros_like(workspace)
    scaled = torch.empty_like(workspace)
    rows = total.shape[1]
    for lo in range(0, C, rows):
        block = x[:, lo : lo + rows]
        buffer = scaled[:, : block.shape[1]]
        torch.mul(block, scale[:, None, :], out=buffer)
        total[:, : block.shape[1]].addcmul_(buffer, buffer)
    return _sum_rows(total).sqrt_().div_(scale)


def _position_slices(x: torch.Tensor, acc: torch.dtype, plan: Plan) -> list[slice]:
    """Slices of positions such that one slice of x upcast to ``acc`` stays below BLOCK_BYTES
    (CPU) or is a ``DEVICE_BLOCKS``-th of x (elsewhere).

    One slice when x is already in ``acc`` (no copy is made); float16/bfloat16 images are
    upcast a block of positions at a time, so that their peak memory is never above that of
    the same features in float32.
    """
    B, C, N = x.shape
    if x.dtype == acc:
        return [slice(0, N)]
    per_position = B * C * _element_size(acc)
    step = max(1, BLOCK_BYTES // per_position) if plan.cpu else _block(N, per_position, 0, plan)
    return [slice(lo, min(lo + step, N)) for lo in range(0, N, step)]


def _weighted_sums(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_n weights_kn x_n for x (B, C, N), weights (B, K, N): (B, K, C) contiguous, one pass.

    (B, K, N) @ (B, N, C) in every layout: with MKL on a 2-core Xeon, at (8, 2048, 28x28)
    float32 NCHW, K = 3, it took 1.9 ms against 5.1 ms for (B, C, N) @ (B, N, K) at 1 thread,
    and 2.4 ms against 7.5 ms for channels_last.
    """
    return torch.bmm(weights, x.transpose(1, 2))


def _weighted_sums_blocked(x: torch.Tensor, weights: torch.Tensor, acc: torch.dtype, plan: Plan) -> torch.Tensor:
    """``_weighted_sums`` of x upcast to ``acc`` a block of positions at a time."""
    total = None
    for s in _position_slices(x, acc, plan):
        part = _weighted_sums(x[:, :, s].to(acc), weights[:, :, s])
        total = part if total is None else total.add_(part)
    return total


def _last_level_cache_bytes(default: int = 32 << 20) -> int:
    """The largest CPU cache's size (Linux sysfs), or ``default`` where it cannot be read."""
    sizes = []
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(index) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=default)


# On CPU the batch is processed a few images at a time, so that each chunk of X stays in the
# last-level cache across its passes and only the first pass reads DRAM (at (8, 2048, 28x28)
# on a 2-core AMD EPYC with 16 MB chunks: forward 8.4 -> ~7.3 ms). Where the cache holds the
# whole batch, chunks only add calls (2-core Xeon, 260 MB L3: 20.9 ms in 2-image chunks, 14.1 ms
# in one, at 1 thread).
CACHE_CHUNK_BYTES = _last_level_cache_bytes() // 2


def _batch_chunks(x: torch.Tensor, plan: Plan) -> list[slice]:
    B, C, N = x.shape
    if not plan.cpu:
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
    plan: Plan | None = None,
) -> Forward:
    """BR-NPA forward on x (B, C, N). ``seed_indices`` (B, K) replaces the greedy selection;
    ``by_activity`` ranks the parts by activity, descending (stable). ``plan``: ``plan_for(x)``
    by default. Every output is a fresh tensor (no view of another), which the caller may edit."""
    plan = plan_for(x) if plan is None else plan
    chunks = [
        _forward_images(x[s], num_parts, refine, None if seed_indices is None else seed_indices[s], by_activity, plan)
        for s in _batch_chunks(x, plan)
    ]
    if len(chunks) == 1:
        return Forward(*(t.clone() if t._is_view() else t for t in chunks[0]))
    return Forward(*(torch.cat(outputs) for outputs in zip(*chunks, strict=True)))


def _forward_images(
    x: torch.Tensor, num_parts: int, refine: bool, seed_indices: torch.Tensor | None, by_activity: bool, plan: Plan
) -> Forward:
    B, C, N = x.shape
    K = num_parts
    acc = accumulation_dtype(x.dtype)
    workspace = _workspace(x, acc, plan)
    blas = plan.cpu and columns_round_alike(x)
    norms = _norms(x, acc, workspace, plan)
    rho = norms + EPS
    score = rho
    sims = torch.empty(B, K, N, dtype=acc, device=x.device)
    chosen = []
    for k in range(K):
        # Only what the next selection needs stays in the loop; the per-part normalisation
        # is done for all parts at once below (the loop's ops are small and their count shows).
        idx = score.argmax(dim=1) if seed_indices is None else seed_indices[:, k]
        chosen.append(idx)
        seed = _gather_positions(x, idx[:, None])[:, 0].to(acc)  # (B, C)
        # sim = x_n . (r / rho_i) / rho_n: every product is at most |x_cn| and every partial
        # sum at most ||x_n||, so nothing overflows where the norms do not.
        direction = seed / rho.gather(1, idx[:, None])
        sim = torch.div(_seed_dots(x, direction, acc, workspace, blas), rho, out=sims[:, k])
        if seed_indices is None:
            score = score.addcmul(score, sim, value=-1.0)  # s * (1 - sim)
    indices = torch.stack(chosen, 1)
    totals = sims.sum(dim=2)
    inverse = totals.reciprocal()
    # Degenerate: S_k cancels, or is too small to invert (similarities that underflowed).
    degenerate = (totals.abs() <= DEGENERATE_SUM_RATIO * sims.abs().sum(dim=2)) | inverse.isinf()
    inv_sums = torch.where(degenerate, 0.0, inverse)
    maps = torch.where(degenerate[..., None], 1.0 / N, sims * inv_sums[..., None])
    if refine:
        vectors = _weighted_sums_blocked(x, maps, acc, plan)  # one pass over X for all parts
    else:
        vectors = _gather_positions(x, indices).to(acc).contiguous()  # outputs are contiguous (B, K, C)
    activity = _scaled_norms(vectors)
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
    plan: Plan | None = None,
) -> torch.Tensor:
    """dL/dx (B, C, N), in x's dtype (and strides, for dense x), from the spec's closed form.

    Gradients of outputs that did not reach the loss may be None. float16 gradients overflow
    to inf where the true gradient exceeds the dtype's range, as PyTorch's own do.
    """
    plan = plan_for(x) if plan is None else plan
    dx = empty_like_hugepages(x)  # fresh, so huge pages spare it most first-touch page faults
    for s in _batch_chunks(x, plan):
        _backward_images(
            x[s],
            None if grad_vectors is None else grad_vectors[s],
            None if grad_maps is None else grad_maps[s],
            None if grad_activity is None else grad_activity[s],
            None if grad_norms is None else grad_norms[s],
            SavedForward(*(t[s] for t in saved)),
            refine,
            plan,
            out=dx[s],
        )
    return dx


def _backward_images(
    x, grad_vectors, grad_maps, grad_activity, grad_norms, saved: SavedForward, refine: bool, plan: Plan,
    out: torch.Tensor,
):
    """Writes dL/dx of these images into ``out``."""
    B, C, N = x.shape
    K = saved.indices.shape[1]
    ct = accumulation_dtype(x.dtype)
    slices = _position_slices(x, ct, plan)  # float16/bfloat16: upcast a block of positions at a time
    maps = saved.maps.to(ct)
    norms = saved.norms.to(ct)
    rho = norms + EPS
    seeds = _gather_positions(x, saved.indices).to(ct)  # r_k, (B, K, C)
    rho_seed = rho.gather(1, saved.indices)
    seed_norm = norms.gather(1, saved.indices)
    g_vec = torch.zeros(B, K, C, dtype=ct, device=x.device) if grad_vectors is None else grad_vectors.to(ct)
    if grad_activity is not None:  # activity = ||v_k||: its gradient joins v_k's
        vectors = saved.vectors.to(ct)
        length = _scaled_norms(vectors)[..., None]
        unit = vectors / torch.where(length > 0, length, 1.0)
        g_vec = g_vec + grad_activity.to(ct)[..., None] * unit
    g_map = torch.zeros(B, K, N, dtype=ct, device=x.device) if grad_maps is None else grad_maps.to(ct)

    # Pass 1: the seed dot products (to rebuild sim) and, when refining, gV_k . x_n. The seeds
    # are divided by rho_ik first, as in the forward, so that no product overflows.
    seeds_scaled = seeds / rho_seed[..., None]
    lhs = torch.cat([seeds_scaled, g_vec], 1) if refine else seeds_scaled
    if len(slices) == 1:
        products = torch.bmm(lhs, x.to(ct))  # (B, 2K or K, N)
    else:
        products = torch.empty(B, lhs.shape[1], N, dtype=ct, device=x.device)
        for s in slices:
            products[:, :, s] = torch.bmm(lhs, x[:, :, s].to(ct))
    sim = products[:, :K] / rho[:, None, :]
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
    u = _weighted_sums_blocked(x, simbar_over_rho, ct, plan)  # (B, K, C)
    w = (simbar * sim).sum(-1)

    # Seed rows: dx_ik += (u_k - w_k r_k / ||r_k||) / rho_ik; accumulate on repeats.
    unit_seeds = seeds / torch.where(seed_norm > 0, seed_norm, 1.0)[..., None]  # 0 for a zero seed
    seed_grad = (u - w[..., None] * unit_seeds) / rho_seed[..., None]
    if not refine:
        seed_grad = seed_grad + g_vec

    # Passes 3-4: dx_n = c_n x_n / ||x_n|| + sum_k [a_kn gV_k + simbar_kn r_k / (rho_n rho_ik)]
    radial = -(simbar_over_rho * sim).sum(1)  # coefficient of x_n / ||x_n||
    if grad_norms is not None:
        radial = radial + grad_norms.to(ct)
    radial = torch.where(norms > 0, radial / torch.where(norms > 0, norms, 1.0), 0.0)
    if refine:
        left, right = torch.cat([g_vec, seeds_scaled], 1).transpose(1, 2), torch.cat([maps, simbar_over_rho], 1)
    else:
        left, right = seeds_scaled.transpose(1, 2), simbar_over_rho
    for s in slices:
        block = x[:, :, s]
        dx = out[:, :, s] if out.dtype == ct else torch.empty(block.shape, dtype=ct, device=x.device)
        torch.mul(block, radial[:, None, s], out=dx)  # float16/bfloat16 blocks are read in place
        dx.baddbmm_(left, right[:, :, s])
        _add_seed_rows(dx, saved.indices, seed_grad, s, N)
        if dx.dtype != out.dtype:
            out[:, :, s].copy_(dx)


def _add_seed_rows(dx: torch.Tensor, indices: torch.Tensor, seed_grad: torch.Tensor, positions: slice, N: int):
    """dx (B, C, n) holds ``positions`` of dX: add seed_grad (B, K, C) to the seed columns in it."""
    B, C, _ = dx.shape
    K = indices.shape[1]
    if positions.start == 0 and positions.stop == N:
        dx.scatter_add_(2, indices[:, None, :].expand(B, C, K), seed_grad.transpose(1, 2))
        return
    inside = (indices >= positions.start) & (indices < positions.stop)
    local = torch.where(inside, indices - positions.start, 0)
    values = torch.where(inside[..., None], seed_grad, 0.0)
    dx.scatter_add_(2, local[:, None, :].expand(B, C, K), values.transpose(1, 2))
