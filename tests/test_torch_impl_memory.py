"""Peak memory of the PyTorch backend's training step: besides dX, nothing of the features' size
(B, N, C) is allocated, in either layout. Measured with the benchmark's CPU peak-memory probe
(c10 allocation events under torch.profiler)."""

import pytest
import torch

import brnpa_triton as bt
from bench.providers import Case
from bench.timing import peak_memory_cpu


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
