"""Memory of the PyTorch backend on CPU: allocation sizes, never timings.

A training step allocates nothing of the features' size (B, N, C) besides dX, in either layout;
float16/bfloat16 features are upcast a block of positions at a time, also within one image, so
their peak memory is at most that of the same features in float32. Measured from c10's
allocation events under torch.profiler.
"""

from __future__ import annotations

import pytest
import torch

import brnpa_triton as bt
from bench.providers import Case
from bench.timing import peak_memory_cpu
from brnpa_triton.ops import torch_impl


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_training_step_allocates_only_dx_at_feature_size(layout):
    case = Case(2, 256, 8, 8, 3)
    x = case.make_input()
    if layout == "channels_last":
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(case.B, case.K, case.C)

    def step():
        out = bt.brnpa(x, case.K, backend="torch")
        return torch.autograd.grad((out.vectors * g).sum() + out.maps.square().sum(), x)

    peak = peak_memory_cpu(step)
    # dX, plus a few dozen part-sized tensors ((B, K, N) and (B, K, C)); one more (B, N, C)
    # temporary (x_bytes) would not fit in that allowance.
    part_sized = 4 * case.B * case.K * (case.N + case.C)
    assert case.x_bytes <= peak < case.x_bytes + 16 * part_sized < 2 * case.x_bytes


def _allocations(fn):
    """(peak live bytes, largest single allocation) of what c10 allocates on CPU during fn()."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = sorted(
        (
            e
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
        ),
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
