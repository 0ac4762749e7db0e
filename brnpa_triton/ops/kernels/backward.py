"""Fused BR-NPA backward (the spec's closed form): 2 launches over grid (B, S), X read once,
dX written once (plus the K seed columns).

With sim, S, a, v, r, rho as in the forward, gV = dL/dv (plus the activity gradient,
gAct_k v_k / ||v_k||) and gA = dL/da:

    T_k       = sum_n gA_kn a_kn + gV_k . v_k                 (saved outputs only)
    simbar_kn = (gA_kn + gV_k . x_n - T_k) / S_k              (0 for degenerate parts)
    U_kn      = simbar_kn / rho_n
    dx_n      = radial_n x_n + sum_k [a_kn gV_k + U_kn r_k / rho_ik]
    radial_n  = (gN_n - sum_k U_kn sim_kn) / ||x_n||           (0 where x_n = 0)
    dx_ik    += u_k / rho_ik - w_k r_k / (rho_ik ||r_k||),   u_k = sum_n U_kn x_n,
                w_k = sum_n simbar_kn sim_kn
(without refinement the gV terms leave abar, T and dx_n, and dx_ik += gV_k instead).

Outline:
1. ``backward_dx_kernel``: each program computes T_k and ||v_k|| for its image (saved outputs
   only), then for each tile of its chunk: one sweep over C for the dot products with the
   seeds and with gV (parts in groups of KG), giving sim, simbar, U and radial; a second sweep
   over the same tile (from cache) writes dx and adds the tile's share of u_k; w_k and u_k are
   accumulated per chunk in the workspace.
2. ``backward_seeds_kernel``: each program sums the chunks' u_k, w_k over a slice of channels
   (chunk order) and adds the corrections to the seed columns; a column seeded by several parts
   gets all their corrections, written once.
"""

import triton
import triton.language as tl

from brnpa_triton.ops.kernels.common import (
    EPS_C,
    INTEGER_ARGS,
    acc_const,
    acc_sqrt,
    bound_if,
    column_offsets,
    from_units,
    image_base,
    load_column,
    load_tile,
    power_of_two_scales,
    tile_offsets,
)


@triton.jit
def _grad_vectors(gvec_b, vec_b, gact_b, lengths, offs_k, valid_k, offs_c, mask_kc, C, HAS_GRAD_VECTORS: tl.constexpr,
                  HAS_GRAD_ACTIVITY: tl.constexpr, KG: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """gV_k + gAct_k v_k / ||v_k|| for a group of parts and a block of channels, (KG, BLOCK_C)."""
    grad = tl.zeros([KG, BLOCK_C], ACC)
    offsets = offs_k[:, None] * C + offs_c[None, :]
    if HAS_GRAD_VECTORS:
        grad += tl.load(gvec_b + offsets, mask=mask_kc, other=0.0).to(ACC)
    if HAS_GRAD_ACTIVITY:
        v = tl.load(vec_b + offsets, mask=mask_kc, other=0.0).to(ACC)
        g_act = tl.load(gact_b + offs_k, mask=valid_k, other=0.0).to(ACC)
        unit = tl.where(lengths > 0, g_act / tl.where(lengths > 0, lengths, 1.0), 0.0)
        grad += unit[:, None] * v
    return grad


@triton.jit
def _image_totals(gvec_b, gmap_b, gact_b, vec_b, maps_b, totals_ws, K, C, N, REFINE: tl.constexpr,
                  HAS_GRAD_VECTORS: tl.constexpr, HAS_GRAD_MAPS: tl.constexpr, HAS_GRAD_ACTIVITY: tl.constexpr,
                  KG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """T_k and ||v_k|| of image b, to this program's slot (2, K) of the workspace."""
    for k0 in range(0, K, KG):
        offs_k = k0 + tl.arange(0, KG)
        valid_k = offs_k < K
        lengths = tl.zeros([KG], ACC)
        if HAS_GRAD_ACTIVITY:
            squares = tl.zeros([KG, BLOCK_C], ACC)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                mask = valid_k[:, None] & (offs_c < C)[None, :]
                v = tl.load(vec_b + offs_k[:, None] * C + offs_c[None, :], mask=mask, other=0.0).to(ACC)
                squares += v * v
            lengths = acc_sqrt(tl.sum(squares, axis=1), ACC)
        totals = tl.zeros([KG], ACC)
        if HAS_GRAD_MAPS:
            products = tl.zeros([KG, BLOCK_N], ACC)
            for n0 in range(0, N, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                mask = valid_k[:, None] & (offs_n < N)[None, :]
                offsets = offs_k[:, None] * N + offs_n[None, :]
                g = tl.load(gmap_b + offsets, mask=mask, other=0.0).to(ACC)
                a = tl.load(maps_b + offsets, mask=mask, other=0.0).to(ACC)
                products += g * a
            totals += tl.sum(products, axis=1)
        if REFINE:
            if HAS_GRAD_VECTORS or HAS_GRAD_ACTIVITY:
                products_v = tl.zeros([KG, BLOCK_C], ACC)
                for c0 in range(0, C, BLOCK_C):
                    offs_c = c0 + tl.arange(0, BLOCK_C)
                    mask = valid_k[:, None] & (offs_c < C)[None, :]
                    g = _grad_vectors(gvec_b, vec_b, gact_b, lengths, offs_k, valid_k, offs_c, mask, C,
                                      HAS_GRAD_VECTORS, HAS_GRAD_ACTIVITY, KG, BLOCK_C, ACC)
                    v = tl.load(vec_b + offs_k[:, None] * C + offs_c[None, :], mask=mask, other=0.0).to(ACC)
                    products_v += g * v
                totals += tl.sum(products_v, axis=1)
        tl.store(totals_ws + offs_k, totals, mask=valid_k)
        tl.store(totals_ws + K + offs_k, lengths, mask=valid_k)


@triton.jit
def _part_columns(x_b, gvec_b, vec_b, gact_b, indices_b, norms_b, totals_ws, part, offs_c, C, N, K,
                  stride_c, stride_n, LAYOUT: tl.constexpr, ALIGN: tl.constexpr, WITH_GRAD: tl.constexpr,
                  HAS_GRAD_VECTORS: tl.constexpr, HAS_GRAD_ACTIVITY: tl.constexpr, BLOCK_C: tl.constexpr,
                  ACC: tl.constexpr):
    """(r_k / rho_ik, gV_k + gAct_k v_k / ||v_k||) over a block of channels for part ``part``:
    zeros for a part past K, and the seed column only read when the seed lies in [0, N)."""
    valid = (part + tl.zeros([], tl.int32)) < K
    seed = tl.load(indices_b + part, mask=valid, other=0)
    seed_valid = valid & (seed >= 0) & (seed < N)
    safe = tl.where(seed_valid, seed, 0)
    rho_seed = tl.load(norms_b + safe, mask=seed_valid, other=0.0) + acc_const(EPS_C, ACC)
    row = load_column(x_b, offs_c, safe, seed_valid, C, stride_c, stride_n, LAYOUT, ALIGN, ACC)
    row = row * (acc_const(1.0, ACC) / rho_seed)
    grad = tl.zeros([BLOCK_C], ACC)
    if WITH_GRAD:
        part_c = offs_c < bound_if(valid, C)
        if HAS_GRAD_VECTORS:
            grad += tl.load(gvec_b + part * C + offs_c, mask=part_c, other=0.0).to(ACC)
        if HAS_GRAD_ACTIVITY:
            length = tl.load(totals_ws + K + part, mask=valid, other=0.0)
            g_act = tl.load(gact_b + part, mask=valid, other=0.0).to(ACC)
            v = tl.load(vec_b + part * C + offs_c, mask=part_c, other=0.0).to(ACC)
            grad += tl.where(length > 0, g_act / tl.where(length > 0, length, 1.0), 0.0) * v
    return row, grad


@triton.jit
def _tile_part_dots(x_b, gvec_b, vec_b, gact_b, indices_b, norms_b, totals_ws, k0, offs_n, C, N, K,
                    stride_c, stride_n, LAYOUT: tl.constexpr, ALIGN: tl.constexpr, WITH_GRAD: tl.constexpr,
                    HAS_GRAD_VECTORS: tl.constexpr, HAS_GRAD_ACTIVITY: tl.constexpr, KG: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """dot(x_n, r_k / rho_ik) and gV_k . x_n for one tile of positions and parts k0 .. k0 + KG - 1
    (KG <= 4), accumulated elementwise over the C loop, one accumulator per part, and reduced
    over C once after it: eight (BLOCK_N,) vectors (zeros for parts past K or KG)."""
    s0 = tl.zeros([BLOCK_C, BLOCK_N], ACC)
    s1 = tl.zeros([BLOCK_C, BLOCK_N], ACC)
    s2 = tl.zeros([BLOCK_C, BLOCK_N], ACC)
    s3 = tl.zeros([BLOCK_C, BLOCK_N], ACC)
    g0 = tl.zeros([BLOCK_C, BLOCK_N], ACC)
    g1 = tl.zeros([BLOCK_C, BLOCK_N], ACC)
    g2 = tl.zeros([BLOCK_C, BLOCK_N], ACC)
    g3 = tl.zeros([BLOCK_C, BLOCK_N], ACC)
    # The next tile's loads are issued before this one is used: two tiles in flight.
    tile = load_tile(x_b, tl.arange(0, BLOCK_C), offs_n, C, N, stride_c, stride_n, LAYOUT, ALIGN, ACC)
    for c0 in range(0, C, BLOCK_C):  # streams X
        offs_c = c0 + tl.arange(0, BLOCK_C)
        upcoming = load_tile(x_b, offs_c + BLOCK_C, offs_n, C, N, stride_c, stride_n, LAYOUT, ALIGN, ACC)
        row, grad = _part_columns(x_b, gvec_b, vec_b, gact_b, indices_b, norms_b, totals_ws, k0, offs_c, C, N, K,
                                  stride_c, stride_n, LAYOUT, ALIGN, WITH_GRAD, HAS_GRAD_VECTORS,
                                  HAS_GRAD_ACTIVITY, BLOCK_C, ACC)
        s0 += tile * row[:, None]
        if WITH_GRAD:
            g0 += tile * grad[:, None]
        if KG > 1:
            row, grad = _part_columns(x_b, gvec_b, vec_b, gact_b, indices_b, norms_b, totals_ws, k0 + 1, offs_c, C,
                                      N, K, stride_c, stride_n, LAYOUT, ALIGN, WITH_GRAD, HAS_GRAD_VECTORS,
                                      HAS_GRAD_ACTIVITY, BLOCK_C, ACC)
            s1 += tile * row[:, None]
            if WITH_GRAD:
                g1 += tile * grad[:, None]
        if KG > 2:
            row, grad = _part_columns(x_b, gvec_b, vec_b, gact_b, indices_b, norms_b, totals_ws, k0 + 2, offs_c, C,
                                      N, K, stride_c, stride_n, LAYOUT, ALIGN, WITH_GRAD, HAS_GRAD_VECTORS,
                                      HAS_GRAD_ACTIVITY, BLOCK_C, ACC)
            s2 += tile * row[:, None]
            if WITH_GRAD:
                g2 += tile * grad[:, None]
            row, grad = _part_columns(x_b, gvec_b, vec_b, gact_b, indices_b, norms_b, totals_ws, k0 + 3, offs_c, C,
                                      N, K, stride_c, stride_n, LAYOUT, ALIGN, WITH_GRAD, HAS_GRAD_VECTORS,
                                      HAS_GRAD_ACTIVITY, BLOCK_C, ACC)
            s3 += tile * row[:, None]
            if WITH_GRAD:
                g3 += tile * grad[:, None]
        tile = upcoming
    return (tl.sum(s0, axis=0), tl.sum(g0, axis=0), tl.sum(s1, axis=0), tl.sum(g1, axis=0),
            tl.sum(s2, axis=0), tl.sum(g2, axis=0), tl.sum(s3, axis=0), tl.sum(g3, axis=0))


@triton.jit
def _part_terms(seed_dots, grad_dots, part, offs_n, rho, gmap_b, inv_sums_b, totals_ws, u_coef_b, w_sums_b,
                accumulate, K, N, S, HAS_GRAD_MAPS: tl.constexpr, ACC: tl.constexpr):
    """Part ``part``'s simbar and U over one tile: stores U_kn, adds the tile's sum_n simbar sim
    to the chunk's w_k, and returns U_kn sim_kn (the part's share of the radial term)."""
    valid = (part + tl.zeros([], tl.int32)) < K
    part_n = offs_n < bound_if(valid, N)
    sims = seed_dots / rho
    abar = grad_dots
    if HAS_GRAD_MAPS:
        abar += tl.load(gmap_b + part * N + offs_n, mask=part_n, other=0.0).to(ACC)
    total = tl.load(totals_ws + part, mask=valid, other=0.0)
    inv = tl.load(inv_sums_b + part, mask=valid, other=0.0).to(ACC)
    simbar = tl.where(part_n, (abar - total) * inv, 0.0)
    u_coef = simbar / rho
    tl.store(u_coef_b + part * N + offs_n, u_coef, mask=part_n)
    one = tl.arange(0, 1)
    w_ptr = w_sums_b + part * S + one
    previous = tl.load(w_ptr, mask=one < bound_if(valid & accumulate, 1), other=0.0)
    tl.store(w_ptr, previous + tl.sum(simbar * sims, axis=0), mask=one < bound_if(valid, 1))
    return u_coef * sims


@triton.jit
def _part_dx(dx, tile, x_b, gvec_b, vec_b, gact_b, maps_b, indices_b, norms_b, totals_ws, u_coef_b, u_sums_b, part,
             offs_c, offs_n, accumulate, C, N, K, S, stride_c, stride_n, LAYOUT: tl.constexpr, ALIGN: tl.constexpr,
             WITH_GRAD: tl.constexpr, HAS_GRAD_VECTORS: tl.constexpr, HAS_GRAD_ACTIVITY: tl.constexpr,
             BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """dx tile += a_kn gV_k + U_kn r_k / rho_ik for part ``part``; adds the tile's sum_n U_kn x_n
    to the chunk's u_k."""
    valid = (part + tl.zeros([], tl.int32)) < K
    part_n = offs_n < bound_if(valid, N)
    row, grad = _part_columns(x_b, gvec_b, vec_b, gact_b, indices_b, norms_b, totals_ws, part, offs_c, C, N, K,
                              stride_c, stride_n, LAYOUT, ALIGN, WITH_GRAD, HAS_GRAD_VECTORS, HAS_GRAD_ACTIVITY,
                              BLOCK_C, ACC)
    u_coef = tl.load(u_coef_b + part * N + offs_n, mask=part_n, other=0.0)
    dx += u_coef[None, :] * row[:, None]
    if WITH_GRAD:
        a = tl.load(maps_b + part * N + offs_n, mask=part_n, other=0.0).to(ACC)
        dx += a[None, :] * grad[:, None]
    u_ptrs = u_sums_b + part * S * C + offs_c
    previous = tl.load(u_ptrs, mask=offs_c < bound_if(valid & accumulate, C), other=0.0)
    tl.store(u_ptrs, previous + tl.sum(tile * u_coef[None, :], axis=1), mask=offs_c < bound_if(valid, C))
    return dx


@triton.jit
def _tile_dx(x_b, dx_b, offs_n, radial, down, gvec_b, vec_b, gact_b, maps_b, indices_b, norms_b, totals_ws, u_coef_b,
             u_sums_b, accumulate, C, N, K, S, stride_c, stride_n, stride_dc, stride_dn,
             LAYOUT: tl.constexpr, ALIGN: tl.constexpr, DX_LAYOUT: tl.constexpr, DX_ALIGN: tl.constexpr,
             WITH_GRAD: tl.constexpr, HAS_GRAD_VECTORS: tl.constexpr, HAS_GRAD_ACTIVITY: tl.constexpr,
             KG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """Writes dx for one tile (second look at the tile, from cache) and adds the tile's
    sum_n U_kn x_n to the chunks' partial u_k. ``radial * down`` is the coefficient of x_n / ||x_n||."""
    valid_n = offs_n < N
    # The next tile's loads are issued before this one is used: two tiles in flight.
    tile = load_tile(x_b, tl.arange(0, BLOCK_C), offs_n, C, N, stride_c, stride_n, LAYOUT, ALIGN, ACC)
    for c0 in range(0, C, BLOCK_C):  # streams X
        offs_c = c0 + tl.arange(0, BLOCK_C)
        upcoming = load_tile(x_b, offs_c + BLOCK_C, offs_n, C, N, stride_c, stride_n, LAYOUT, ALIGN, ACC)
        dx = radial[None, :] * (tile * down[None, :])
        for k0 in range(0, K, KG):
            dx = _part_dx(dx, tile, x_b, gvec_b, vec_b, gact_b, maps_b, indices_b, norms_b, totals_ws, u_coef_b,
                          u_sums_b, k0, offs_c, offs_n, accumulate, C, N, K, S, stride_c, stride_n, LAYOUT, ALIGN,
                          WITH_GRAD, HAS_GRAD_VECTORS, HAS_GRAD_ACTIVITY, BLOCK_C, ACC)
            if KG > 1:
                dx = _part_dx(dx, tile, x_b, gvec_b, vec_b, gact_b, maps_b, indices_b, norms_b, totals_ws, u_coef_b,
                              u_sums_b, k0 + 1, offs_c, offs_n, accumulate, C, N, K, S, stride_c, stride_n, LAYOUT,
                              ALIGN, WITH_GRAD, HAS_GRAD_VECTORS, HAS_GRAD_ACTIVITY, BLOCK_C, ACC)
            if KG > 2:
                dx = _part_dx(dx, tile, x_b, gvec_b, vec_b, gact_b, maps_b, indices_b, norms_b, totals_ws, u_coef_b,
                              u_sums_b, k0 + 2, offs_c, offs_n, accumulate, C, N, K, S, stride_c, stride_n, LAYOUT,
                              ALIGN, WITH_GRAD, HAS_GRAD_VECTORS, HAS_GRAD_ACTIVITY, BLOCK_C, ACC)
                dx = _part_dx(dx, tile, x_b, gvec_b, vec_b, gact_b, maps_b, indices_b, norms_b, totals_ws, u_coef_b,
                              u_sums_b, k0 + 3, offs_c, offs_n, accumulate, C, N, K, S, stride_c, stride_n, LAYOUT,
                              ALIGN, WITH_GRAD, HAS_GRAD_VECTORS, HAS_GRAD_ACTIVITY, BLOCK_C, ACC)
        offsets = tile_offsets(offs_c, offs_n, stride_dc, stride_dn, DX_LAYOUT, DX_ALIGN)
        tl.store(dx_b + offsets, dx.to(dx_b.dtype.element_ty), mask=(offs_c < C)[:, None] & valid_n[None, :])
        tile = upcoming


@triton.jit(do_not_specialize=INTEGER_ARGS["backward_dx_kernel"])
def backward_dx_kernel(
    x_ptr, dx_ptr,  # (B, C, N), each with its layout; strides in units of (DX_)ALIGN when contiguous
    gvec_ptr, gmap_ptr, gact_ptr, gnorm_ptr,  # gradients (B,K,C), (B,K,N), (B,K), (B,N), contiguous (HAS_*)
    vec_ptr, maps_ptr, indices_ptr, norms_ptr, inv_sums_ptr,  # saved forward outputs, contiguous
    totals_ptr,  # workspace (B, S, 2, K): each program's T_k and ||v_k||
    u_coef_ptr,  # workspace (B, K, N): U_kn
    u_sums_ptr,  # workspace (B, K, S, C): the chunks' u_k
    w_sums_ptr,  # workspace (B, K, S): the chunks' w_k
    C, N, K, S, tiles_per_chunk,
    stride_xb, stride_xc, stride_xn, stride_db, stride_dc, stride_dn,
    LAYOUT: tl.constexpr, ALIGN: tl.constexpr, DX_LAYOUT: tl.constexpr, DX_ALIGN: tl.constexpr,
    REFINE: tl.constexpr, HAS_GRAD_VECTORS: tl.constexpr, HAS_GRAD_MAPS: tl.constexpr,
    HAS_GRAD_ACTIVITY: tl.constexpr, HAS_GRAD_NORMS: tl.constexpr,
    KG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    C_ALIGN: tl.constexpr, N_ALIGN: tl.constexpr, ACC: tl.constexpr,
):
    b = tl.program_id(0)
    s = tl.program_id(1)
    C = from_units(C, C_ALIGN)
    N = from_units(N, N_ALIGN)
    b64 = b.to(tl.int64)
    x_b = image_base(x_ptr, b, stride_xb, LAYOUT, ALIGN)
    dx_b = image_base(dx_ptr, b, stride_db, DX_LAYOUT, DX_ALIGN)
    gvec_b = gvec_ptr + b64 * K * C
    gmap_b = gmap_ptr + b64 * K * N
    inv_sums_b = inv_sums_ptr + b64 * K
    gact_b = gact_ptr + b64 * K
    vec_b = vec_ptr + b64 * K * C
    maps_b = maps_ptr + b64 * K * N
    indices_b = indices_ptr + b64 * K
    norms_b = norms_ptr + b64 * N
    totals_ws = totals_ptr + (b64 * S + s) * 2 * K
    u_coef_b = u_coef_ptr + b64 * K * N
    u_sums_b = u_sums_ptr + b64 * K * S * C + s * C  # part k at + k * S * C
    w_sums_b = w_sums_ptr + b64 * K * S + s  # part k at + k * S
    eps = acc_const(EPS_C, ACC)
    one = acc_const(1.0, ACC)
    WITH_GRAD: tl.constexpr = REFINE and (HAS_GRAD_VECTORS or HAS_GRAD_ACTIVITY)

    _image_totals(gvec_b, gmap_b, gact_b, vec_b, maps_b, totals_ws, K, C, N, REFINE, HAS_GRAD_VECTORS,
                  HAS_GRAD_MAPS, HAS_GRAD_ACTIVITY, KG, BLOCK_C, BLOCK_N, ACC)
    tl.debug_barrier()  # the totals are read back by other threads

    chunk_start = s * tiles_per_chunk * BLOCK_N
    for t in range(0, tiles_per_chunk):  # one tile of positions at a time (its C loops stream X)
        offs_n = chunk_start + t * BLOCK_N + tl.arange(0, BLOCK_N)
        valid_n = offs_n < N
        norms = tl.load(norms_b + offs_n, mask=valid_n, other=0.0)
        rho = norms + eps
        radial = tl.zeros([BLOCK_N], ACC)
        if HAS_GRAD_NORMS:
            radial += tl.load(gnorm_ptr + b64 * N + offs_n, mask=valid_n, other=0.0).to(ACC)
        for k0 in range(0, K, KG):  # groups of 4 parts (more than 4: the tile again, from cache)
            s0, g0, s1, g1, s2, g2, s3, g3 = _tile_part_dots(
                x_b, gvec_b, vec_b, gact_b, indices_b, norms_b, totals_ws, k0, offs_n, C, N, K, stride_xc, stride_xn,
                LAYOUT, ALIGN, WITH_GRAD, HAS_GRAD_VECTORS, HAS_GRAD_ACTIVITY, KG, BLOCK_C, BLOCK_N, ACC)
            radial -= _part_terms(s0, g0, k0, offs_n, rho, gmap_b, inv_sums_b, totals_ws, u_coef_b, w_sums_b, t > 0,
                                  K, N, S, HAS_GRAD_MAPS, ACC)
            if KG > 1:
                radial -= _part_terms(s1, g1, k0 + 1, offs_n, rho, gmap_b, inv_sums_b, totals_ws, u_coef_b, w_sums_b,
                                      t > 0, K, N, S, HAS_GRAD_MAPS, ACC)
            if KG > 2:
                radial -= _part_terms(s2, g2, k0 + 2, offs_n, rho, gmap_b, inv_sums_b, totals_ws, u_coef_b, w_sums_b,
                                      t > 0, K, N, S, HAS_GRAD_MAPS, ACC)
                radial -= _part_terms(s3, g3, k0 + 3, offs_n, rho, gmap_b, inv_sums_b, totals_ws, u_coef_b, w_sums_b,
                                      t > 0, K, N, S, HAS_GRAD_MAPS, ACC)
        # radial_n x_n / ||x_n||, computed as (radial_n / (||x_n|| 2^-e)) (x_n 2^-e) with
        # 2^e ~ ||x_n||: exact scalings, so tiny norms do not overflow the quotient.
        down, up = power_of_two_scales(norms, ACC)
        scaled_norms = norms * down
        radial = tl.where(norms > 0, radial / tl.where(norms > 0, scaled_norms, one), 0.0)
        tl.debug_barrier()  # U_kn, stored above, is reloaded by other threads
        _tile_dx(x_b, dx_b, offs_n, radial, down, gvec_b, vec_b, gact_b, maps_b, indices_b, norms_b, totals_ws,
                 u_coef_b, u_sums_b, t > 0, C, N, K, S, stride_xc, stride_xn, stride_dc, stride_dn, LAYOUT, ALIGN,
                 DX_LAYOUT, DX_ALIGN, WITH_GRAD, HAS_GRAD_VECTORS, HAS_GRAD_ACTIVITY, KG, BLOCK_C, BLOCK_N, ACC)
        tl.debug_barrier()  # this tile's partial u_k, w_k are stored before the next tile reloads them


@triton.jit
def _seed_correction(x_b, k, seed, c_offs, c_stop, u_sums_b, w_sums_b, norms_b, gvec_b, vec_b, gact_b, length,
                     C, S, stride_c, stride_n, LAYOUT: tl.constexpr, ALIGN: tl.constexpr, REFINE: tl.constexpr,
                     HAS_GRAD_VECTORS: tl.constexpr, HAS_GRAD_ACTIVITY: tl.constexpr, BLOCK_S: tl.constexpr,
                     ACC: tl.constexpr):
    """u_k / rho_ik - w_k r_k / (rho_ik ||r_k||) (+ gV_k without refinement) over c_offs."""
    u = tl.zeros(c_offs.shape, ACC)
    for chunk in range(0, S):  # chunk order: deterministic
        u += tl.load(u_sums_b + (k * S + chunk) * C + c_offs, mask=c_offs < c_stop, other=0.0)
    w_parts = tl.zeros([BLOCK_S], ACC)
    for s0 in range(0, S, BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)
        w_parts += tl.load(w_sums_b + k * S + offs, mask=offs < S, other=0.0)
    w = tl.sum(w_parts, axis=0)
    norm = tl.load(norms_b + seed)
    rho = norm + acc_const(EPS_C, ACC)
    # w_k r_k / (rho ||r_k||) with the exact scaling 2^-e ~ 1 / ||r_k||: no overflow for tiny seeds.
    down, up = power_of_two_scales(norm, ACC)
    inv_seed_norm = tl.where(norm > 0, 1.0 / (rho * tl.where(norm > 0, norm * down, 1.0)), 0.0)
    safe = c_offs < c_stop
    r = tl.load(x_b + column_offsets(c_offs, seed, stride_c, LAYOUT, ALIGN, stride_n), mask=safe, other=0.0).to(ACC)
    correction = u / rho - (w * inv_seed_norm) * (r * down)
    if not REFINE:
        if HAS_GRAD_VECTORS:
            correction += tl.load(gvec_b + k * C + c_offs, mask=safe, other=0.0).to(ACC)
        if HAS_GRAD_ACTIVITY:
            v = tl.load(vec_b + k * C + c_offs, mask=safe, other=0.0).to(ACC)
            g_act = tl.load(gact_b + k).to(ACC)
            correction += tl.where(length > 0, g_act / tl.where(length > 0, length, 1.0), 0.0) * v
    return correction


@triton.jit(do_not_specialize=INTEGER_ARGS["backward_seeds_kernel"])
def backward_seeds_kernel(
    x_ptr, dx_ptr,
    gvec_ptr, gact_ptr, vec_ptr, indices_ptr, norms_ptr,
    totals_ptr, u_sums_ptr, w_sums_ptr,  # from backward_dx_kernel
    C, N, K, S, c_per_program,
    stride_xb, stride_xc, stride_xn, stride_db, stride_dc, stride_dn,
    LAYOUT: tl.constexpr, ALIGN: tl.constexpr, DX_LAYOUT: tl.constexpr, DX_ALIGN: tl.constexpr,
    REFINE: tl.constexpr, HAS_GRAD_VECTORS: tl.constexpr, HAS_GRAD_ACTIVITY: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, C_ALIGN: tl.constexpr, N_ALIGN: tl.constexpr, ACC: tl.constexpr,
):
    b = tl.program_id(0)
    s = tl.program_id(1)
    C = from_units(C, C_ALIGN)
    N = from_units(N, N_ALIGN)
    b64 = b.to(tl.int64)
    x_b = image_base(x_ptr, b, stride_xb, LAYOUT, ALIGN)
    dx_b = image_base(dx_ptr, b, stride_db, DX_LAYOUT, DX_ALIGN)
    indices_b = indices_ptr + b64 * K
    norms_b = norms_ptr + b64 * N
    u_sums_b = u_sums_ptr + b64 * K * S * C
    w_sums_b = w_sums_ptr + b64 * K * S
    lengths_b = totals_ptr + b64 * S * 2 * K + K  # program (b, 0)'s ||v_k||
    c_start = s * c_per_program
    c_stop = tl.minimum(c_start + c_per_program, C)
    for k in range(0, K):
        seed = tl.load(indices_b + k)
        repeated = tl.zeros([], tl.int32)  # an earlier part with the same seed writes this column
        for j in range(0, k):
            repeated += tl.where(tl.load(indices_b + j) == seed, 1, 0)
        write = (repeated == 0) & (seed >= 0) & (seed < N)
        safe_seed = tl.where(write, seed, 0)
        for c0 in range(c_start, c_stop, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            total = tl.zeros([BLOCK_C], ACC)
            for j in range(k, K):
                same = write & (tl.load(indices_b + j) == seed)
                length = tl.load(lengths_b + j)
                total += _seed_correction(x_b, j, safe_seed, offs_c, bound_if(same, c_stop), u_sums_b, w_sums_b,
                                          norms_b, gvec_ptr + b64 * K * C, vec_ptr + b64 * K * C, gact_ptr + b64 * K,
                                          length, C, S, stride_xc, stride_xn, LAYOUT, ALIGN, REFINE,
                                          HAS_GRAD_VECTORS, HAS_GRAD_ACTIVITY, BLOCK_S, ACC)
            column = dx_b + column_offsets(offs_c, safe_seed, stride_dc, DX_LAYOUT, DX_ALIGN, stride_dn)
            mask = offs_c < bound_if(write, c_stop)
            previous = tl.load(column, mask=mask, other=0.0).to(ACC)
            tl.store(column, (previous + total).to(dx_ptr.dtype.element_ty), mask=mask)
