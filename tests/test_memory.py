"""Allocation structure of the PyTorch path on CPU (sizes, never timings).

float16/bfloat16 features are upcast to float32 a block of positions at a time, also within
one image, so that their peak memory is at most that of the same features in float32.
"""

from __future__ import annotations

import pytest
import torch

import brnpa_triton as bt
from brnpa_triton.ops import torch_impl


def _allocations(fn):
    """(peak live bytes, largest single allocation) of what c10 allocates on CPU during fn()."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")),
        key=lambda e: e.start_ns(),
    )
    live = peak = largest = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
        largest = max(largest, e.nbytes())
    return peak, largest


def _training_step(x, K=3):
    g = torch.randn(x.shape[0], K, x.shape[1], generator=torch.Generator().manual_seed(0), dtype=x.dtype)

    def step():
        out = bt.brnpa(x, K, backend="torch")
        return torch.autograd.grad((out.vectors * g).sum() + out.maps.float().square().sum(), x)

    return step


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_peak_is_at_most_float32s_within_one_image(monkeypatch, dtype, layout):
    # One image (B = 1), blocks far smaller than it, so that the test is small and fast.
    monkeypatch.setattr(torch_impl, "BLOCK_BYTES", 16 << 10)
    monkeypatch.setattr(torch_impl, "ACCUMULATOR_BYTES", 8 << 10)
    monkeypatch.setattr(torch_impl, "DOT_BLOCK_BYTES", 8 << 10)
    base = torch.randn(1, 64, 24, 24, generator=torch.Generator().manual_seed(1)).relu()
    peaks = {}
    for dt in (torch.float32, dtype):
        x = base.to(dt)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        step = _training_step(x)
        step()  # warm-up
        peaks[dt], largest = _allocations(step)
        x_bytes = x.numel() * x.element_size()
        # Nothing larger than dX (x's size, x's dtype) or one float32 block is ever allocated.
        assert largest <= max(x_bytes, 16 << 10), f"{dt}: an allocation of {largest} bytes"
    assert peaks[dtype] <= peaks[torch.float32], peaks
    # dX (float16) and a float32 copy of the image together would already exceed the peak.
    assert peaks[dtype] < base.numel() * (2 + 4), peaks
