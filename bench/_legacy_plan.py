"""Launch plans of the one-program-per-image kernels, for the static report (``bench.kernels``).

The static report reads launch plans (``forward_plan``, ``backward_plan``, ``plan_variants``)
from ``brnpa_triton.ops.triton_impl``. Launchers that predate those functions issue one launch
per call, grid ``(B,)``, and let Triton's JIT specialise the arguments; this module describes
those launches with the same ``Launch`` records, so that the report can give their figures too
(``python -m bench.kernels --legacy``). It needs the old launchers (``forward_config``,
``backward_config``, ``all_configs``) and kernels (``brnpa_forward_kernel``,
``brnpa_backward_kernel``).

At a given shape, the signature is what Triton's JIT would build from the launcher's arguments:
pointers from a torch allocation are 16-byte aligned, an integer equal to 1 becomes a
constexpr, and an integer divisible by 16 gets a divisibility hint. ``plan_variants`` lists
every configuration the old launchers can pick, in three layouts: NCHW (``stride_n == 1``),
channels_last (``stride_c == 1``, no divisibility hints) and channels_last with every size and
stride a multiple of 16 (the vectorised case).
"""

from __future__ import annotations

import ast
import inspect
from typing import NamedTuple

import torch

from brnpa_triton.ops import torch_impl, triton_impl

try:
    from brnpa_triton.ops.kernels import brnpa_backward_kernel, brnpa_forward_kernel
    from brnpa_triton.ops.kernels.forward import workspace_size as forward_workspace_size
except ImportError as e:  # the kernels were redesigned: nothing left to describe
    raise ImportError(f"bench._legacy_plan describes the one-program-per-image kernels, which are gone: {e}") from e

if hasattr(triton_impl, "Launch"):
    Launch = triton_impl.Launch
else:
    class Launch(NamedTuple):
        name: str
        kernel: object
        grid: tuple
        signature: dict
        constexprs: dict
        attrs: dict
        options: dict
        repeats: int
        bytes_read: int
        bytes_written: int

SM_COUNT_WITHOUT_CUDA = 132
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
# Pointer arguments that are not x's dtype: int64 indices, and the compute dtype (ct) ones.
_INDEX_POINTERS = {"seeds_ptr", "idx_ptr"}
_COMPUTE_POINTERS = {"norms_ptr", "inv_ptr", "ws_ptr", "gn_ptr"}


def _arg_names(kernel) -> list[str]:
    return list(inspect.signature(kernel.fn).parameters)


def _describe(kernel, dtype: torch.dtype, runtime_ints: dict, constexprs: dict, *, aligned_ints: bool | None):
    """Signature, constexprs and attrs of one launch of ``kernel``.

    ``runtime_ints`` maps the integer arguments to their values; ``aligned_ints=None`` applies
    Triton's JIT rule (divisible by 16 -> hint, == 1 -> constexpr), True/False force the hint on
    every non-constexpr integer but K, or on none.
    """
    xt = DTYPE_NAMES[dtype]
    ct = DTYPE_NAMES[torch_impl.compute_dtype(dtype)]
    constexprs = dict(constexprs)
    for name, value in runtime_ints.items():
        if aligned_ints is None and value == 1:
            constexprs[name] = 1
    signature, attrs = {}, {}
    for i, name in enumerate(_arg_names(kernel)):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*i64" if name in _INDEX_POINTERS else f"*{ct}" if name in _COMPUTE_POINTERS else f"*{xt}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            value = runtime_ints.get(name)
            hint = (value is not None and value % 16 == 0) if aligned_ints is None else (aligned_ints and name != "K")
            if hint:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def forward_plan(B, C, N, K, dtype, x_strides, *, refine=True, given_seeds=False, sm_count=None) -> list:
    """The single forward launch: grid (B,), K+1 reads of X (the refinement's second look at an
    N-block comes from cache), outputs and the workspace written and read once."""
    cfg = triton_impl.forward_config(C, N, K, dtype)
    ints = {"C": C, "N": N, "K": K, "stride_xb": x_strides[0], "stride_xc": x_strides[1], "stride_xn": x_strides[2]}
    constexprs = {"REFINE": bool(refine), "GIVEN_SEEDS": bool(given_seeds),
                  "ACC": triton_impl.acc_dtype(dtype), **triton_impl.block_sizes(cfg)}
    signature, constexprs, attrs = _describe(brnpa_forward_kernel, dtype, ints, constexprs, aligned_ints=None)
    e, ce = _size(dtype), _size(torch_impl.compute_dtype(dtype))
    x_bytes = B * C * N * e
    workspace = B * forward_workspace_size(C, N, K) * ce
    written = B * K * C * e + B * K * N * e + B * K * 8 + B * N * ce + B * K * ce + workspace
    read = (K + 1) * x_bytes + workspace + (B * K * 8 if given_seeds else 0)
    return [Launch("forward", brnpa_forward_kernel, (B,), signature, constexprs, attrs,
                   triton_impl.launch_options(cfg), 1, read, written)]


def backward_plan(B, C, N, K, dtype, x_strides, *, refine=True, sm_count=None) -> list:
    """The single backward launch: grid (B,), one read of X (phase B's re-read of an N-block is
    counted as a cache hit), dX written once, the small saved tensors and the workspace."""
    cfg = triton_impl.backward_config(C, N, K, dtype)
    ints = {"C": C, "N": N, "K": K, "stride_xb": x_strides[0], "stride_xc": x_strides[1], "stride_xn": x_strides[2],
            "stride_db": x_strides[0], "stride_dc": x_strides[1], "stride_dn": x_strides[2]}
    constexprs = {"REFINE": bool(refine), "ACC": triton_impl.acc_dtype(dtype), **triton_impl.block_sizes(cfg)}
    signature, constexprs, attrs = _describe(brnpa_backward_kernel, dtype, ints, constexprs, aligned_ints=None)
    e, ce = _size(dtype), _size(torch_impl.compute_dtype(dtype))
    x_bytes = B * C * N * e
    workspace = B * (2 * K + K * N + N + K * C) * ce
    small = 2 * B * K * C * e + 2 * B * K * N * e + B * K * 8 + 2 * B * N * ce + B * K * ce
    return [Launch("backward", brnpa_backward_kernel, (B,), signature, constexprs, attrs,
                   triton_impl.launch_options(cfg), 1, x_bytes + small + workspace, x_bytes + workspace)]


_LAYOUTS = {  # name -> (integer arguments equal to 1, hint on every integer)
    "nchw": (("stride_xn", "stride_dn"), False),
    "channels_last": (("stride_xc", "stride_dc"), False),
    "channels_last_aligned": (("stride_xc", "stride_dc"), True),
}


def plan_variants() -> list:
    """Every (kernel, configuration, dtype, refine, given seeds, layout) the old launchers can
    compile, one nominal launch each (grid (1,), no traffic)."""
    out = []
    for kernel_name, items in triton_impl.all_configs().items():
        kernel = brnpa_forward_kernel if kernel_name == "forward" else brnpa_backward_kernel
        names = _arg_names(kernel)
        for dtype, cfg in items:
            for refine in (True, False):
                for given in ((False, True) if kernel_name == "forward" else (False,)):
                    for layout, (unit, aligned) in _LAYOUTS.items():
                        if aligned and dtype not in (torch.float32, torch.bfloat16):
                            continue
                        constexprs = {"REFINE": refine, "ACC": triton_impl.acc_dtype(dtype), **triton_impl.block_sizes(cfg)}
                        if kernel_name == "forward":
                            constexprs["GIVEN_SEEDS"] = given
                        constexprs.update({n: 1 for n in unit if n in names})
                        signature, constexprs, attrs = _describe(kernel, dtype, {}, constexprs, aligned_ints=aligned)
                        blocks = ",".join(f"{k}={v}" for k, v in triton_impl.block_sizes(cfg).items())
                        label = (f"{kernel_name} {DTYPE_NAMES[dtype]} {layout} refine={refine}"
                                 + (f" given_seeds={given}" if kernel_name == "forward" else "") + f" {blocks}")
                        out.append((label, [Launch(kernel_name, kernel, (1,), signature, constexprs, attrs,
                                                   triton_impl.launch_options(cfg), 1, 0, 0)]))
    return out


def streaming_for_lines(source: str) -> set[int]:
    """Lines of the ``for`` loops that stream X in the old kernels, which carry no
    ``# streams X`` marker: the loops whose own body (not a nested loop's) loads a tile with
    ``load_tile``."""
    lines = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.For) and _calls_directly(node, "load_tile"):
            lines.add(node.lineno)
    return lines


def _calls_directly(loop: ast.For, name: str) -> bool:
    todo = list(loop.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.For, ast.While)):
            continue  # a nested loop streams for itself
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == name:
            return True
        todo.extend(ast.iter_child_nodes(node))
    return False

