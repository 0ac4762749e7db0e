"""Fused BR-NPA backward (the spec's closed form): one program per image, one read of X.

With sim, S, a, v, r, rho as in the forward, gV = dL/dv and gA = dL/da:

    T_k       = sum_n gA_kn a_kn + gV_k . v_k                 (saved outputs only)
    simbar_kn = (gA_kn + gV_k . x_n - T_k) / S_k              (0 for degenerate parts)
    U_kn      = simbar_kn / rho_n
    dx_n      = radial_n x_n + sum_k [a_kn gV_k + U_kn r_k / rho_ik]
    radial_n  = (gN_n - sum_k U_kn sim_kn) / ||x_n||           (0 where x_n = 0)
    dx_ik    += u_k / rho_ik - w_k r_k / (rho_ik ||r_k||),   u_k = sum_n U_kn x_n,
                w_k = sum_n simbar_kn sim_kn
(without refinement the gV terms leave abar, T and dx_n, and dx_ik += gV_k instead).

Program b: (1) T_k from the saved outputs; (2) for each N-block: phase A sweeps the C-blocks
computing the dot products of the tile with r_k and gV_k for KC parts at a time
((KC, BLOCK_C, BLOCK_N) broadcasts reduced over C), giving sim, simbar, U (to the workspace),
radial and w_k; phase B sweeps the C-blocks again (the tile is re-read from cache), writes the
dx tile and accumulates u_k; (3) after all N-blocks, each distinct seed column is rewritten as
its phase-B value (recomputed from the workspace in full precision) plus the corrections of
every part seeded there, so repeated seeds accumulate and nothing is rounded twice.
u_k and w_k are accumulated over N-blocks in the workspace (read-modify-write once per
N-block; the barrier between phases A and B orders each N-block's stores before the next
one's loads; the first N-block does not read, so the workspace needs no zeroing). With more than
KC parts, phase A re-reads the tile once per group of KC parts.
"""

import triton
import triton.language as tl

from brnpa_triton.ops.kernels.common import EPS_C, acc_const, load_tile


@triton.jit
def brnpa_backward_kernel(
    x_ptr,  # (B, C, N) any strides
    gv_ptr, ga_ptr, gn_ptr,  # gradients (B, K, C), (B, K, N), (B, N), contiguous
    vec_ptr, maps_ptr, idx_ptr, norms_ptr, inv_ptr,  # saved forward outputs, contiguous
    dx_ptr,  # (B, C, N) any strides
    ws_ptr,  # workspace, (B, 2K + K N + N + K C) ACC, uninitialised
    C, N, K,
    stride_xb, stride_xc, stride_xn,
    stride_db, stride_dc, stride_dn,
    REFINE: tl.constexpr, KC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    xb = x_ptr + b * stride_xb
    dxb = dx_ptr + b * stride_db
    gv_b = gv_ptr + b * K * C
    ga_b = ga_ptr + b * K * N
    gn_b = gn_ptr + b * N
    vec_b = vec_ptr + b * K * C
    maps_b = maps_ptr + b * K * N
    idx_b = idx_ptr + b * K
    norms_b = norms_ptr + b * N
    inv_b = inv_ptr + b * K
    ws_b = ws_ptr + b * (2 * K + K * N + N + K * C)
    t_ws = ws_b  # T_k, (K,)
    w_ws = ws_b + K  # w_k, (K,)
    u_coef_ws = ws_b + 2 * K  # U_kn, (K, N)
    rad_ws = ws_b + 2 * K + K * N  # radial_n, (N,)
    u_ws = ws_b + 2 * K + K * N + N  # u_k, (K, C)

    ar_k = tl.arange(0, KC)
    ar_c = tl.arange(0, BLOCK_C)
    ar_n = tl.arange(0, BLOCK_N)
    eps = acc_const(EPS_C, ACC)
    one = acc_const(1.0, ACC)

    # ---- (1) T_k = sum_n gA_kn a_kn (+ gV_k . v_k) -----------------------------------------
    for k0 in range(0, K, KC):
        offs_k = k0 + ar_k
        kmask = offs_k < K
        acc_t = tl.zeros([KC, BLOCK_N], ACC)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + ar_n
            m_kn = kmask[:, None] & (offs_n < N)[None, :]
            off_kn = offs_k[:, None] * N + offs_n[None, :]
            ga = tl.load(ga_b + off_kn, mask=m_kn, other=0.0).to(ACC)
            a = tl.load(maps_b + off_kn, mask=m_kn, other=0.0).to(ACC)
            acc_t += ga * a
        t = tl.sum(acc_t, axis=1)
        if REFINE:
            acc_v = tl.zeros([KC, BLOCK_C], ACC)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + ar_c
                m_kc = kmask[:, None] & (offs_c < C)[None, :]
                off_kc = offs_k[:, None] * C + offs_c[None, :]
                g = tl.load(gv_b + off_kc, mask=m_kc, other=0.0).to(ACC)
                v = tl.load(vec_b + off_kc, mask=m_kc, other=0.0).to(ACC)
                acc_v += g * v
            t += tl.sum(acc_v, axis=1)
        tl.store(t_ws + offs_k, t, mask=kmask)
    tl.debug_barrier()

    # ---- (2) one pass over X -------------------------------------------------------------
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + ar_n
        nmask = offs_n < N
        nrm = tl.load(norms_b + offs_n, mask=nmask, other=0.0).to(ACC)
        rho = nrm + eps
        rad = tl.load(gn_b + offs_n, mask=nmask, other=0.0).to(ACC)
        k_first = tl.where(n0 > 0, K, 0)  # the first N-block writes w and u without reading
        # phase A: dot products, simbar, U, radial, w
        for k0 in range(0, K, KC):
            offs_k = k0 + ar_k
            kmask = offs_k < K
            ik = tl.load(idx_b + offs_k, mask=kmask, other=0)
            rho_i = tl.load(norms_b + ik, mask=kmask, other=0.0).to(ACC) + eps
            t = tl.load(t_ws + offs_k, mask=kmask, other=0.0)
            inv = tl.load(inv_b + offs_k, mask=kmask, other=0.0).to(ACC)
            p_r = tl.zeros([KC, BLOCK_N], ACC)
            p_g = tl.zeros([KC, BLOCK_N], ACC)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + ar_c
                tile = load_tile(xb, offs_c, offs_n, stride_xc, stride_xn, C, N, ACC)
                m_kc = kmask[:, None] & (offs_c < C)[None, :]
                r = tl.load(
                    xb + ik[:, None] * stride_xn + offs_c.to(tl.int64)[None, :] * stride_xc,
                    mask=m_kc, other=0.0,
                ).to(ACC)
                p_r += tl.sum(r[:, :, None] * tile[None, :, :], axis=1)
                if REFINE:
                    g = tl.load(gv_b + offs_k[:, None] * C + offs_c[None, :], mask=m_kc, other=0.0).to(ACC)
                    p_g += tl.sum(g[:, :, None] * tile[None, :, :], axis=1)
            m_kn = kmask[:, None] & nmask[None, :]
            off_kn = offs_k[:, None] * N + offs_n[None, :]
            sim = p_r / (rho[None, :] * rho_i[:, None])
            abar = tl.load(ga_b + off_kn, mask=m_kn, other=0.0).to(ACC)
            if REFINE:
                abar += p_g
            simbar = tl.where(m_kn, (abar - t[:, None]) * inv[:, None], 0.0)
            u_coef = simbar / rho[None, :]
            tl.store(u_coef_ws + off_kn, u_coef, mask=m_kn)
            rad -= tl.sum(u_coef * sim, axis=0)
            w_part = tl.sum(simbar * sim, axis=1)
            w_old = tl.load(w_ws + offs_k, mask=offs_k < k_first, other=0.0)
            tl.store(w_ws + offs_k, w_old + w_part, mask=kmask)
        rad = tl.where(nrm > 0, rad / tl.where(nrm > 0, nrm, one), 0.0)
        tl.store(rad_ws + offs_n, rad, mask=nmask)
        tl.debug_barrier()
        # phase B: dx tile, u
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + ar_c
            cmask = offs_c < C
            tile = load_tile(xb, offs_c, offs_n, stride_xc, stride_xn, C, N, ACC)
            acc = tile * rad[None, :]
            for k0 in range(0, K, KC):
                offs_k = k0 + ar_k
                kmask = offs_k < K
                ik = tl.load(idx_b + offs_k, mask=kmask, other=0)
                rho_i = tl.load(norms_b + ik, mask=kmask, other=0.0).to(ACC) + eps
                m_kc = kmask[:, None] & cmask[None, :]
                m_kn = kmask[:, None] & nmask[None, :]
                off_kn = offs_k[:, None] * N + offs_n[None, :]
                r = tl.load(
                    xb + ik[:, None] * stride_xn + offs_c.to(tl.int64)[None, :] * stride_xc,
                    mask=m_kc, other=0.0,
                ).to(ACC)
                u_coef = tl.load(u_coef_ws + off_kn, mask=m_kn, other=0.0)
                acc += tl.sum((r / rho_i[:, None])[:, :, None] * u_coef[:, None, :], axis=0)
                if REFINE:
                    g = tl.load(gv_b + offs_k[:, None] * C + offs_c[None, :], mask=m_kc, other=0.0).to(ACC)
                    a = tl.load(maps_b + off_kn, mask=m_kn, other=0.0).to(ACC)
                    acc += tl.sum(g[:, :, None] * a[:, None, :], axis=0)
                u_part = tl.sum(u_coef[:, None, :] * tile[None, :, :], axis=2)
                u_ptr = u_ws + offs_k[:, None] * C + offs_c[None, :]
                u_old = tl.load(u_ptr, mask=(offs_k < k_first)[:, None] & cmask[None, :], other=0.0)
                tl.store(u_ptr, u_old + u_part, mask=m_kc)
            dx_ptrs = dxb + offs_c.to(tl.int64)[:, None] * stride_dc + offs_n.to(tl.int64)[None, :] * stride_dn
            tl.store(dx_ptrs, acc.to(dx_ptrs.dtype.element_ty), mask=cmask[:, None] & nmask[None, :])
    tl.debug_barrier()

    # ---- (3) seed columns: phase-B value + corrections of every part seeded there --------
    for k in range(0, K):
        i_k = tl.load(idx_b + k)
        dup = tl.zeros([], tl.int32)  # parts before k seeded at the same column
        for k0 in range(0, K, KC):
            offs_k = k0 + ar_k
            i_j = tl.load(idx_b + offs_k, mask=offs_k < k, other=-1)
            dup += tl.sum(tl.where(i_j == i_k, 1, 0), axis=0)
        c_lim = tl.where(dup == 0, C, 0)  # only the first part of a column writes it
        rad_i = tl.load(rad_ws + i_k)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + ar_c
            cmask = offs_c < c_lim
            x_i = tl.load(xb + i_k * stride_xn + offs_c.to(tl.int64) * stride_xc, mask=cmask, other=0.0).to(ACC)
            val = x_i * rad_i
            for k0 in range(0, K, KC):
                offs_k = k0 + ar_k
                kmask = offs_k < K
                i_j = tl.load(idx_b + offs_k, mask=kmask, other=0)
                nrm_j = tl.load(norms_b + i_j, mask=kmask, other=0.0).to(ACC)
                rho_j = nrm_j + eps
                m_kc = kmask[:, None] & cmask[None, :]
                off_kc = offs_k[:, None] * C + offs_c[None, :]
                r = tl.load(
                    xb + i_j[:, None] * stride_xn + offs_c.to(tl.int64)[None, :] * stride_xc,
                    mask=m_kc, other=0.0,
                ).to(ACC)
                g = tl.load(gv_b + off_kc, mask=m_kc, other=0.0).to(ACC)
                u_coef = tl.load(u_coef_ws + offs_k * N + i_k, mask=kmask, other=0.0)
                val += tl.sum((r / rho_j[:, None]) * u_coef[:, None], axis=0)
                if REFINE:
                    a = tl.load(maps_b + offs_k * N + i_k, mask=kmask, other=0.0).to(ACC)
                    val += tl.sum(g * a[:, None], axis=0)
                u = tl.load(u_ws + off_kc, mask=m_kc, other=0.0)
                w = tl.load(w_ws + offs_k, mask=kmask, other=0.0)
                inv_seed_norm = tl.where(nrm_j > 0, one / (rho_j * tl.where(nrm_j > 0, nrm_j, one)), 0.0)
                corr = u / rho_j[:, None] - (w * inv_seed_norm)[:, None] * r
                if not REFINE:
                    corr += g
                same = kmask & (i_j == i_k)
                val += tl.sum(tl.where(same[:, None], corr, 0.0), axis=0)
            tl.store(dxb + i_k * stride_dn + offs_c.to(tl.int64) * stride_dc, val.to(dx_ptr.dtype.element_ty), mask=cmask)
