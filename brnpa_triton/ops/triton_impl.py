"""Launchers of the fused Triton kernels (``brnpa_triton.ops.kernels``), and their launch plans.

``forward`` and ``backward`` follow ``torch_impl.forward`` / ``torch_impl.backward`` (same
outputs, dtypes, degenerate-part rule, ``inv_sums`` semantics and ranking). A call issues only
kernel launches and allocations: the forward K + 2 launches, the backward 2, each over a grid
(B, S) where program (b, s) owns a chunk of image b's positions. Nothing synchronises with the
host, so both can be captured in a CUDA graph, and every cross-program sum is reduced in a
fixed order, so two runs agree bitwise. ``x`` (B, C, N) is read through its strides whatever
the layout (NCHW, channels_last, tokens), and ``dx`` is allocated with ``x``'s strides.

What runs is described by ``forward_plan`` / ``backward_plan`` (grids, constexprs, compiler
options, bytes moved), which the launchers execute as they are; ``plan_variants`` lists every
compiled variant they can pick. Tile sizes depend on the dtype, the layout and K only, never
on B, C or N; the number of chunks S depends on B, N and the device's SM count, so that a
small batch still fills the GPU. Tests may pass ``config=`` to force small tiles and chunks.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import torch

from brnpa_triton.ops.common import SUPPORTED_DTYPES, Forward, SavedForward, accumulation_dtype
from brnpa_triton.ops.kernels import backward as backward_kernels
from brnpa_triton.ops.kernels import forward as forward_kernels

SM_COUNT_WITHOUT_CUDA = 132  # an H100's: without a GPU (the interpreter) the same plans are built
N_CONTIGUOUS, C_CONTIGUOUS, STRIDED = 0, 1, 2
BLOCK_S = 32  # candidates / partial sums reduced per step
BLOCK_K = 16  # parts compared per step when ranking
FINAL_BLOCK_C = 128
FINAL_BLOCK_N = 128
# The register cap is the most a program may use; without it ptxas may spill below it to
# raise occupancy.
MAX_REGISTERS = 255


class Tiling(NamedTuple):
    """How a plan streams X: (BLOCK_C, BLOCK_N) tiles, warps per program, and the programs per
    SM that the chunking aims for (a small batch gets more chunks of positions, up to one tile
    each)."""

    block_c: int
    block_n: int
    num_warps: int
    programs_per_sm: int


# Tiles of 8 elements a thread with 128-bit loads along the contiguous dimension whenever the
# rows are aligned. Warps and programs per SM were chosen on an NVIDIA H200 by timing CUDA-graph
# replays of each plan (scripts/gpu_sweep.py, bench/results/gpu_sweep-nvidia-h200.json, summed
# up in bench/results/gpu-nvidia-h200.md): four-warp NCHW programs tile 64 channels (the sum over
# C crosses warps once per chunk, not per tile), four-warp float32 channels_last forwards tile 32
# positions; 16-bit channels_last forwards and every channels_last backward ran fastest in
# one-warp programs, 4 and 8 per SM. float64 and strided views keep one-warp tiles (no GPU
# timing yet).
_FORWARD_TILES = {
    (N_CONTIGUOUS, 4): Tiling(64, 16, 4, 16), (N_CONTIGUOUS, 2): Tiling(64, 16, 4, 16),
    (N_CONTIGUOUS, 8): Tiling(16, 8, 1, 16),
    (C_CONTIGUOUS, 4): Tiling(128, 32, 4, 16), (C_CONTIGUOUS, 2): Tiling(256, 4, 1, 4),
    (C_CONTIGUOUS, 8): Tiling(64, 8, 1, 16),
    (STRIDED, 4): Tiling(32, 16, 1, 16), (STRIDED, 2): Tiling(32, 16, 1, 16), (STRIDED, 8): Tiling(32, 8, 1, 16),
}
# The backward keeps two accumulators per part (KG <= 4 parts at once): fewer elements a thread
# for strided views and float64 channels_last, whose addresses or doubles leave no room for 8.
_BACKWARD_TILES = {
    (N_CONTIGUOUS, 4): Tiling(64, 16, 4, 16), (N_CONTIGUOUS, 2): Tiling(64, 16, 4, 16),
    (N_CONTIGUOUS, 8): Tiling(16, 8, 1, 16),
    (C_CONTIGUOUS, 4): Tiling(128, 2, 1, 8), (C_CONTIGUOUS, 2): Tiling(256, 1, 1, 8),
    (C_CONTIGUOUS, 8): Tiling(32, 2, 1, 16),
    (STRIDED, 4): Tiling(16, 8, 1, 16), (STRIDED, 2): Tiling(16, 8, 1, 16), (STRIDED, 8): Tiling(8, 8, 1, 16),
}
_TYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
               torch.int64: "i64", torch.int32: "i32"}


class Launch(NamedTuple):
    """One kernel launch of a plan, as the launcher issues it (see ``forward_plan``)."""

    name: str
    kernel: object  # triton.JITFunction
    grid: tuple
    signature: dict  # arg name -> triton type string ("*fp32", "i32", "constexpr", ...)
    constexprs: dict  # every constexpr argument and its value
    attrs: dict  # ASTSource attrs: 16-byte aligned pointers
    options: dict  # compiler options (num_warps)
    repeats: int  # times issued per call (forward.part: K)
    bytes_read: int  # DRAM bytes this launch must read (X once per launch that streams it)
    bytes_written: int


# ---- layout and heuristics ---------------------------------------------------------------

def _triton_dtype(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _layout(strides: tuple) -> int:
    """Which stride of a (B, C, N) view is 1 (N first: a (B, C, 1) view counts as NCHW)."""
    _, stride_c, stride_n = strides
    if stride_n == 1:
        return N_CONTIGUOUS
    if stride_c == 1:
        return C_CONTIGUOUS
    return STRIDED


def _alignment(strides: tuple, layout: int, element_size: int) -> int:
    """Largest power of two (elements, at most 16 bytes' worth) dividing the strides other than
    the unit one: the rows of X start that aligned (given a 16-byte aligned base pointer)."""
    if layout == STRIDED:
        return 1
    align = max(1, 16 // element_size)
    for stride in (s for i, s in enumerate(strides) if i != (2 if layout == N_CONTIGUOUS else 1)):
        while align > 1 and stride % align:
            align //= 2
    return align


def _unit_strides(strides: tuple, layout: int, align: int) -> tuple:
    """The strides as the kernels take them: divided by the alignment for contiguous layouts."""
    if layout == STRIDED:
        return tuple(strides)
    return tuple(s // align if i != (2 if layout == N_CONTIGUOUS else 1) else 0 for i, s in enumerate(strides))


def _pow2_divisor(value: int, cap: int = 16) -> int:
    """Largest power of two, at most ``cap``, that divides ``value``."""
    align = cap
    while value % align:
        align //= 2
    return align


def _size_hints(C: int, N: int) -> dict:
    """C and N are passed divided by these (see ``kernels.common.from_units``)."""
    return dict(C_ALIGN=_pow2_divisor(C), N_ALIGN=_pow2_divisor(N))


def _sizes(launch: Launch, C: int, N: int, K: int, S: int) -> dict:
    return dict(C=C // launch.constexprs["C_ALIGN"], N=N // launch.constexprs["N_ALIGN"], K=K, S=S)


def _part_group(K: int) -> int:
    """Parts multiplied by a tile at once in the backward: K rounded up to a power of two, at most 4."""
    return min(4, 1 << max(0, (K - 1).bit_length()))


@functools.cache
def _device_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device | None = None) -> int:
    if device is not None and device.type == "cuda":
        return _device_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if device is None and torch.cuda.is_available():
        return _device_sm_count(torch.cuda.current_device())
    return SM_COUNT_WITHOUT_CUDA


def ceil_div(a: int, b: int) -> int:
    """The integer ceiling of a / b (b > 0)."""
    return -(-a // b)


def chunking(B: int, N: int, block_n: int, sm_count: int, tiles_per_chunk: int | None = None,
             programs_per_sm: int = 16) -> tuple[int, int]:
    """(S, tiles per chunk): enough chunks that B * S reaches ``programs_per_sm`` programs per SM
    when the image's tiles of positions allow it, and no more: larger batches get longer
    chunks, not more programs."""
    tiles = ceil_div(N, block_n)
    if tiles_per_chunk is None:
        wanted = max(1, ceil_div(programs_per_sm * sm_count, B))
        tiles_per_chunk = max(1, ceil_div(tiles, wanted))
    S = ceil_div(tiles, min(tiles_per_chunk, tiles))
    return S, _tiles(N, block_n, S)


def _slice_of_channels(C: int, S: int, block_c: int) -> int:
    """Channels per program in the final launches: C split over the S programs of an image."""
    return ceil_div(ceil_div(C, S), block_c) * block_c


# ---- workspaces (one source for every size) --------------------------------------------------

def forward_workspace(B: int, C: int, N: int, K: int, S: int, refine: bool) -> dict[str, tuple[tuple, bool]]:
    """name -> (shape, is_integer) of every forward workspace buffer (accumulation dtype or int32)."""
    return {
        "scores": ((B, 2, N), False),  # s_n, double-buffered across part launches
        "sims": ((B, K, N), False),  # sim_kn, unnormalised
        "part_sums": ((B, K, S), False),  # each chunk's sum_n sim_kn
        "part_abs": ((B, K, S), False),  # each chunk's sum_n |sim_kn|
        "cand_score": ((B, K, S), False),  # each chunk's best score before part k
        "sums": ((B, K + 1, S, C) if refine else (1,), False),  # each chunk's sum_n sim_kn x_n; slot K: sum_n x_n
        "norm_max": ((B, S) if refine else (1,), False),  # each chunk's largest ||x_n||
        "sims_scale": ((B, K, 2) if refine else (1,), False),  # each part's 2^e and 2^-e (kernels.common.sims_scale)
        "vectors": ((B, K, C), False),  # v_k, unranked
        "activity": ((B, K), False),
        "cand_index": ((B, K, S), True),  # ... and its lowest position
        "tickets": ((B,), True),  # programs of image b done with the final launch
    }


def backward_workspace(B: int, C: int, N: int, K: int, S: int) -> dict[str, tuple[tuple, bool]]:
    return {
        "totals": ((B, S, 2, K), False),  # each program's T_k and ||v_k||
        "u_coef": ((B, K, N), False),  # U_kn = simbar_kn / rho_n
        "u_sums": ((B, K, S, C), False),  # each chunk's sum_n U_kn x_n
        "w_sums": ((B, K, S), False),  # each chunk's sum_n simbar_kn sim_kn
    }


def _padded(numel: int) -> int:
    return ceil_div(numel, 16) * 16  # every buffer starts 64-byte aligned


def _workspace_numel(layout: dict) -> tuple[int, int]:
    floats = sum(_padded(math.prod(shape)) for shape, is_int in layout.values() if not is_int)
    ints = sum(_padded(math.prod(shape)) for shape, is_int in layout.values() if is_int)
    return floats, ints


# ---- allocation (tests monkeypatch these to poison outputs and workspaces) -----------------

def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    """Same strides as x when x is dense (NCHW, channels_last, tokens); otherwise dense, with
    x's dimensions in x's stride order (``torch.empty_like``'s preserve_format)."""
    return torch.empty_like(x)


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(max(numel, 1), dtype=dtype, device=device)


@functools.lru_cache(maxsize=256)
def _workspace_spans(backward: bool, *sizes) -> tuple[int, int, tuple]:
    """(float elements, int32 elements, ((name, is_int, offset, shape), ...)) of a workspace:
    computed once per problem size, since every call of that size lays it out the same way."""
    layout = backward_workspace(*sizes) if backward else forward_workspace(*sizes)
    floats, ints = _workspace_numel(layout)
    offsets, spans = {False: 0, True: 0}, []
    for name, (shape, is_int) in layout.items():
        spans.append((name, is_int, offsets[is_int], shape))
        offsets[is_int] += _padded(math.prod(shape))
    return floats, ints, tuple(spans)


def _allocate_workspace(backward: bool, sizes: tuple, acc: torch.dtype, device: torch.device) -> dict:
    """Views (no device work) into one float and one int32 allocation."""
    floats, ints, spans = _workspace_spans(backward, *sizes)
    pools = {False: _workspace(floats, acc, device), True: _workspace(ints, torch.int32, device)}
    return {name: pools[is_int][offset: offset + math.prod(shape)].view(shape)
            for name, is_int, offset, shape in spans}


def _check(x: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"triton_impl expects x of shape (B, C, N); got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton_impl supports float16, bfloat16, float32 and float64; got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"triton_impl needs a non-empty x; got shape {tuple(x.shape)}")


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ---- plans ------------------------------------------------------------------------------------

def _signature(kernel, constexprs: dict, pointer_types: dict, big_ints: set = frozenset()) -> tuple[dict, dict]:
    """(signature, attrs) for ASTSource: pointers 16-byte aligned, integers not specialised."""
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = "*" + pointer_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i64" if name in big_ints else "i32"
    return signature, attrs


def _big(values: dict) -> set:
    return {name for name, v in values.items() if not -(2**31) <= v < 2**31}


def _config(config: dict | None, key: str, default):
    return default if not config or key not in config else config[key]


def forward_plan(B, C, N, K, dtype, x_strides, *, refine=True, given_seeds=False, sm_count=None, by_activity=False,
                 config: dict | None = None) -> list[Launch]:
    """The forward's launches for x (B, C, N) of ``dtype`` with (B, C, N) strides ``x_strides``.

    ``config`` (tests) may force ``BLOCK_C``, ``BLOCK_N`` and ``tiles_per_chunk``. Plans are
    cached per problem (building one costs tens of microseconds of Python per call).
    """
    sms = _sm_count() if sm_count is None else sm_count
    args = (B, C, N, K, dtype, tuple(x_strides), bool(refine), bool(given_seeds), sms, bool(by_activity))
    if config:
        return _build_forward_plan(*args, config)
    return list(_cached_forward_plan(*args))


def _build_forward_plan(B, C, N, K, dtype, x_strides, refine, given_seeds, sm_count, by_activity,
                        config: dict | None = None) -> list[Launch]:
    layout = _layout(tuple(x_strides))
    esize = dtype.itemsize
    align = _alignment(tuple(x_strides), layout, esize)
    tiling = _FORWARD_TILES[(layout, esize)]
    block_c, block_n = _config(config, "BLOCK_C", tiling.block_c), _config(config, "BLOCK_N", tiling.block_n)
    S, tiles_per_chunk = chunking(B, N, block_n, sm_count, _config(config, "tiles_per_chunk", None),
                                  tiling.programs_per_sm)
    options = dict(num_warps=tiling.num_warps, maxnreg=MAX_REGISTERS)
    acc = accumulation_dtype(dtype)
    acc_size = acc.itemsize
    acc_name, x_name = _TYPE_NAMES[acc], _TYPE_NAMES[dtype]
    ACC = _triton_dtype(dtype)
    common = dict(LAYOUT=layout, ALIGN=align, REFINE=bool(refine), GIVEN_SEEDS=bool(given_seeds))
    x_bytes = B * C * N * esize
    # _unit_strides keeps the three (B, C, N) strides: the lengths match by construction.
    ints = dict(zip(("stride_xb", "stride_xc", "stride_xn"), _unit_strides(tuple(x_strides), layout, align),
                    strict=True))
    sums_bytes = B * S * C * acc_size if refine else 0

    norms_cx = dict(common, BLOCK_C=block_c, BLOCK_N=block_n, **_size_hints(C, N), ACC=ACC)
    sig, attrs = _signature(forward_kernels.forward_norms_kernel, norms_cx, dict(
        x_ptr=x_name, norms_ptr=x_name, saved_norms_ptr=acc_name, scores_ptr=acc_name, cand_score_ptr=acc_name,
        cand_index_ptr="i32", sums_ptr=acc_name, norm_max_ptr=acc_name, ticket_ptr="i32"), _big(ints))
    norms = Launch("forward.norms", forward_kernels.forward_norms_kernel, (B, S), sig, norms_cx, attrs, dict(options),
                   1, x_bytes, B * N * (esize + 2 * acc_size) + sums_bytes)

    part_cx = dict(common, BLOCK_C=block_c, BLOCK_N=block_n, BLOCK_S=BLOCK_S, **_size_hints(C, N), ACC=ACC)
    sig, attrs = _signature(forward_kernels.forward_part_kernel, part_cx, dict(
        x_ptr=x_name, seeds_ptr="i64", saved_norms_ptr=acc_name, scores_ptr=acc_name, sims_ptr=acc_name,
        part_sums_ptr=acc_name, part_abs_ptr=acc_name, cand_score_ptr=acc_name, cand_index_ptr="i32",
        sums_ptr=acc_name, norm_max_ptr=acc_name, sims_scale_ptr=acc_name), _big(ints))
    part = Launch("forward.part", forward_kernels.forward_part_kernel, (B, S), sig, part_cx, attrs, dict(options), K,
                  x_bytes + B * N * 3 * acc_size, B * N * 2 * acc_size + sums_bytes)

    final_cx = dict(common, BY_ACTIVITY=bool(by_activity), BLOCK_C=FINAL_BLOCK_C, BLOCK_N=FINAL_BLOCK_N,
                    BLOCK_S=BLOCK_S, BLOCK_K=BLOCK_K, **_size_hints(C, N), ACC=ACC)
    sig, attrs = _signature(forward_kernels.forward_final_kernel, final_cx, dict(
        x_ptr=x_name, seeds_ptr="i64", cand_score_ptr=acc_name, cand_index_ptr="i32", part_sums_ptr=acc_name,
        part_abs_ptr=acc_name, sims_ptr=acc_name, sums_ptr=acc_name, sims_scale_ptr=acc_name, vectors_ws_ptr=acc_name,
        activity_ws=acc_name,
        ticket_ptr="i32", vectors_ptr=x_name, maps_ptr=x_name, indices_ptr="i64", activity_ptr=x_name,
        inv_sums_ptr=acc_name), _big(ints))
    outputs = B * K * ((C + N) * esize + 8 + esize + acc_size)
    final = Launch("forward.final", forward_kernels.forward_final_kernel, (B, S), sig, final_cx, attrs,
                   dict(options), 1, K * sums_bytes + B * K * (N + 2 * C) * acc_size, outputs + B * K * C * acc_size)
    return [norms, part, final]


def backward_plan(B, C, N, K, dtype, x_strides, *, refine=True, sm_count=None, dx_strides=None,
                  grads=(True, True, False, True), config: dict | None = None) -> list[Launch]:
    """The backward's launches. ``grads`` says which of (vectors, maps, activity, norms) have
    a gradient; ``dx_strides`` defaults to ``x_strides`` (dense x). Cached like ``forward_plan``."""
    x_strides = tuple(x_strides)
    dx_strides = x_strides if dx_strides is None else tuple(dx_strides)
    sms = _sm_count() if sm_count is None else sm_count
    args = (B, C, N, K, dtype, x_strides, bool(refine), sms, dx_strides, tuple(bool(g) for g in grads))
    if config:
        return _build_backward_plan(*args, config)
    return list(_cached_backward_plan(*args))


def _build_backward_plan(B, C, N, K, dtype, x_strides, refine, sm_count, dx_strides, grads,
                         config: dict | None = None) -> list[Launch]:
    layout, dx_layout = _layout(x_strides), _layout(dx_strides)
    esize = dtype.itemsize
    align, dx_align = _alignment(x_strides, layout, esize), _alignment(dx_strides, dx_layout, esize)
    tiling = _BACKWARD_TILES[(layout, esize)]
    block_c, block_n = _config(config, "BLOCK_C", tiling.block_c), _config(config, "BLOCK_N", tiling.block_n)
    S, _ = chunking(B, N, block_n, sm_count, _config(config, "tiles_per_chunk", None), tiling.programs_per_sm)
    options = dict(num_warps=tiling.num_warps, maxnreg=MAX_REGISTERS)
    acc = accumulation_dtype(dtype)
    acc_size = acc.itemsize
    acc_name, x_name = _TYPE_NAMES[acc], _TYPE_NAMES[dtype]
    has_vectors, has_maps, has_activity, has_norms = (bool(g) for g in grads)
    ints = dict(zip(("stride_xb", "stride_xc", "stride_xn"), _unit_strides(x_strides, layout, align), strict=True))
    ints.update(zip(("stride_db", "stride_dc", "stride_dn"), _unit_strides(dx_strides, dx_layout, dx_align),
                    strict=True))
    x_bytes = B * C * N * esize
    flags = dict(LAYOUT=layout, ALIGN=align, DX_LAYOUT=dx_layout, DX_ALIGN=dx_align, REFINE=bool(refine),
                 HAS_GRAD_VECTORS=has_vectors, HAS_GRAD_ACTIVITY=has_activity)
    dx_cx = dict(flags, HAS_GRAD_MAPS=has_maps, HAS_GRAD_NORMS=has_norms, KG=_part_group(K), BLOCK_C=block_c,
                 BLOCK_N=block_n, **_size_hints(C, N), ACC=_triton_dtype(dtype))
    sig, attrs = _signature(backward_kernels.backward_dx_kernel, dx_cx, dict(
        x_ptr=x_name, dx_ptr=x_name, gvec_ptr=x_name, gmap_ptr=x_name, gact_ptr=x_name, gnorm_ptr=x_name,
        vec_ptr=x_name, maps_ptr=x_name, indices_ptr="i64", norms_ptr=acc_name, inv_sums_ptr=acc_name,
        totals_ptr=acc_name, u_coef_ptr=acc_name, u_sums_ptr=acc_name, w_sums_ptr=acc_name), _big(ints))
    small = B * K * (2 * C + 2 * N) * esize + B * N * (esize + acc_size)
    dx = Launch("backward.dx", backward_kernels.backward_dx_kernel, (B, S), sig, dx_cx, attrs, dict(options), 1,
                x_bytes + small, x_bytes + B * K * (S * C + N) * acc_size)
    seeds_cx = dict(flags, BLOCK_C=FINAL_BLOCK_C, BLOCK_S=BLOCK_S, **_size_hints(C, N), ACC=_triton_dtype(dtype))
    sig, attrs = _signature(backward_kernels.backward_seeds_kernel, seeds_cx, dict(
        x_ptr=x_name, dx_ptr=x_name, gvec_ptr=x_name, gact_ptr=x_name, vec_ptr=x_name, indices_ptr="i64",
        norms_ptr=acc_name, totals_ptr=acc_name, u_sums_ptr=acc_name, w_sums_ptr=acc_name), _big(ints))
    seeds = Launch("backward.seeds", backward_kernels.backward_seeds_kernel, (B, S), sig, seeds_cx, attrs,
                   dict(options), 1, B * K * S * C * acc_size + 2 * B * K * C * esize, B * K * C * esize)
    return [dx, seeds]


_cached_forward_plan = functools.lru_cache(maxsize=256)(lambda *args: tuple(_build_forward_plan(*args)))
_cached_backward_plan = functools.lru_cache(maxsize=256)(lambda *args: tuple(_build_backward_plan(*args)))


def clear_plan_caches() -> None:
    """Forget cached plans and workspace layouts (after editing the tiling tables, as
    ``scripts/gpu_sweep.py`` does)."""
    _cached_forward_plan.cache_clear()
    _cached_backward_plan.cache_clear()
    _workspace_spans.cache_clear()


def plan_variants() -> list[tuple[str, list[Launch]]]:
    """Compiled variants the launchers can pick, for compile checks: every dtype and layout
    (NCHW rows of 196 and 3136 elements, channels_last, arbitrary strides), each crossed with
    plans that together take every value of every flag (refinement, given seeds, ranking,
    gradient flags, part groups KG = 1, 2, 4). Flags are not crossed with each other: that would
    be hundreds of variants of the same loops."""
    variants = []
    B, C = 2, 2048
    forward_flags = [dict(refine=True, given_seeds=False, by_activity=True),
                     dict(refine=False, given_seeds=True, by_activity=False)]
    backward_flags = [(True, 3, (True, True, True, True)), (False, 1, (True, False, False, False)),
                      (True, 2, (False, True, False, False))]
    for dtype in SUPPORTED_DTYPES:
        name = _TYPE_NAMES[dtype]
        layouts = [("nchw", 196, (C * 196, 196, 1)), ("channels_last", 196, (196 * C, 1, C)),
                   ("strided", 196, (2 * C * 196, 2 * 196, 2))]
        if dtype.itemsize == 2:  # 16-bit NCHW rows of 196 are only 8-byte aligned; of 3136, 16-byte
            layouts.append(("nchw", 3136, (C * 3136, 3136, 1)))
        for layout_name, N, strides in layouts:
            for flags in forward_flags:
                plan = forward_plan(B, C, N, 3, dtype, strides, sm_count=SM_COUNT_WITHOUT_CUDA, **flags)
                label = " ".join(f"{k}={v}" for k, v in flags.items())
                variants.append((f"forward {name} {layout_name} N={N} {label}", plan))
            for refine, K, grads in backward_flags:
                plan = backward_plan(B, C, N, K, dtype, strides, refine=refine, grads=grads,
                                     sm_count=SM_COUNT_WITHOUT_CUDA)
                variants.append((f"backward {name} {layout_name} N={N} refine={refine} K={K} "
                                 f"grads={''.join('1' if g else '0' for g in grads)}", plan))
    return variants


# ---- launchers --------------------------------------------------------------------------------

def _run(launch: Launch, args: dict, **runtime) -> None:
    """Launch as planned: runtime args by name, the plan's constexprs and options."""
    launch.kernel[launch.grid](**args, **runtime, **launch.constexprs, **launch.options)


def forward(
    x: torch.Tensor,
    num_parts: int,
    refine: bool,
    seed_indices: torch.Tensor | None = None,
    by_activity: bool = False,
    *,
    config: dict | None = None,
) -> Forward:
    """BR-NPA forward on x (B, C, N) in K + 2 launches; see ``torch_impl.forward``."""
    _check(x)
    B, C, N = x.shape
    K = int(num_parts)
    if not 1 <= K <= N:
        raise ValueError(f"num_parts must be between 1 and N={N}; got {K}")
    given = seed_indices is not None
    if given and tuple(seed_indices.shape) != (B, K):
        raise ValueError(f"seed_indices must have shape {(B, K)}; got {tuple(seed_indices.shape)}")
    if given and seed_indices.dtype != torch.int64:
        raise TypeError(f"seed_indices must be int64; got {seed_indices.dtype}")
    dev = x.device
    acc = accumulation_dtype(x.dtype)
    plan = forward_plan(B, C, N, K, x.dtype, x.stride(), refine=refine, given_seeds=given, by_activity=by_activity,
                        sm_count=_sm_count(dev), config=config)
    norms_launch, part_launch, final_launch = plan
    S = norms_launch.grid[1]
    tiles_per_chunk = _tiles(N, norms_launch.constexprs["BLOCK_N"], S)
    vectors = _empty((B, K, C), x.dtype, dev)
    maps = _empty((B, K, N), x.dtype, dev)
    indices = _empty((B, K), torch.int64, dev)
    activity = _empty((B, K), x.dtype, dev)
    norms = _empty((B, N), x.dtype, dev)
    saved_norms = _empty((B, N), acc, dev)
    inv_sums = _empty((B, K), acc, dev)
    ws = _allocate_workspace(False, (B, C, N, K, S, bool(refine)), acc, dev)
    seeds = seed_indices if given else indices  # not read without given seeds
    seed_strides = dict(seeds_stride_b=seeds.stride(0), seeds_stride_k=seeds.stride(1))
    layout, align = norms_launch.constexprs["LAYOUT"], norms_launch.constexprs["ALIGN"]
    strides = dict(zip(("stride_xb", "stride_xc", "stride_xn"), _unit_strides(x.stride(), layout, align),
                       strict=True))
    sizes = _sizes(norms_launch, C, N, K, S)
    with _device_guard(dev):
        _run(norms_launch, dict(x_ptr=x, norms_ptr=norms, saved_norms_ptr=saved_norms, scores_ptr=ws["scores"],
                                cand_score_ptr=ws["cand_score"], cand_index_ptr=ws["cand_index"], sums_ptr=ws["sums"],
                                norm_max_ptr=ws["norm_max"], ticket_ptr=ws["tickets"]),
             tiles_per_chunk=tiles_per_chunk, **sizes, **strides)
        for k in range(K):
            _run(part_launch, dict(x_ptr=x, seeds_ptr=seeds, saved_norms_ptr=saved_norms, scores_ptr=ws["scores"],
                                   sims_ptr=ws["sims"], part_sums_ptr=ws["part_sums"], part_abs_ptr=ws["part_abs"],
                                   cand_score_ptr=ws["cand_score"], cand_index_ptr=ws["cand_index"],
                                   sums_ptr=ws["sums"], norm_max_ptr=ws["norm_max"], sims_scale_ptr=ws["sims_scale"]),
                 part=k, tiles_per_chunk=tiles_per_chunk, **sizes, **strides, **seed_strides)
        _run(final_launch, dict(x_ptr=x, seeds_ptr=seeds, cand_score_ptr=ws["cand_score"],
                                cand_index_ptr=ws["cand_index"], part_sums_ptr=ws["part_sums"],
                                part_abs_ptr=ws["part_abs"], sims_ptr=ws["sims"], sums_ptr=ws["sums"],
                                sims_scale_ptr=ws["sims_scale"], vectors_ws_ptr=ws["vectors"],
                                activity_ws=ws["activity"], ticket_ptr=ws["tickets"], vectors_ptr=vectors,
                                maps_ptr=maps, indices_ptr=indices, activity_ptr=activity, inv_sums_ptr=inv_sums),
             c_per_program=_slice_of_channels(C, S, FINAL_BLOCK_C), **sizes, **strides, **seed_strides)
    return Forward(vectors, maps, indices, activity, norms, saved_norms, inv_sums)


def _tiles(N: int, block_n: int, S: int) -> int:
    """Tiles per chunk of a plan with S chunks."""
    return ceil_div(ceil_div(N, block_n), S)


def backward(
    x: torch.Tensor,
    grad_vectors: torch.Tensor | None,
    grad_maps: torch.Tensor | None,
    grad_activity: torch.Tensor | None,
    grad_norms: torch.Tensor | None,
    saved: SavedForward,
    refine: bool,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """dL/dx (B, C, N) in x's dtype and strides, in 2 launches; see ``torch_impl.backward``.

    Gradients of outputs that did not reach the loss may be None (the kernels skip their terms).
    The gradients and saved tensors are read as contiguous (B, K, ...) arrays: ``contiguous()``
    copies only one that arrives strided.
    """
    _check(x)
    B, C, N = x.shape
    K = saved.indices.shape[1]
    dev = x.device
    acc = accumulation_dtype(x.dtype)
    grads = (grad_vectors, grad_maps, grad_activity, grad_norms)
    dx = _empty_like(x)
    plan = backward_plan(B, C, N, K, x.dtype, x.stride(), refine=refine, sm_count=_sm_count(dev),
                         dx_strides=dx.stride(), grads=tuple(g is not None for g in grads), config=config)
    dx_launch, seeds_launch = plan
    S = dx_launch.grid[1]
    ws = _allocate_workspace(True, (B, C, N, K, S), acc, dev)
    g_vec, g_map, g_act, g_norm = (x if g is None else g.contiguous() for g in grads)  # x: a placeholder, not read
    vectors, maps, indices, saved_norms, inv_sums = (t.contiguous() for t in saved)
    cx = dx_launch.constexprs
    strides = dict(zip(("stride_xb", "stride_xc", "stride_xn"), _unit_strides(x.stride(), cx["LAYOUT"], cx["ALIGN"]),
                       strict=True))
    strides.update(zip(("stride_db", "stride_dc", "stride_dn"),
                       _unit_strides(dx.stride(), cx["DX_LAYOUT"], cx["DX_ALIGN"]), strict=True))
    sizes = _sizes(dx_launch, C, N, K, S)
    with _device_guard(dev):
        _run(dx_launch, dict(x_ptr=x, dx_ptr=dx, gvec_ptr=g_vec, gmap_ptr=g_map, gact_ptr=g_act, gnorm_ptr=g_norm,
                             vec_ptr=vectors, maps_ptr=maps, indices_ptr=indices, norms_ptr=saved_norms,
                             inv_sums_ptr=inv_sums, totals_ptr=ws["totals"], u_coef_ptr=ws["u_coef"],
                             u_sums_ptr=ws["u_sums"], w_sums_ptr=ws["w_sums"]),
             tiles_per_chunk=_tiles(N, cx["BLOCK_N"], S), **sizes, **strides)
        _run(seeds_launch, dict(x_ptr=x, dx_ptr=dx, gvec_ptr=g_vec, gact_ptr=g_act, vec_ptr=vectors,
                                indices_ptr=indices, norms_ptr=saved_norms, totals_ptr=ws["totals"],
                                u_sums_ptr=ws["u_sums"], w_sums_ptr=ws["w_sums"]),
             c_per_program=_slice_of_channels(C, S, FINAL_BLOCK_C), **sizes, **strides)
    return dx
