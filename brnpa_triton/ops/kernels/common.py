"""Helpers shared by the forward and backward kernels.

Every helper takes the accumulation dtype ``ACC`` (float32, or float64 for float64 input) as a
constexpr; loads are upcast to it right away (the interpreter computes bf16 arithmetic wrongly,
and the contract is fp32/fp64 accumulation anyway). Integer arguments may arrive as constexpr
(Triton specialises integers equal to 1), so nothing here calls methods on them.
"""

import triton
import triton.language as tl

from brnpa_triton.ops.common import DEGENERATE_SUM_RATIO, EPS

EPS_C = tl.constexpr(EPS)
RATIO_C = tl.constexpr(DEGENERATE_SUM_RATIO)


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
def load_tile(base, offs_c, offs_n, stride_c, stride_n, C, N, ACC: tl.constexpr):
    """The (BLOCK_C, BLOCK_N) tile x[offs_c, offs_n] of one image, zero outside, upcast to ACC.

    Offsets are int64 so a single image may exceed 2**31 elements.
    """
    ptrs = base + offs_c.to(tl.int64)[:, None] * stride_c + offs_n.to(tl.int64)[None, :] * stride_n
    mask = (offs_c[:, None] < C) & (offs_n[None, :] < N)
    return tl.load(ptrs, mask=mask, other=0.0).to(ACC)


@triton.jit
def store_saturating(ptrs, v, mask):
    """Store v in the pointers' dtype; float16 saturates at +-65504 instead of overflowing to inf.

    Gradients at all-zero feature vectors are ~1/eps = 1e5 times the upstream gradient (rho = eps
    there), and signed features can give vectors beyond float16's range: the library promises
    finite outputs and gradients for finite input.
    """
    if ptrs.dtype.element_ty == tl.float16:
        v = tl.minimum(tl.maximum(v, -65504.0), 65504.0)
    tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=mask)
