"""Shared test helpers: feature maps in every layout, the reference, per-dtype tolerances."""

from __future__ import annotations

import torch

import brnpa_triton as bt
from reference import brnpa_reference

LAYOUTS = ("nchw", "channels_last", "tokens", "strided")

# (rtol, atol) for comparing an output of this dtype with the float64 reference; maps and
# vectors are O(1)/O(1/N), so atol is on that scale.
TOLERANCES = {
    torch.float64: (1e-9, 1e-11),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (3e-2, 1.6e-2),
}


def random_features(B, C, H, W, *, seed, kind="relu", dtype=torch.float64, zero_positions=0, duplicate_columns=0):
    """(B, C, H, W) features: "relu" (non-negative, some exact zeros) or "signed".

    ``duplicate_columns`` positions get a bitwise copy of another position's feature vector
    (earlier or later in the flat order), so that exact ties are part of the input.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    if kind == "relu":
        x = x.relu()
    flat = x.view(B, C, H * W)
    if zero_positions:
        idx = torch.randperm(H * W, generator=g)[:zero_positions]
        flat[:, :, idx] = 0.0
    for _ in range(duplicate_columns if H * W > 1 else 0):
        source, target = torch.randperm(H * W, generator=g)[:2].tolist()
        flat[:, :, target] = flat[:, :, source]
    return x.to(dtype)


def duplicate_groups(features: torch.Tensor) -> torch.Tensor:
    """(B, N) int64: for every position, the lowest position holding a bitwise-identical feature vector."""
    x = features.flatten(2).transpose(1, 2)  # (B, N, C)
    same = (x[:, :, None, :] == x[:, None, :, :]).all(-1)  # (B, N, N)
    return same.int().argmax(-1)  # the first True


def in_layout(features: torch.Tensor, layout: str):
    """``features`` (B, C, H, W) presented in ``layout``: "nchw", "channels_last", "strided" (every
    other column of a NaN-filled buffer) or "tokens" ((B, N, C)). The values are the same; only the
    memory layout (or, for tokens, the shape) changes. :func:`run_layout` runs bt on the result.
    """
    B, C, H, W = features.shape
    if layout == "nchw":
        x = features.contiguous()
    elif layout == "channels_last":
        x = features.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # a non-contiguous slice of a larger buffer
        big = torch.full((B, C, H, 2 * W), float("nan"), dtype=features.dtype)
        big[..., ::2] = features
        x = big[..., ::2]
    elif layout == "tokens":
        x = features.flatten(2).transpose(1, 2).contiguous()  # (B, N, C) tokens, contiguous in C
    else:
        raise ValueError(layout)
    return x


def run_layout(x: torch.Tensor, layout: str, H: int, W: int, num_parts: int, **kw) -> bt.BRNPAOutput:
    """Run bt on a layout from ``in_layout`` and give the outputs BCHW shapes."""
    if layout == "tokens":
        out = bt.brnpa_tokens(x, num_parts, **kw)
        return out._replace(maps=out.maps.unflatten(2, (H, W)), norms=out.norms.unflatten(1, (H, W)))
    return bt.brnpa(x, num_parts, **kw)


def reference(features, num_parts, **kw):
    return bt.BRNPAOutput(*brnpa_reference(features, num_parts, **kw))


def assert_close(actual, expected, dtype, what=""):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
