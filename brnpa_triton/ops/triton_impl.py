"""Launchers of the fused Triton kernels (``brnpa_triton.ops.kernels``).

``forward`` and ``backward`` follow ``torch_impl.forward`` / ``torch_impl.backward`` exactly
(same outputs, dtypes, degenerate-part rule and ``inv_sums`` semantics). Each is one kernel
launch with one program per image (grid ``(B,)``); the only other device work is allocating
the outputs and a small uninitialised workspace. Nothing synchronises with the host, so both
can be captured in a CUDA graph. ``x`` (B, C, N) is read through its strides whatever the
layout (NCHW, channels_last, tokens), and ``dx`` is allocated with ``x``'s strides.

Block sizes are fixed per kernel (the backward's depend on K <= 4 only; ``forward_config`` /
``backward_config``), never on B, C or N, so nothing is re-tuned or re-compiled for a new batch
size or resolution; ``all_configs`` lists every configuration (the compile test builds each of
them for sm_90). Tuning them on a GPU is future work. Tests may pass ``config=`` to force small blocks.
"""

from __future__ import annotations

import contextlib

import torch
import triton.language as tl

from brnpa_triton.ops.common import SUPPORTED_DTYPES, Forward, SavedForward, accumulation_dtype, to_output_dtype
from brnpa_triton.ops.kernels import brnpa_backward_kernel, brnpa_forward_kernel
from brnpa_triton.ops.kernels.forward import workspace_size as forward_workspace_size


# ---- launch heuristics ---------------------------------------------------------------------
# One program streams a whole image, so each program should keep many loads in flight: big
# tiles and 16 warps (8 for float64, whose registers are twice as wide). Without an explicit
# cap ptxas trades a few spilled values for occupancy; the cap (``maxnreg``: 128 a thread at
# 16 warps is the whole register file; 255 at 8 warps for float64) makes it allocate what the
# kernel needs, and tests/test_compile_sm90.py checks that no variant spills. Small C or N
# only waste masked lanes (no memory traffic), so tiles do not shrink with them; nothing
# depends on B. Tests pass ``config=`` to force small tiles and many blocks.

def _warps(dtype: torch.dtype) -> dict:
    return {"num_warps": 8, "maxnreg": 255} if dtype == torch.float64 else {"num_warps": 16, "maxnreg": 128}


def forward_config(C: int, N: int, K: int, dtype: torch.dtype) -> dict:
    """Launch configuration of the forward kernel: (BLOCK_C, BLOCK_N) tiles, warps, register cap."""
    return {"BLOCK_C": 64, "BLOCK_N": 64, **_warps(dtype)}


def backward_config(C: int, N: int, K: int, dtype: torch.dtype) -> dict:
    """Parts are handled KC at a time in (KC, BLOCK_C, BLOCK_N) broadcasts of 4096 elements
    (2048 for KC=8: at 4096, triton 3.6's compiler, the GPU machine's, spills 8 bytes for
    float16/bfloat16 channels_last where 3.9's does not)."""
    if K <= 4:
        return {"KC": 4, "BLOCK_C": 32, "BLOCK_N": 32, **_warps(dtype)}
    return {"KC": 8, "BLOCK_C": 16, "BLOCK_N": 16, **_warps(dtype)}


def launch_options(config: dict) -> dict:
    """The compiler options of a configuration (the rest are the kernels' constexprs)."""
    opts = {"num_warps": config.get("num_warps", 4)}
    if config.get("maxnreg"):
        opts["maxnreg"] = config["maxnreg"]
    return opts


def block_sizes(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("num_warps", "maxnreg")}


def all_configs() -> dict[str, list[tuple[torch.dtype, dict]]]:
    """Every (dtype, configuration) the heuristics can return, per kernel (for the compile test).

    The forward's tiles are fixed and the backward's depend only on K <= 4 or not, so one
    representative K of each kind covers them.
    """
    return {
        "forward": [(dtype, forward_config(1, 1, 1, dtype)) for dtype in SUPPORTED_DTYPES],
        "backward": [(dtype, backward_config(1, 1, k, dtype)) for dtype in SUPPORTED_DTYPES for k in (4, 5)],
    }


def acc_dtype(dtype: torch.dtype):
    """Triton accumulation dtype: float64 for float64 input, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


# ---- allocation (tests monkeypatch these to poison outputs with NaN) ------------------------

def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    """Same strides as x when x is dense (NCHW, channels_last, tokens); contiguous otherwise."""
    return torch.empty_like(x)


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(max(numel, 1), dtype=dtype, device=device)


def _check(x: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"triton_impl expects x of shape (B, C, N); got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton_impl supports float16, bfloat16, float32 and float64; got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"triton_impl needs a non-empty x; got shape {tuple(x.shape)}")


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ---- launchers ------------------------------------------------------------------------------

def forward(
    x: torch.Tensor,
    num_parts: int,
    refine: bool,
    seed_indices: torch.Tensor | None = None,
    by_activity: bool = False,
    *,
    config: dict | None = None,
) -> Forward:
    """BR-NPA forward on x (B, C, N) in one launch; see ``torch_impl.forward``."""
    _check(x)
    B, C, N = x.shape
    K = int(num_parts)
    if not 1 <= K <= N:
        raise ValueError(f"num_parts must be between 1 and N={N}; got {K}")
    dev = x.device
    ct = accumulation_dtype(x.dtype)
    vectors = _empty((B, K, C), x.dtype, dev)
    maps = _empty((B, K, N), x.dtype, dev)
    indices = _empty((B, K), torch.int64, dev)
    norms = _empty((B, N), ct, dev)  # kept in the compute dtype: the backward rebuilds rho from it
    inv_sums = _empty((B, K), ct, dev)
    ws = _workspace(B * forward_workspace_size(C, N, K), ct, dev)
    given = seed_indices is not None
    if given:
        if tuple(seed_indices.shape) != (B, K):
            raise ValueError(f"seed_indices must have shape {(B, K)}; got {tuple(seed_indices.shape)}")
        seeds = seed_indices.to(device=dev, dtype=torch.int64).contiguous()
    else:
        seeds = indices  # unused by the kernel
    cfg = forward_config(C, N, K, x.dtype) if config is None else config
    with _device_guard(dev):
        brnpa_forward_kernel[(B,)](
            x, seeds, vectors, maps, indices, norms, inv_sums, ws,
            C, N, K,
            x.stride(0), x.stride(1), x.stride(2),
            REFINE=bool(refine), GIVEN_SEEDS=given,
            ACC=acc_dtype(x.dtype), **block_sizes(cfg), **launch_options(cfg),
        )
    activity = torch.linalg.vector_norm(vectors, dim=2, dtype=ct)
    if by_activity:
        rank = torch.sort(activity, dim=1, descending=True, stable=True).indices
        vectors = vectors.gather(1, rank[:, :, None].expand(-1, -1, C))
        maps = maps.gather(1, rank[:, :, None].expand(-1, -1, N))
        indices, activity, inv_sums = (t.gather(1, rank) for t in (indices, activity, inv_sums))
    user_norms = to_output_dtype(norms, x.dtype) if norms.dtype != x.dtype else norms.clone()
    return Forward(vectors, maps, indices, to_output_dtype(activity, x.dtype), user_norms, norms, inv_sums)


def backward(
    x: torch.Tensor,
    grad_vectors: torch.Tensor,
    grad_maps: torch.Tensor | None,
    grad_activity: torch.Tensor | None,
    grad_norms: torch.Tensor | None,
    saved: SavedForward,
    refine: bool,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """dL/dx (B, C, N) in x's dtype and strides, in one launch; see ``torch_impl.backward``.

    The gradients are tensors (zeros for outputs that did not reach the loss); the small
    tensors (gradients and saved outputs) are made contiguous, which copies only when they
    arrive strided (e.g. expanded zeros).
    """
    _check(x)
    B, C, N = x.shape
    K = saved.indices.shape[1]
    dev = x.device
    ct = accumulation_dtype(x.dtype)
    grad_vectors = torch.zeros_like(saved.vectors) if grad_vectors is None else grad_vectors
    if grad_activity is not None:
        v = saved.vectors.to(ct)
        length = torch.linalg.vector_norm(v, dim=2, keepdim=True)
        grad_vectors = (grad_vectors.to(ct) + grad_activity.to(ct)[..., None] * torch.where(length > 0, v / length, 0.0))
    grad_maps = torch.zeros_like(saved.maps) if grad_maps is None else grad_maps
    grad_norms = torch.zeros_like(saved.norms) if grad_norms is None else grad_norms
    small = [
        t.contiguous()
        for t in (grad_vectors, grad_maps, grad_norms, saved.vectors, saved.maps, saved.indices,
                  saved.norms, saved.inv_sums)
    ]
    dx = _empty_like(x)
    ws = _workspace(B * (2 * K + K * N + N + K * C), ct, dev)
    cfg = backward_config(C, N, K, x.dtype) if config is None else config
    with _device_guard(dev):
        brnpa_backward_kernel[(B,)](
            x, *small, dx, ws,
            C, N, K,
            x.stride(0), x.stride(1), x.stride(2),
            dx.stride(0), dx.stride(1), dx.stride(2),
            REFINE=bool(refine), ACC=acc_dtype(x.dtype), **block_sizes(cfg), **launch_options(cfg),
        )
    return dx
