"""Fused BR-NPA forward: K + 2 launches over grid (B, S), X read K + 1 times.

Outline (program (b, s) owns a chunk of image b's positions; see ``common``):

1. ``forward_norms_kernel``: ||x_n|| for the chunk (fast sum of squares, rescaled where it
   overflows or underflows), both norms outputs, the score s_n = rho_n, the chunk's seed
   candidate (max score, lowest index) and, when refining, the chunk's sum_n x_n (the vector
   of a degenerate part) and its largest norm.
2. ``forward_part_kernel``, once per part k: every program reduces the chunks' candidates in
   chunk order (so all agree on the seed i_k), then one sweep over its chunk computes
   sim_kn = dot(x_n, r_k / rho_ik) / rho_n (no overflow: |r_k / rho_ik| < 1), the chunk's
   partial S_k and sum |sim_kn|, the score update and the next candidate, and, folded into
   the same loads, the chunk's part of part k-1's weighted sum sum_n sim_{k-1,n} x_n, each
   part's similarities multiplied there by an exact power of two (``common.sims_scale``, from
   the largest norm and the seed's) so that tiny features do not underflow. The last part's
   weighted sum takes a second look at each tile right after its sims (cache).
3. ``forward_final_kernel``: each program sums the chunks' partial weighted sums over a slice
   of the channels (chunk order) and normalises them; the last program of image b to finish
   (an integer ticket, no waiting) computes the activities ||v_k||, ranks the parts (stable,
   descending) and writes every per-part output in rank order with saturating casts.

Every cross-program value goes through the workspace and is reduced in a fixed order, so
results are bitwise reproducible; nothing synchronises with the host.
"""

import triton
import triton.language as tl

from brnpa_triton.ops.kernels.common import (
    EPS_C,
    INTEGER_ARGS,
    acc_const,
    acc_sqrt,
    argmax_update,
    bound_if,
    cast_saturating,
    from_units,
    image_base,
    load_column,
    load_tile,
    part_inverse,
    power_of_two_scales,
    seed_of_part,
    sims_scale,
    sums_scale,
)

# Sums of squares below this (2^-100 in fp32, 2^-1000 in fp64) may have lost digits to
# underflow: such a column's norm is recomputed with a power-of-two rescaling.
SMALL_SUMSQ_F32 = tl.constexpr(7.888609052210118e-31)
SMALL_SUMSQ_F64 = tl.constexpr(9.332636185032189e-302)


# ---- 1. norms ---------------------------------------------------------------------------

@triton.jit
def _tile_sums_of_squares(x_b, offs_n, C, N, stride_c, stride_n, sums_ptr, accumulate, LAYOUT: tl.constexpr,
                          ALIGN: tl.constexpr, REFINE: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """(sum_c x_cn^2, max_c |x_cn|) of one tile of positions; when refining, also adds the
    tile's sum over positions to the chunk's sum_n x_n, scaled by ``sums_scale`` (stored, not
    added, unless ``accumulate``)."""
    sum_scale, sum_unscale = sums_scale(N, ACC)
    squares = tl.zeros([BLOCK_C, BLOCK_N], ACC)
    largest = tl.zeros([BLOCK_C, BLOCK_N], ACC)
    # The next tile's loads are issued before this one is used: two tiles in flight.
    tile = load_tile(x_b, tl.arange(0, BLOCK_C), offs_n, C, N, stride_c, stride_n, LAYOUT, ALIGN, ACC)
    for c0 in range(0, C, BLOCK_C):  # streams X
        offs_c = c0 + tl.arange(0, BLOCK_C)
        upcoming = load_tile(x_b, offs_c + BLOCK_C, offs_n, C, N, stride_c, stride_n, LAYOUT, ALIGN, ACC)
        squares += tile * tile
        largest = tl.maximum(largest, tl.abs(tile))
        if REFINE:
            previous = tl.load(sums_ptr + offs_c, mask=offs_c < bound_if(accumulate, C), other=0.0)
            tl.store(sums_ptr + offs_c, previous + tl.sum(tile * sum_scale, axis=1), mask=offs_c < C)
        tile = upcoming
    return tl.sum(squares, axis=0), tl.max(largest, axis=0)


@triton.jit
def _tile_rescaled_sums_of_squares(x_b, offs_n, down, C, N, stride_c, stride_n, LAYOUT: tl.constexpr,
                                   ALIGN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                                   ACC: tl.constexpr):
    """sum_c (x_cn * down_n)^2: the rare second sweep for columns whose plain sum over/underflowed."""
    squares = tl.zeros([BLOCK_C, BLOCK_N], ACC)
    for c0 in range(0, C, BLOCK_C):  # streams X
        offs_c = c0 + tl.arange(0, BLOCK_C)
        tile = load_tile(x_b, offs_c, offs_n, C, N, stride_c, stride_n, LAYOUT, ALIGN, ACC) * down[None, :]
        squares += tile * tile
    return tl.sum(squares, axis=0)


@triton.jit
def _tile_norms(x_b, offs_n, valid_n, C, N, stride_c, stride_n, sums_ptr, accumulate, LAYOUT: tl.constexpr,
                ALIGN: tl.constexpr, REFINE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                ACC: tl.constexpr):
    """||x_n|| for one tile of positions, exact to rounding for every finite input whose norm is
    representable: columns whose sum of squares overflowed (inf) or may have underflowed are
    recomputed scaled by a power of two. The choice is made per column from its own values,
    so identical columns always get identical norms."""
    sumsq, maxabs = _tile_sums_of_squares(x_b, offs_n, C, N, stride_c, stride_n, sums_ptr, accumulate, LAYOUT,
                                          ALIGN, REFINE, BLOCK_C, BLOCK_N, ACC)
    if ACC == tl.float64:
        small = acc_const(SMALL_SUMSQ_F64, ACC)
    else:
        small = acc_const(SMALL_SUMSQ_F32, ACC)
    rescale = valid_n & ((sumsq == float("inf")) | ((sumsq < small) & (maxabs > 0)))
    norms = acc_sqrt(sumsq, ACC)
    if tl.max(rescale.to(tl.int32), axis=0) > 0:  # uniform per program, rare
        down, up = power_of_two_scales(maxabs, ACC)
        scaled = _tile_rescaled_sums_of_squares(x_b, offs_n, down, C, N, stride_c, stride_n, LAYOUT, ALIGN,
                                                BLOCK_C, BLOCK_N, ACC)
        norms = tl.where(rescale, acc_sqrt(scaled, ACC) * up, norms)
    return norms


@triton.jit(do_not_specialize=INTEGER_ARGS["forward_norms_kernel"])
def forward_norms_kernel(
    x_ptr,  # (B, C, N), strides in units of ALIGN for contiguous layouts
    norms_ptr, saved_norms_ptr,  # outputs (B, N): x.dtype (saturating) and ACC
    scores_ptr,  # workspace (B, 2, N): score buffer 0 <- rho
    cand_score_ptr, cand_index_ptr,  # workspace (B, K, S): slot 0 <- the chunk's candidate
    sums_ptr,  # workspace (B, K + 1, S, C): slot K <- the chunk's sum_n x_n (REFINE)
    norm_max_ptr,  # workspace (B, S): the chunk's largest norm (REFINE)
    ticket_ptr,  # workspace (B,): reset to 0 for the final launch
    C, N, K, S, tiles_per_chunk,
    stride_xb, stride_xc, stride_xn,
    LAYOUT: tl.constexpr, ALIGN: tl.constexpr, REFINE: tl.constexpr, GIVEN_SEEDS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, C_ALIGN: tl.constexpr, N_ALIGN: tl.constexpr, ACC: tl.constexpr,
):
    b = tl.program_id(0)
    s = tl.program_id(1)
    C = from_units(C, C_ALIGN)
    N = from_units(N, N_ALIGN)
    x_b = image_base(x_ptr, b, stride_xb, LAYOUT, ALIGN)
    row = b.to(tl.int64) * N
    chunk_sums = sums_ptr + ((b.to(tl.int64) * (K + 1) + K) * S + s) * C
    eps = acc_const(EPS_C, ACC)
    best = tl.full([], float("-inf"), ACC)
    best_index = tl.zeros([], tl.int32)
    norm_max = tl.zeros([], ACC)
    chunk_start = s * tiles_per_chunk * BLOCK_N
    for t in range(0, tiles_per_chunk):  # one tile of positions at a time (its C loops stream X)
        offs_n = chunk_start + t * BLOCK_N + tl.arange(0, BLOCK_N)
        valid_n = offs_n < N
        norms = _tile_norms(x_b, offs_n, valid_n, C, N, stride_xc, stride_xn, chunk_sums, t > 0, LAYOUT, ALIGN,
                            REFINE, BLOCK_C, BLOCK_N, ACC)
        tl.store(saved_norms_ptr + row + offs_n, norms, mask=valid_n)
        tl.store(norms_ptr + row + offs_n, cast_saturating(norms, norms_ptr + row + offs_n), mask=valid_n)
        if not GIVEN_SEEDS:
            rho = norms + eps
            tl.store(scores_ptr + b.to(tl.int64) * 2 * N + offs_n, rho, mask=valid_n)
            best, best_index = argmax_update(rho, offs_n, valid_n, best, best_index, N)
        if REFINE:
            norm_max = tl.maximum(norm_max, tl.max(tl.where(valid_n, norms, 0.0), axis=0))
        tl.debug_barrier()  # this tile's partial sums are stored before the next tile reloads them
    if REFINE:
        tl.store(norm_max_ptr + b.to(tl.int64) * S + s, norm_max)
    if not GIVEN_SEEDS:
        slot = b.to(tl.int64) * K * S + s
        tl.store(cand_score_ptr + slot, best)
        tl.store(cand_index_ptr + slot, best_index)
    first = tl.arange(0, 1)
    tl.store(ticket_ptr + b + first, tl.zeros([1], tl.int32), mask=first < bound_if(s == 0, 1))


# ---- 2. one launch per part -----------------------------------------------------------------

@triton.jit
def _tile_seed_dots(x_b, offs_n, seed, seed_valid, inv_rho_seed, previous_sims, fold_sums_ptr, fold, accumulate,
                    C, N, stride_c, stride_n, LAYOUT: tl.constexpr, ALIGN: tl.constexpr, REFINE: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """dot(x_n, r / rho_seed) for one tile of positions; when ``fold``, the same loads also add
    sum_n previous_sims_n x_n (the previous part's weighted sum) to the chunk's partial."""
    dots = tl.zeros([BLOCK_C, BLOCK_N], ACC)
    # The next tile's loads are issued before this one is used: two tiles in flight.
    tile = load_tile(x_b, tl.arange(0, BLOCK_C), offs_n, C, N, stride_c, stride_n, LAYOUT, ALIGN, ACC)
    for c0 in range(0, C, BLOCK_C):  # streams X
        offs_c = c0 + tl.arange(0, BLOCK_C)
        upcoming = load_tile(x_b, offs_c + BLOCK_C, offs_n, C, N, stride_c, stride_n, LAYOUT, ALIGN, ACC)
        seed_row = load_column(x_b, offs_c, seed, seed_valid, C, stride_c, stride_n, LAYOUT, ALIGN, ACC)
        dots += tile * (seed_row * inv_rho_seed)[:, None]
        if REFINE:
            folded = tl.sum(tile * previous_sims[None, :], axis=1)
            previous = tl.load(fold_sums_ptr + offs_c, mask=offs_c < bound_if(fold & accumulate, C), other=0.0)
            tl.store(fold_sums_ptr + offs_c, previous + folded, mask=offs_c < bound_if(fold, C))
        tile = upcoming
    return tl.sum(dots, axis=0)


@triton.jit
def _tile_weighted_sum(x_b, offs_n, sims, sums_ptr, accumulate, C, N, stride_c, stride_n, LAYOUT: tl.constexpr,
                       ALIGN: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Adds sum_n sims_n x_n over one tile to the chunk's partial: the last part's second look at
    a tile it has just read (from cache)."""
    # The next tile's loads are issued before this one is used: two tiles in flight.
    tile = load_tile(x_b, tl.arange(0, BLOCK_C), offs_n, C, N, stride_c, stride_n, LAYOUT, ALIGN, ACC)
    for c0 in range(0, C, BLOCK_C):  # streams X
        offs_c = c0 + tl.arange(0, BLOCK_C)
        upcoming = load_tile(x_b, offs_c + BLOCK_C, offs_n, C, N, stride_c, stride_n, LAYOUT, ALIGN, ACC)
        previous = tl.load(sums_ptr + offs_c, mask=offs_c < bound_if(accumulate, C), other=0.0)
        tl.store(sums_ptr + offs_c, previous + tl.sum(tile * sims[None, :], axis=1), mask=offs_c < C)
        tile = upcoming


@triton.jit(do_not_specialize=INTEGER_ARGS["forward_part_kernel"])
def forward_part_kernel(
    x_ptr, seeds_ptr,  # x (B, C, N); given seeds (B, K) int64 (GIVEN_SEEDS)
    saved_norms_ptr,  # (B, N) ACC, from the norms launch
    scores_ptr,  # workspace (B, 2, N): reads buffer part % 2, writes the other
    sims_ptr,  # workspace (B, K, N): sim_kn <- this part's row
    part_sums_ptr, part_abs_ptr,  # workspace (B, K, S): the chunk's sum_n sim_kn and sum_n |sim_kn|
    cand_score_ptr, cand_index_ptr,  # workspace (B, K, S): reads slot part, writes slot part + 1
    sums_ptr,  # workspace (B, K + 1, S, C): the chunks' weighted sums of parts part - 1 and, last, part
    norm_max_ptr,  # workspace (B, S): the chunks' largest norms, from the norms launch (REFINE)
    sims_scale_ptr,  # workspace (B, K, 2): this part's sims_scale (2^e, 2^-e) <- (REFINE); part - 1's is read
    part, C, N, K, S, tiles_per_chunk,
    stride_xb, stride_xc, stride_xn, seeds_stride_b, seeds_stride_k,
    LAYOUT: tl.constexpr, ALIGN: tl.constexpr, REFINE: tl.constexpr, GIVEN_SEEDS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    C_ALIGN: tl.constexpr, N_ALIGN: tl.constexpr, ACC: tl.constexpr,
):
    b = tl.program_id(0)
    s = tl.program_id(1)
    C = from_units(C, C_ALIGN)
    N = from_units(N, N_ALIGN)
    x_b = image_base(x_ptr, b, stride_xb, LAYOUT, ALIGN)
    row = b.to(tl.int64) * N
    eps = acc_const(EPS_C, ACC)
    one = acc_const(1.0, ACC)
    sum_scale, sum_unscale = sums_scale(N, ACC)  # partial weighted sums are kept scaled: no overflow
    seed, seed_valid, _ = seed_of_part(part, b, cand_score_ptr, cand_index_ptr, seeds_ptr, seeds_stride_b,
                                       seeds_stride_k, N, K, S, GIVEN_SEEDS, BLOCK_S, ACC)
    seed_norm = tl.load(saved_norms_ptr + row + seed, mask=seed_valid, other=0.0)
    rho_seed = seed_norm + eps
    inv_rho_seed = one / rho_seed
    scores_in = scores_ptr + (b.to(tl.int64) * 2 + part % 2) * N
    scores_out = scores_ptr + (b.to(tl.int64) * 2 + (part + 1) % 2) * N
    fold = REFINE & (part > 0)  # part - 1's weighted sum rides on this part's loads
    fold_sums = sums_ptr + ((b.to(tl.int64) * (K + 1) + part - 1) * S + s) * C
    last_sums = sums_ptr + ((b.to(tl.int64) * (K + 1) + part) * S + s) * C
    update_scores = (not GIVEN_SEEDS) & (part + 1 < K)
    # The weighted sums multiply each part's similarities by its exact power of two
    # (``sims_scale``), so that those of tiny features do not underflow in sim_kn x_n.
    scales = sims_scale_ptr + b.to(tl.int64) * K * 2
    part_scale = one
    fold_scale = one
    if REFINE:
        part_scale, part_unscale = sims_scale(norm_max_ptr + b.to(tl.int64) * S, seed_norm, S, BLOCK_S, ACC)
        pair = tl.arange(0, 2)
        tl.store(scales + part * 2 + pair, tl.where(pair == 0, part_scale, part_unscale),
                 mask=pair < bound_if(s == 0, 2))
        fold_scale = tl.where(fold, tl.load(scales + tl.where(fold, part - 1, 0) * 2), one)

    total = tl.zeros([], ACC)
    total_abs = tl.zeros([], ACC)
    best = tl.full([], float("-inf"), ACC)
    best_index = tl.zeros([], tl.int32)
    chunk_start = s * tiles_per_chunk * BLOCK_N
    for t in range(0, tiles_per_chunk):  # one tile of positions at a time (its C loops stream X)
        offs_n = chunk_start + t * BLOCK_N + tl.arange(0, BLOCK_N)
        valid_n = offs_n < N
        rho = tl.load(saved_norms_ptr + row + offs_n, mask=valid_n, other=0.0) + eps
        previous_sims = tl.load(sims_ptr + (row * K + (part - 1) * N) + offs_n,
                                mask=offs_n < bound_if(fold, N), other=0.0) * (sum_scale * fold_scale)
        dots = _tile_seed_dots(x_b, offs_n, seed, seed_valid, inv_rho_seed, previous_sims, fold_sums, fold, t > 0,
                               C, N, stride_xc, stride_xn, LAYOUT, ALIGN, REFINE, BLOCK_C, BLOCK_N, ACC)
        sims = tl.where(valid_n, dots / rho, 0.0)
        tl.store(sims_ptr + (row * K + part * N) + offs_n, sims, mask=valid_n)
        total += tl.sum(sims, axis=0)
        total_abs += tl.sum(tl.abs(sims), axis=0)
        score_mask = offs_n < bound_if(update_scores, N)
        scores = tl.load(scores_in + offs_n, mask=score_mask, other=0.0) * (1.0 - sims)
        tl.store(scores_out + offs_n, scores, mask=score_mask)
        best, best_index = argmax_update(scores, offs_n, score_mask, best, best_index, N)
        if REFINE:
            if part == K - 1:
                _tile_weighted_sum(x_b, offs_n, sims * (sum_scale * part_scale), last_sums, t > 0, C, N, stride_xc,
                                   stride_xn, LAYOUT, ALIGN, BLOCK_C, ACC)
        tl.debug_barrier()  # this tile's partial sums are stored before the next tile reloads them
    slot = (b.to(tl.int64) * K + part) * S + s
    tl.store(part_sums_ptr + slot, total)
    tl.store(part_abs_ptr + slot, total_abs)
    if not GIVEN_SEEDS:
        one_slot = tl.arange(0, 1)
        next_mask = one_slot < bound_if(part + 1 < K, 1)
        tl.store(cand_score_ptr + slot + S + one_slot, best + tl.zeros([1], ACC), mask=next_mask)
        tl.store(cand_index_ptr + slot + S + one_slot, best_index + tl.zeros([1], tl.int32), mask=next_mask)


# ---- 3. vectors, activity, ranking, outputs ---------------------------------------------------

@triton.jit
def _vectors_slice(x_b, b, s, seeds_ptr, seeds_stride_b, seeds_stride_k, cand_score_ptr, cand_index_ptr,
                   part_sums_ptr, part_abs_ptr, sums_ptr, sims_scale_ptr, vectors_ws_ptr,
                   C, N, K, S, c_per_program, stride_c, stride_n,
                   LAYOUT: tl.constexpr, ALIGN: tl.constexpr, REFINE: tl.constexpr, GIVEN_SEEDS: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    """v_k over this program's slice of channels, for every part (unranked, ACC, to the workspace)."""
    c_start = s * c_per_program
    c_stop = tl.minimum(c_start + c_per_program, C)
    uniform = acc_const(1.0, ACC) / N
    sum_scale, sum_unscale = sums_scale(N, ACC)
    for k in range(0, K):
        part_slot = (b.to(tl.int64) * K + k) * S
        inv, degenerate = part_inverse(part_sums_ptr + part_slot, part_abs_ptr + part_slot, S, BLOCK_S, ACC)
        seed, seed_valid, _ = seed_of_part(k, b, cand_score_ptr, cand_index_ptr, seeds_ptr, seeds_stride_b,
                                           seeds_stride_k, N, K, S, GIVEN_SEEDS, BLOCK_S, ACC)
        part_sums = sums_ptr + (b.to(tl.int64) * (K + 1) + k) * S * C
        plain_sums = sums_ptr + (b.to(tl.int64) * (K + 1) + K) * S * C
        for c0 in range(c_start, c_stop, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            valid_c = offs_c < c_stop
            if REFINE:
                weighted = tl.zeros([BLOCK_C], ACC)
                plain = tl.zeros([BLOCK_C], ACC)
                for chunk in range(0, S):  # chunk order: deterministic
                    weighted += tl.load(part_sums + chunk * C + offs_c, mask=valid_c, other=0.0)
                    plain += tl.load(plain_sums + chunk * C + offs_c, mask=offs_c < bound_if(degenerate, c_stop),
                                     other=0.0)
                # 2^-e / S_k: exact, and above 1 / N (S_k 2^e < N), so neither factor can overflow.
                unscaled_inv = inv * tl.load(sims_scale_ptr + (b.to(tl.int64) * K + k) * 2 + 1)
                v = tl.where(degenerate, plain * (sum_unscale * uniform), (weighted * unscaled_inv) * sum_unscale)
            else:
                v = load_column(x_b, offs_c, seed, seed_valid, c_stop, stride_c, stride_n, LAYOUT, ALIGN, ACC)
            tl.store(vectors_ws_ptr + (b.to(tl.int64) * K + k) * C + offs_c, v, mask=valid_c)


@triton.jit
def _length(vector_ptr, C, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """||v|| of a C-vector written by other programs of this launch (.cg: not from L1), scaled by
    a power of two so that its sum of squares cannot overflow or underflow."""
    largest = tl.zeros([BLOCK_C], ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        v = tl.load(vector_ptr + offs_c, mask=offs_c < C, other=0.0, cache_modifier=".cg")
        largest = tl.maximum(largest, tl.abs(v))
    down, up = power_of_two_scales(tl.max(largest, axis=0), ACC)
    squares = tl.zeros([BLOCK_C], ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        v = tl.load(vector_ptr + offs_c, mask=offs_c < C, other=0.0, cache_modifier=".cg") * down
        squares += v * v
    return acc_sqrt(tl.sum(squares, axis=0), ACC) * up


@triton.jit
def _rank(k, b, activity_ws, K, BY_ACTIVITY: tl.constexpr, BLOCK_K: tl.constexpr):
    """Output slot of part k: its position in a stable descending sort by activity (NaN first,
    as torch.sort puts it); k itself without ranking."""
    if BY_ACTIVITY:
        mine = tl.load(activity_ws + b.to(tl.int64) * K + k, cache_modifier=".cg")
        mine = tl.where(mine != mine, float("inf"), mine)
        ahead = tl.zeros([BLOCK_K], tl.int32)
        for j0 in range(0, K, BLOCK_K):
            offs = j0 + tl.arange(0, BLOCK_K)
            other = tl.load(activity_ws + b.to(tl.int64) * K + offs, mask=offs < K, other=0.0, cache_modifier=".cg")
            other = tl.where(other != other, float("inf"), other)
            before = (other > mine) | ((other == mine) & (offs < k))
            ahead += tl.where((offs < K) & before, 1, 0)
        return tl.sum(ahead, axis=0)
    else:
        return k


@triton.jit
def _write_ranked_outputs(x_b, b, seeds_ptr, seeds_stride_b, seeds_stride_k, cand_score_ptr, cand_index_ptr,
                          part_sums_ptr, part_abs_ptr, sims_ptr, vectors_ws_ptr, activity_ws,
                          vectors_ptr, maps_ptr, indices_ptr, activity_ptr, inv_sums_ptr, C, N, K, S,
                          BY_ACTIVITY: tl.constexpr, GIVEN_SEEDS: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """Image b's per-part outputs, in rank order (run by the image's last program only)."""
    for k in range(0, K):
        activity = _length(vectors_ws_ptr + (b.to(tl.int64) * K + k) * C, C, BLOCK_C, ACC)
        tl.store(activity_ws + b.to(tl.int64) * K + k, activity)
    tl.debug_barrier()  # activities written above are read back by other threads
    uniform = acc_const(1.0, ACC) / N
    for k in range(0, K):
        slot = _rank(k, b, activity_ws, K, BY_ACTIVITY, BLOCK_K)
        part_slot = (b.to(tl.int64) * K + k) * S
        inv, degenerate = part_inverse(part_sums_ptr + part_slot, part_abs_ptr + part_slot, S, BLOCK_S, ACC)
        _, _, index = seed_of_part(k, b, cand_score_ptr, cand_index_ptr, seeds_ptr, seeds_stride_b, seeds_stride_k,
                                   N, K, S, GIVEN_SEEDS, BLOCK_S, ACC)
        out = b.to(tl.int64) * K + slot
        activity = tl.load(activity_ws + b.to(tl.int64) * K + k, cache_modifier=".cg")
        tl.store(indices_ptr + out, index)
        tl.store(inv_sums_ptr + out, inv)
        tl.store(activity_ptr + out, cast_saturating(activity, activity_ptr + out))
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            v = tl.load(vectors_ws_ptr + (b.to(tl.int64) * K + k) * C + offs_c, mask=offs_c < C, other=0.0,
                        cache_modifier=".cg")
            tl.store(vectors_ptr + out * C + offs_c, cast_saturating(v, vectors_ptr + out * C + offs_c),
                     mask=offs_c < C)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            sims = tl.load(sims_ptr + (b.to(tl.int64) * K + k) * N + offs_n, mask=offs_n < N, other=0.0)
            a = tl.where(degenerate, uniform, sims * inv)
            tl.store(maps_ptr + out * N + offs_n, cast_saturating(a, maps_ptr + out * N + offs_n), mask=offs_n < N)


@triton.jit(do_not_specialize=INTEGER_ARGS["forward_final_kernel"])
def forward_final_kernel(
    x_ptr, seeds_ptr,
    cand_score_ptr, cand_index_ptr, part_sums_ptr, part_abs_ptr, sims_ptr, sums_ptr,  # from the part launches
    sims_scale_ptr,  # workspace (B, K, 2), from the part launches (REFINE)
    vectors_ws_ptr,  # workspace (B, K, C) ACC: unranked vectors
    activity_ws,  # workspace (B, K) ACC
    ticket_ptr,  # workspace (B,) int32, zeroed by the norms launch
    vectors_ptr, maps_ptr, indices_ptr, activity_ptr, inv_sums_ptr,  # outputs, contiguous
    C, N, K, S, c_per_program,
    stride_xb, stride_xc, stride_xn, seeds_stride_b, seeds_stride_k,
    LAYOUT: tl.constexpr, ALIGN: tl.constexpr, REFINE: tl.constexpr, GIVEN_SEEDS: tl.constexpr,
    BY_ACTIVITY: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr, C_ALIGN: tl.constexpr, N_ALIGN: tl.constexpr, ACC: tl.constexpr,
):
    b = tl.program_id(0)
    s = tl.program_id(1)
    C = from_units(C, C_ALIGN)
    N = from_units(N, N_ALIGN)
    x_b = image_base(x_ptr, b, stride_xb, LAYOUT, ALIGN)
    _vectors_slice(x_b, b, s, seeds_ptr, seeds_stride_b, seeds_stride_k, cand_score_ptr, cand_index_ptr,
                   part_sums_ptr, part_abs_ptr, sums_ptr, sims_scale_ptr, vectors_ws_ptr, C, N, K, S, c_per_program,
                   stride_xc, stride_xn, LAYOUT, ALIGN, REFINE, GIVEN_SEEDS, BLOCK_C, BLOCK_S, ACC)
    # Every thread's stores are done before the ticket is taken (release); the image's last
    # program sees them all (acquire, and .cg loads that skip the non-coherent L1).
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr + b, 1, sem="acq_rel")
    if ticket == S - 1:
        _write_ranked_outputs(x_b, b, seeds_ptr, seeds_stride_b, seeds_stride_k, cand_score_ptr, cand_index_ptr,
                              part_sums_ptr, part_abs_ptr, sims_ptr, vectors_ws_ptr, activity_ws,
                              vectors_ptr, maps_ptr, indices_ptr, activity_ptr, inv_sums_ptr, C, N, K, S,
                              BY_ACTIVITY, GIVEN_SEEDS, BLOCK_C, BLOCK_N, BLOCK_S, BLOCK_K, ACC)
