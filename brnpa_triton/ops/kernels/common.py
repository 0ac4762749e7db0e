"""Helpers shared by the forward and backward kernels (Triton inlines every one of them).

Conventions of every kernel:

* grid (B, S): program (b, s) owns the chunk of image b's positions
  [s * tiles_per_chunk * BLOCK_N, (s + 1) * tiles_per_chunk * BLOCK_N), walked one tile of
  BLOCK_N positions at a time; each tile is swept over C in (BLOCK_C, BLOCK_N) tiles.
* Programs are one or four warps (the launcher's plan). Sums over the C loop are accumulated
  elementwise and reduced once after it, so no loop that streams X waits for a reduction
  across warps, and each C loop loads the next tile before it uses the current one (two
  tiles in flight). The barriers left order a tile's workspace stores before the next
  tile's loads, and sit where the compiler exchanges a vector between layouts.
* x is read through a layout constexpr: ``N_CONTIGUOUS`` (NCHW), ``C_CONTIGUOUS``
  (channels_last, tokens) or ``STRIDED`` (anything else). The strides of a contiguous layout
  arrive divided by ``ALIGN`` (a power of two chosen by the launcher), so the compiler knows
  that rows start ALIGN-element aligned (e.g. 784-byte rows at N = 196 in fp32) and loads
  them 128 bits wide.
* C and N arrive divided by ``C_ALIGN`` / ``N_ALIGN`` (``from_units``), for the same reason.
* Everything is computed in ``ACC`` (float32, or float64 for float64 input); loads are upcast
  right away. Integer arguments may be specialised by Triton, so nothing calls methods on them.
"""

import triton
import triton.language as tl

from brnpa_triton.ops.common import DEGENERATE_SUM_RATIO, EPS

EPS_C = tl.constexpr(EPS)
RATIO_C = tl.constexpr(DEGENERATE_SUM_RATIO)

# Integer arguments of each kernel: never specialised (no recompilation when one equals 1 or is
# a multiple of 16); the launchers give the alignment facts as constexprs instead.
_SIZES = ["C", "N", "K", "S"]
_X_STRIDES = ["stride_xb", "stride_xc", "stride_xn"]
_DX_STRIDES = ["stride_db", "stride_dc", "stride_dn"]
_SEED_STRIDES = ["seeds_stride_b", "seeds_stride_k"]
INTEGER_ARGS = {
    "forward_norms_kernel": _SIZES + ["tiles_per_chunk"] + _X_STRIDES,
    "forward_part_kernel": ["part"] + _SIZES + ["tiles_per_chunk"] + _X_STRIDES + _SEED_STRIDES,
    "forward_final_kernel": _SIZES + ["c_per_program"] + _X_STRIDES + _SEED_STRIDES,
    "backward_dx_kernel": _SIZES + ["tiles_per_chunk"] + _X_STRIDES + _DX_STRIDES,
    "backward_seeds_kernel": _SIZES + ["c_per_program"] + _X_STRIDES + _DX_STRIDES,
}

# Layouts of x (and dx): which of its strides is 1.
N_CONTIGUOUS = tl.constexpr(0)
C_CONTIGUOUS = tl.constexpr(1)
STRIDED = tl.constexpr(2)


@triton.jit
def acc_const(value: tl.constexpr, ACC: tl.constexpr):
    """A scalar constant built in ACC directly (a float64 constant keeps all its digits)."""
    return tl.full([], value, ACC)


@triton.jit
def acc_sqrt(v, ACC: tl.constexpr):
    """IEEE square root: sqrt.rn for fp32 (tl.sqrt is the approximate one), exact for fp64."""
    if ACC == tl.float64:
        return tl.sqrt(v)
    else:
        return tl.sqrt_rn(v)


@triton.jit
def from_units(units, ALIGN: tl.constexpr):
    """A size the launcher passed divided by ALIGN, a power of two that divides it. The
    compiler then knows the size is a multiple of ALIGN, so a mask ``offsets < size`` is uniform
    over each group of ALIGN elements and a masked row of X still loads 128 bits at a time."""
    return units * ALIGN


@triton.jit
def bound_if(condition, bound):
    """``bound`` where the scalar ``condition`` holds, else 0.

    The one way a scalar condition enters a mask here: ``offsets < bound_if(cond, n)``. (The
    interpreter mishandles ``block_mask & scalar_bool``; a scalar bound works everywhere.)
    """
    return tl.where(condition, bound, 0)


@triton.jit
def tile_offsets(offs_c, offs_n, stride_c, stride_n, LAYOUT: tl.constexpr, ALIGN: tl.constexpr):
    """int64 element offsets of the (BLOCK_C, BLOCK_N) tile [offs_c, offs_n] of one image."""
    c = offs_c.to(tl.int64)[:, None]
    n = offs_n.to(tl.int64)[None, :]
    if LAYOUT == N_CONTIGUOUS:
        return c * (stride_c * ALIGN) + n
    elif LAYOUT == C_CONTIGUOUS:
        return c + n * (stride_n * ALIGN)
    else:
        return c * stride_c + n * stride_n


@triton.jit
def column_offsets(offs_c, position, stride_c, LAYOUT: tl.constexpr, ALIGN: tl.constexpr, stride_n):
    """int64 element offsets of x[offs_c, position] (one feature column, e.g. a seed row)."""
    c = offs_c.to(tl.int64)
    p = position.to(tl.int64)
    if LAYOUT == N_CONTIGUOUS:
        return c * (stride_c * ALIGN) + p
    elif LAYOUT == C_CONTIGUOUS:
        return c + p * (stride_n * ALIGN)
    else:
        return c * stride_c + p * stride_n


@triton.jit
def image_base(ptr, b, stride_b, LAYOUT: tl.constexpr, ALIGN: tl.constexpr):
    """Pointer to image b (stride_b in units of ALIGN for the contiguous layouts)."""
    if LAYOUT == STRIDED:
        return ptr + b.to(tl.int64) * stride_b
    else:
        return ptr + b.to(tl.int64) * (stride_b * ALIGN)


@triton.jit
def load_tile(x_b, offs_c, offs_n, C, N, stride_c, stride_n, LAYOUT: tl.constexpr, ALIGN: tl.constexpr,
              ACC: tl.constexpr):
    """The (BLOCK_C, BLOCK_N) tile x[offs_c, offs_n], zero outside the image, upcast to ACC."""
    offsets = tile_offsets(offs_c, offs_n, stride_c, stride_n, LAYOUT, ALIGN)
    mask = (offs_c[:, None] < C) & (offs_n[None, :] < N)
    return tl.load(x_b + offsets, mask=mask, other=0.0).to(ACC)


@triton.jit
def load_column(x_b, offs_c, position, valid, C, stride_c, stride_n, LAYOUT: tl.constexpr,
                ALIGN: tl.constexpr, ACC: tl.constexpr):
    """x[offs_c, position] upcast to ACC; zeros unless the scalar ``valid`` holds (the position
    is only dereferenced when it lies in [0, N): callers pass ``valid``)."""
    safe = tl.where(valid, position, 0)
    offsets = column_offsets(offs_c, safe, stride_c, LAYOUT, ALIGN, stride_n)
    return tl.load(x_b + offsets, mask=offs_c < bound_if(valid, C), other=0.0).to(ACC)


@triton.jit
def cast_saturating(v, ptrs):
    """v in the pointers' dtype; float16/bfloat16 saturate at their largest finite value, and
    NaN stays NaN (comparisons with NaN are false, so ``where`` keeps it)."""
    if ptrs.dtype.element_ty == tl.float16:
        v = tl.where(v > 65504.0, 65504.0, tl.where(v < -65504.0, -65504.0, v))
    elif ptrs.dtype.element_ty == tl.bfloat16:
        big = 3.3895313892515355e38
        v = tl.where(v > big, big, tl.where(v < -big, -big, v))
    return v.to(ptrs.dtype.element_ty)


@triton.jit
def argmax_update(values, offs_n, valid, best, best_index, N):
    """Running (max, lowest index of the max) over tiles visited in increasing position order."""
    v = tl.where(valid, values, float("-inf"))
    tile_best = tl.max(v, axis=0)
    tile_index = tl.min(tl.where(v == tile_best, offs_n, N), axis=0)
    take = tile_best > best
    return tl.where(take, tile_best, best), tl.where(take, tile_index, best_index)


@triton.jit
def reduce_candidates(score_ptr, index_ptr, S, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    """The greedy seed: argmax over the S chunks' (max score, lowest index) candidates, visited
    in chunk order (so in position order): the lowest index wins exact ties. Always in [0, N)."""
    best = tl.full([], float("-inf"), ACC)
    best_index = tl.zeros([], tl.int32)
    for s0 in range(0, S, BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)
        valid = offs < S
        scores = tl.load(score_ptr + offs, mask=valid, other=float("-inf"))
        indices = tl.load(index_ptr + offs, mask=valid, other=0)
        block_best = tl.max(scores, axis=0)
        block_index = tl.min(tl.where(valid & (scores == block_best), indices, 2147483647), axis=0)
        take = block_best > best
        best = tl.where(take, block_best, best)
        best_index = tl.where(take, block_index, best_index)
    return best_index


@triton.jit
def seed_of_part(part, b, cand_score_ptr, cand_index_ptr, seeds_ptr, seeds_stride_b, seeds_stride_k,
                 N, K, S, GIVEN_SEEDS: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    """(position, valid, value for the indices output) of part ``part``'s seed for image b.

    Given seeds are used as they are for the output, but only dereferenced when in [0, N).
    """
    if GIVEN_SEEDS:
        given = tl.load(seeds_ptr + b.to(tl.int64) * seeds_stride_b + part * seeds_stride_k)
        valid = (given >= 0) & (given < N)
        return tl.where(valid, given, 0).to(tl.int32), valid, given
    else:
        offset = (b.to(tl.int64) * K + part) * S
        index = reduce_candidates(cand_score_ptr + offset, cand_index_ptr + offset, S, BLOCK_S, ACC)
        return index, index == index, index.to(tl.int64)


@triton.jit
def part_inverse(sums_ptr, abs_ptr, S, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    """(1 / S_k, degenerate) from the chunks' partial S_k and sum |sim_k|, summed in chunk order;
    1 / S_k is 0 for a degenerate part (|S_k| <= ratio * sum |sim_k|, or 1 / S_k overflows: a
    uniform map)."""
    total = tl.zeros([BLOCK_S], ACC)
    total_abs = tl.zeros([BLOCK_S], ACC)
    for s0 in range(0, S, BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)
        total += tl.load(sums_ptr + offs, mask=offs < S, other=0.0)
        total_abs += tl.load(abs_ptr + offs, mask=offs < S, other=0.0)
    s_sum = tl.sum(total, axis=0)
    s_abs = tl.sum(total_abs, axis=0)
    one = acc_const(1.0, ACC)
    inverse = one / tl.where(s_sum == 0, one, s_sum)
    # Degenerate: S_k cancels, or is too small to invert (similarities that underflowed).
    degenerate = (tl.abs(s_sum) <= acc_const(RATIO_C, ACC) * s_abs) | (tl.abs(inverse) == float("inf"))
    return tl.where(degenerate, 0.0, inverse), degenerate


@triton.jit
def power_of_two_scales(maxabs, ACC: tl.constexpr):
    """(2^-e, 2^e) with 2^e about the column's largest |x|: multiplying by them is exact."""
    if ACC == tl.float64:
        exponent = (maxabs.to(tl.int64, bitcast=True) >> 52) & 2047
        down = tl.minimum(tl.maximum(2046 - exponent, 1), 2045)
        return (down << 52).to(tl.float64, bitcast=True), ((2046 - down) << 52).to(tl.float64, bitcast=True)
    else:
        exponent = (maxabs.to(tl.int32, bitcast=True) >> 23) & 255
        down = tl.minimum(tl.maximum(254 - exponent, 1), 253)
        return (down << 23).to(tl.float32, bitcast=True), ((254 - down) << 23).to(tl.float32, bitcast=True)


@triton.jit
def sums_scale(N, ACC: tl.constexpr):
    """(2^-e, 2^e) with N <= 2^e < 2N. Sums over positions are accumulated scaled by 2^-e, so
    sum_n sim_n x_n and sum_n x_n (|sim_n| <= 1) stay finite wherever every x_n is; the exact
    power of two changes no rounding."""
    down, up = power_of_two_scales(acc_const(1.0, ACC) * N, ACC)
    return down * 0.5, up * 2.0


@triton.jit
def sims_scale(norm_max_ptr, seed_norm, S, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    """(2^e, 2^-e): the exact power of two that multiplies a part's similarities in its weighted
    sums, from the chunks' largest norms and the seed's norm. Every |sim_kn| is below
    (max_n ||x_n|| / rho_n) (||r_k|| / rho_ik), and 2^e is the largest power of two that keeps
    that bound times 2^e below 1: the scaled products stay below |x_cn|, so they cannot
    overflow, and those of tiny features (sim_kn ~ ||x||^2 / eps^2) do not underflow. Norms
    of a few eps or more (bound >= 1/2) get 2^e = 1."""
    largest = tl.zeros([BLOCK_S], ACC)
    for s0 in range(0, S, BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)
        largest = tl.maximum(largest, tl.load(norm_max_ptr + offs, mask=offs < S, other=0.0))
    norm_max = tl.max(largest, axis=0)
    eps = acc_const(EPS_C, ACC)
    bound = (norm_max / (norm_max + eps)) * (seed_norm / (seed_norm + eps))
    # A bound that rounds to 1, or NaN from norms that overflowed: no scaling.
    bound = tl.where(bound < 1.0, bound, 0.75)
    down, up = power_of_two_scales(bound, ACC)
    return down * 0.5, up * 2.0
