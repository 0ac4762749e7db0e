"""Fused BR-NPA forward: one program per image, the whole greedy selection in one launch.

Program b owns image b and sweeps its (C, N) slab in (BLOCK_C, BLOCK_N) tiles, N-blocks outer
and C-blocks inner, so every column reduction over C (norms, dot products with the seed) is
finished in registers at the end of a C-loop. Passes over X:

* pass 0: ||x_n|| (norms out, rho_n = ||x_n|| + eps and the score s_n = rho_n to the
  workspace) and the argmax of s, i.e. the seed i_0;
* pass j = 1..K: the dot products of every x_n with the seed r_{j-1} = x_{i_{j-1}}, so
  sim_{j-1,n}, S_{j-1}, the score update and the next argmax; when refining, each N-block's
  tiles are read a second time, from cache, for the unnormalised weighted sum
  sum_n sim_{j-1,n} x_n (and, in pass 1 only, sum_n x_n, the vector of a degenerate part);
  v_{j-1} is that sum times 1/S_{j-1}, written once the pass has S_{j-1}.

So K+1 reads of X from memory, with or without refinement. A C-vector accumulated over N-blocks
(the weighted sum) cannot live in registers across the inner C-loop, so it is accumulated in
a per-image fp32/fp64 workspace: read-modify-write once per N-block, with a barrier between
N-blocks so that a load in a replicated layout sees the owner thread's store; the first
N-block does not read it, so the workspace needs no zeroing. The unnormalised similarities
also live in the workspace; the maps are written, normalised, at the end. The workspace is
``workspace_size`` = 3N + 2C + K N accumulation-dtype elements per image (0.3% of X at
B=16, C=2048, N=3136, K=3). Data written by one thread and read by another crosses a
``tl.debug_barrier()``; the selection score is double-buffered (see below).
"""

import triton
import triton.language as tl

from brnpa_triton.ops.kernels.common import EPS_C, RATIO_C, acc_const, acc_sqrt, load_tile, store_saturating


@triton.jit
def _argmax_update(values, offs_n, nmask, best, best_i, N):
    """Running argmax over N-blocks in increasing n: lowest index on ties."""
    v = tl.where(nmask, values, float("-inf"))
    m = tl.max(v, axis=0)
    i = tl.min(tl.where(v == m, offs_n, N), axis=0)
    take = m > best
    return tl.where(take, m, best), tl.where(take, i, best_i)


@triton.jit
def brnpa_forward_kernel(
    x_ptr, seeds_ptr,  # x (B, C, N) any strides; seeds (B, K) int64 contiguous (GIVEN_SEEDS)
    vec_ptr, maps_ptr, idx_ptr, norms_ptr, inv_ptr,  # outputs, contiguous
    ws_ptr,  # workspace, (B, workspace_size(C, N, K)) ACC, uninitialised
    C, N, K,
    stride_xb, stride_xc, stride_xn,
    REFINE: tl.constexpr, GIVEN_SEEDS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    xb = x_ptr + b * stride_xb
    vec_b = vec_ptr + b * K * C
    maps_b = maps_ptr + b * K * N
    idx_b = idx_ptr + b * K
    norms_b = norms_ptr + b * N
    inv_b = inv_ptr + b * K
    seeds_b = seeds_ptr + b * K
    ws_b = ws_ptr + b * (3 * N + 2 * C + K * N)  # see workspace_size
    rho_ws = ws_b  # rho_n
    # s_n, double-buffered: pass j reads buffer (j-1)%2 and writes j%2, so no thread can load a
    # score that another thread of the same pass already updated (warps hold replicated copies).
    score_ws = ws_b + N
    v_ws = ws_b + 3 * N  # the current part's weighted sum sum_n sim_n x_n, (C,)
    mean_ws = ws_b + 3 * N + C  # sum_n x_n, (C,): the vector of a degenerate (uniform) part
    sim_ws = ws_b + 3 * N + 2 * C  # sim_kn, (K, N), unnormalised

    arange_c = tl.arange(0, BLOCK_C)
    arange_n = tl.arange(0, BLOCK_N)
    eps = acc_const(EPS_C, ACC)
    ratio = acc_const(RATIO_C, ACC)
    one = acc_const(1.0, ACC)
    uniform = one / N  # the map of a degenerate part

    # ---- pass 0: norms, rho, score, first seed -------------------------------------------
    best = tl.full([], float("-inf"), ACC)
    best_i = tl.zeros([], tl.int32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + arange_n
        nmask = offs_n < N
        ss = tl.zeros([BLOCK_N], ACC)
        for c0 in range(0, C, BLOCK_C):
            tile = load_tile(xb, c0 + arange_c, offs_n, stride_xc, stride_xn, C, N, ACC)
            ss += tl.sum(tile * tile, axis=0)
        nrm = acc_sqrt(ss, ACC)
        tl.store(norms_b + offs_n, nrm.to(norms_ptr.dtype.element_ty), mask=nmask)
        rho = nrm + eps
        tl.store(rho_ws + offs_n, rho, mask=nmask)
        if not GIVEN_SEEDS:
            tl.store(score_ws + offs_n, rho, mask=nmask)
            best, best_i = _argmax_update(rho, offs_n, nmask, best, best_i, N)
    if GIVEN_SEEDS:
        i_cur = tl.load(seeds_b).to(tl.int32)
    else:
        i_cur = best_i
    tl.store(idx_b, i_cur.to(tl.int64))
    tl.debug_barrier()

    # ---- passes 1..K: part j-1's dot products and, when refining, its weighted sums ------
    for j in range(1, K + 1):
        jt = j + tl.zeros([], tl.int32)  # a tensor also under the interpreter (masks need one)
        kd = jt - 1
        rho_i = tl.load(rho_ws + i_cur)
        x_seed = xb + i_cur.to(tl.int64) * stride_xn
        sim_d = sim_ws + kd * N
        score_read = score_ws + ((jt - 1) % 2) * N
        score_write = score_ws + (jt % 2) * N
        # Scalar conditions enter masks as bounds (block & scalar-bool is broken in the interpreter).
        c_mean = tl.where(jt == 1, C, 0)  # sum_n x_n (a degenerate part's vector): pass 1 only
        s_tot = tl.zeros([], ACC)
        s_abs = tl.zeros([], ACC)
        best = tl.full([], float("-inf"), ACC)
        best_i = tl.zeros([], tl.int32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + arange_n
            nmask = offs_n < N
            rho = tl.load(rho_ws + offs_n, mask=nmask, other=1.0)
            dot = tl.zeros([BLOCK_N], ACC)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + arange_c
                tile = load_tile(xb, offs_c, offs_n, stride_xc, stride_xn, C, N, ACC)
                r = tl.load(x_seed + offs_c.to(tl.int64) * stride_xc, mask=offs_c < C, other=0.0)
                dot += tl.sum(r.to(ACC)[:, None] * tile, axis=0)
            sim = tl.where(nmask, dot / (rho * rho_i), 0.0)
            tl.store(sim_d + offs_n, sim, mask=nmask)
            s_tot += tl.sum(sim, axis=0)
            s_abs += tl.sum(tl.abs(sim), axis=0)
            if not GIVEN_SEEDS:
                score = tl.load(score_read + offs_n, mask=nmask, other=0.0) * (1.0 - sim)
                tl.store(score_write + offs_n, score, mask=nmask)
                best, best_i = _argmax_update(score, offs_n, nmask, best, best_i, N)
            if REFINE:
                # sum_n sim_n x_n, unnormalised (S is known only after the pass), from this
                # N-block's tiles, which the C-loop above just brought into cache. The workspace
                # read-modify-write may load in a replicated layout: order it after the previous
                # N-block's stores (written by each element's owner thread).
                tl.debug_barrier()
                c_old = tl.where(n0 > 0, C, 0)
                c_old_mean = tl.where(n0 > 0, c_mean, 0)
                for c0 in range(0, C, BLOCK_C):
                    offs_c = c0 + arange_c
                    tile = load_tile(xb, offs_c, offs_n, stride_xc, stride_xn, C, N, ACC)
                    old = tl.load(v_ws + offs_c, mask=offs_c < c_old, other=0.0)
                    tl.store(v_ws + offs_c, old + tl.sum(tile * sim[None, :], axis=1), mask=offs_c < C)
                    old = tl.load(mean_ws + offs_c, mask=offs_c < c_old_mean, other=0.0)
                    tl.store(mean_ws + offs_c, old + tl.sum(tile, axis=1), mask=offs_c < c_mean)
        tl.debug_barrier()
        deg = tl.abs(s_tot) <= ratio * s_abs
        inv = tl.where(deg, 0.0, one / tl.where(deg, one, s_tot))
        tl.store(inv_b + kd, inv)
        if REFINE:
            vec_d = vec_b + kd * C
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + arange_c
                cmask = offs_c < C
                v = tl.load(v_ws + offs_c, mask=cmask, other=0.0) * inv
                mean = tl.load(mean_ws + offs_c, mask=cmask, other=0.0) * uniform
                store_saturating(vec_d + offs_c, tl.where(deg, mean, v), cmask)
            tl.debug_barrier()  # v_ws is rewritten by the next pass
        has_next = jt < K
        if GIVEN_SEEDS:
            i_next = tl.load(seeds_b + j, mask=has_next, other=0).to(tl.int32)
        else:
            i_next = best_i
        tl.store(idx_b + j, i_next.to(tl.int64), mask=has_next)
        i_cur = tl.where(has_next, i_next, i_cur)
    tl.debug_barrier()

    # ---- maps (normalised), and the seed vectors when not refining -----------------------
    for k in range(0, K):
        inv = tl.load(inv_b + k)
        sim_k = sim_ws + k * N
        maps_k = maps_b + k * N
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + arange_n
            nmask = offs_n < N
            sim = tl.load(sim_k + offs_n, mask=nmask, other=0.0)
            a = tl.where(inv == 0, uniform, sim * inv)
            store_saturating(maps_k + offs_n, a, nmask)
        if not REFINE:
            x_seed = xb + tl.load(idx_b + k) * stride_xn
            vec_k = vec_b + k * C
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + arange_c
                cmask = offs_c < C
                r = tl.load(x_seed + offs_c.to(tl.int64) * stride_xc, mask=cmask, other=0.0)
                tl.store(vec_k + offs_c, r.to(vec_ptr.dtype.element_ty), mask=cmask)


def workspace_size(C: int, N: int, K: int) -> int:
    """Accumulation-dtype elements of workspace per image: rho, two score buffers, v, sum x, sims."""
    return 3 * N + 2 * C + K * N
