"""Whether a batched matrix product rounds every column of its right operand alike.

The CPU forward computes its seed dot products as ``torch.bmm(directions, x)``: at
(8, 2048, 28x28) float32 on a 2-core Xeon, 1 thread, 2.1 ms per part against 4.4 ms for the
elementwise multiply-adds that reduce every column in one order by construction. BR-NPA's tie
rule needs that property: bitwise-identical columns must get bitwise-identical similarities
wherever they sit. A BLAS may round a column according to where it falls in its blocking
(matrix-vector kernels and edge tiles do), so the property is checked, never assumed: once per
(dtype, layout, C, N, batch of one or more, thread count), a product of random rows with a
matrix whose N columns all hold one random column must give N identical values in every row.
Where it does not, the caller keeps the fixed-order reduction.

The check is exact for the call it stands for: a BLAS's sequence of operations per output
depends on the shapes, strides and threads, never on the values, so a column that rounds like
its neighbours on one random column rounds like them on every input (random values make a
difference in the operation sequence show, except with probability ~0).
"""

from __future__ import annotations

import functools

import torch

# Rows of the left operand. One row takes BLAS's matrix-vector path, which rounds columns by
# position (MKL: about 40% of shapes tried); two rows or more take the matrix-product path.
DOT_ROWS = 2


def _layout(x: torch.Tensor) -> str | None:
    """"nchw" (positions contiguous), "channels_last" (channels contiguous), or None."""
    _, C, N = x.shape
    if x.stride(2) == 1 and x.stride(1) == N:
        return "nchw"
    if x.stride(1) == 1 and x.stride(2) == C:
        return "channels_last"
    return None


def rows_times(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (B, DOT_ROWS, C) times x (B, C, N): (B, DOT_ROWS, N). The product the check is for."""
    return torch.bmm(rows, x)


@functools.lru_cache(maxsize=64)
def _columns_round_alike(dtype: torch.dtype, layout: str, C: int, N: int, batch: int, threads: int) -> bool:
    g = torch.Generator().manual_seed(0)
    column = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    rows = torch.randn(batch, DOT_ROWS, C, generator=g, dtype=torch.float64).to(dtype)
    if layout == "nchw":
        x = column[:, None].expand(batch, C, N).contiguous()
    else:
        x = column.expand(batch, N, C).contiguous().transpose(1, 2)
    out = rows_times(x, rows)
    return bool((out == out[..., :1]).all())


def columns_round_alike(x: torch.Tensor) -> bool:
    """Whether ``rows_times(x, rows)`` gives bitwise-identical results for bitwise-identical
    columns of x (B, C, N), for CPU float32/float64 x whose images are NCHW- or channels_last-
    contiguous (any other x: False). The first call per problem size costs one product over a
    tensor of at most x's size; later ones a cache lookup."""
    layout = _layout(x)
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or layout is None:
        return False
    B, C, N = x.shape
    return _columns_round_alike(x.dtype, layout, C, N, min(B, 2), torch.get_num_threads())
