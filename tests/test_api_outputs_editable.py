"""Every returned tensor can be edited in place (README, "Returned tensors"): no output of the
op is a view of another tensor, so autograd never rejects the edit itself. norms and activity are not
saved for the backward, so editing them leaves the gradient unchanged."""

from __future__ import annotations

import pytest
import torch

import brnpa_triton as bt
from brnpa_triton.ops.registry import brnpa_forward
from brnpa_triton.testing import random_features

FIELDS = ("vectors", "maps", "indices", "activity", "norms")


def _edit(t: torch.Tensor) -> None:
    if t.is_floating_point():
        t.div_(2)
    else:
        t.add_(0)


def _shapes(backend):
    # Tiny for the Triton interpreter; K = 1 too (a single part's outputs are where a
    # transpose or squeeze can come back as a view).
    return [(2, 5, 3, 3, 2), (1, 4, 2, 3, 1)] if backend == "triton" else [(2, 5, 3, 3, 2), (2, 7, 4, 4, 1)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("order", ["selection", "activity"])
@pytest.mark.parametrize("refine", [True, False])
def test_every_output_can_be_edited_in_place(backend, dtype, order, refine):
    if backend == "triton" and not refine:
        pytest.skip("the interpreter is slow; the op-level test below covers refine=False")
    for B, C, H, W, K in _shapes(backend)[: 1 if backend == "triton" else None]:
        f = random_features(B, C, H, W, seed=7, dtype=dtype)
        for field in FIELDS:
            x = f.clone().requires_grad_()
            out = bt.brnpa(x, K, refine=refine, order=order, backend=backend)
            loss = (out.vectors * torch.arange(C, dtype=dtype)).sum() + out.maps.square().sum()
            _edit(getattr(out, field))  # raised "... is a view and is being modified inplace" for activity
            if field in ("activity", "norms"):  # not saved for the backward: the gradient is unchanged
                (grad,) = torch.autograd.grad(loss, x)
                y = f.clone().requires_grad_()
                again = bt.brnpa(y, K, refine=refine, order=order, backend=backend)
                (expected,) = torch.autograd.grad(
                    (again.vectors * torch.arange(C, dtype=dtype)).sum() + again.maps.square().sum(), y
                )
                torch.testing.assert_close(grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("by_activity", [False, True])
@pytest.mark.parametrize("refine", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_no_op_output_is_a_view(backend, dtype, by_activity, refine, layout):
    for B, C, H, W, K in _shapes(backend):
        x = random_features(B, C, H, W, seed=8, dtype=dtype).flatten(2)
        if layout == "channels_last":
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        out = brnpa_forward(x, K, refine, torch.empty(0, dtype=torch.int64), by_activity, backend)
        for i, t in enumerate(out):
            assert not t._is_view(), f"output {i} is a view (K={K})"
