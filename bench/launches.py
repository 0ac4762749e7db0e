"""Kernel launches of the torch backend per forward and backward, counted without a GPU.

A GPU pays a few microseconds per launch whatever its size, so the torch backend on CUDA is
planned to make a handful of launches per pass over X (``torch_impl.DEVICE_PLAN``). This counts
the aten operators that run a kernel (views and allocations excluded; on CUDA nearly each is
one launch) while the device plan runs on meta tensors, at any shape, in a fraction of a second:

    python -m bench.launches                      # the CUDA benchmark shapes, K=3, NCHW float32
    python -m bench.launches --device cpu         # the same code on real CPU tensors (slow)

With ``--device cpu`` a torch_impl that has no plan (an older tree) is counted as CUDA ran it:
the CPU's block sizes, the batch in one chunk.
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from brnpa_triton.ops import torch_impl

# The shapes the CUDA benchmark reports the torch backend at (B, C, H, W).
CUDA_SHAPES = ((8, 2048, 28, 28), (32, 2048, 14, 14), (16, 2048, 56, 56), (64, 512, 28, 28))

# Operators that launch no kernel: views, metadata, allocations.
NO_KERNEL = {
    "view", "_unsafe_view", "transpose", "t", "permute", "expand", "slice", "select", "squeeze", "unsqueeze",
    "as_strided", "alias", "detach", "unbind", "split", "narrow", "diagonal", "_reshape_alias", "unflatten",
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "view_as",
}
# Operators that wait for the host (a CUDA graph cannot capture them).
HOST_SYNC = {"nonzero", "_local_scalar_dense", "item", "is_nonzero", "masked_select", "equal", "_unique2", "unique_dim",
             "unique_consecutive", "nonzero_static"}


class OpRecorder(TorchDispatchMode):
    """Records the name (``aten.<name>``, no overload) of every operator dispatched."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def launches(self) -> collections.Counter:
        return collections.Counter(n for n in self.names if n not in NO_KERNEL)

    def host_syncs(self) -> list[str]:
        return [n for n in self.names if n in HOST_SYNC]


def _device_plan():
    """Force the device plan where the module has one (restored by the caller)."""
    if hasattr(torch_impl, "FORCED_PLAN"):
        torch_impl.FORCED_PLAN = torch_impl.DEVICE_PLAN
    else:  # an older tree: CUDA used the CPU's block sizes, the batch in one chunk
        torch_impl.CACHE_CHUNK_BYTES = 1 << 62


def count(shape, K: int, device: str, dtype=torch.float32, refine: bool = True) -> tuple[OpRecorder, OpRecorder]:
    """(forward, backward) recorders of one call each, the loss on the vectors (as bench's)."""
    B, C, H, W = shape
    if device == "meta":
        x = torch.empty(B, C, H * W, device="meta", dtype=dtype)
    else:
        x = torch.randn(B, C, H * W, generator=torch.Generator().manual_seed(0)).relu_().to(dtype)
    names = ("FORCED_PLAN", "CACHE_CHUNK_BYTES")
    saved = {name: getattr(torch_impl, name) for name in names if hasattr(torch_impl, name)}
    _device_plan()
    try:
        with OpRecorder() as fwd:
            out = torch_impl.forward(x, K, refine)
        grad = torch.ones_like(out.vectors)
        with OpRecorder() as bwd:
            torch_impl.backward(x, grad, None, None, None, out.saved(), refine)
    finally:
        for name, value in saved.items():
            setattr(torch_impl, name, value)
    return fwd, bwd


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="meta", choices=["meta", "cpu"])
    ap.add_argument("--parts", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows = []
    print("| B x C x H x W | K | dtype | forward launches | backward launches | host syncs |")
    print("|---|---|---|---|---|---|")
    for shape in CUDA_SHAPES:
        fwd, bwd = count(shape, args.parts, args.device, dtype)
        f, b = sum(fwd.launches().values()), sum(bwd.launches().values())
        syncs = fwd.host_syncs() + bwd.host_syncs()
        rows.append({"shape": shape, "forward": f, "backward": b, "host_syncs": syncs,
                     "forward_ops": dict(fwd.launches()), "backward_ops": dict(bwd.launches())})
        name = "x".join(map(str, shape))
        print(f"| {name} | {args.parts} | {args.dtype} | {f} | {b} | {', '.join(syncs) or 'none'} |")
    return rows


if __name__ == "__main__":
    main()
