"""The torch backend's device plan (what runs on CUDA), exercised on CPU tensors.

``torch_impl.FORCED_PLAN = DEVICE_PLAN`` makes CPU tensors take the code CUDA tensors take: a
few large blocks per pass, branch-free scaled norms. Checked here: the same guarantees as the
CPU plan (float64 reference, exact ties in every layout, the range of finite inputs,
degenerate inputs), no operator that waits for the host, and a launch count that does not
grow with the input. The CUDA-graph capture itself needs a GPU (skipped without one).
"""

from __future__ import annotations

import pytest
import torch

import brnpa_triton as bt
from bench.launches import HOST_SYNC, OpRecorder
from brnpa_triton.ops import torch_impl
from brnpa_triton.testing import FEATURE_LAYOUTS, features_in_layout, random_features
from tests import test_api_degenerate as degenerate
from tests import test_api_numerics as numerics
from tests import test_torch_impl as cpu_plan_tests


@pytest.fixture
def device_plan(monkeypatch):
    monkeypatch.setattr(torch_impl, "FORCED_PLAN", torch_impl.DEVICE_PLAN)


def test_the_plan_follows_the_device(monkeypatch):
    assert torch_impl.plan_for(torch.empty(1)) == torch_impl.CPU_PLAN
    assert torch_impl.plan_for(torch.empty(1, device="meta")) == torch_impl.DEVICE_PLAN
    monkeypatch.setattr(torch_impl, "FORCED_PLAN", torch_impl.DEVICE_PLAN)
    assert torch_impl.plan_for(torch.empty(1)) == torch_impl.DEVICE_PLAN


# ---- the float64 reference, values and gradients (the CPU plan's property tests, rerun) ----


def test_forward_matches_reference_float64(device_plan):
    cpu_plan_tests.test_forward_matches_reference_float64()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_low_precision_matches_reference(device_plan, dtype):
    cpu_plan_tests.test_forward_low_precision_matches_reference(dtype)


def test_gradients_match_reference_autograd(device_plan):
    cpu_plan_tests.test_gradients_match_reference_autograd()


def test_random_seeds_and_activity_order_match_reference(device_plan):
    cpu_plan_tests.test_random_seeds_match_reference_with_same_noise()
    cpu_plan_tests.test_activity_order_matches_reference()


# ---- exact ties, range, degenerate inputs ----


@pytest.mark.parametrize("dtype", numerics.DTYPES)
def test_duplicated_columns_tie_to_the_lowest_position_in_every_layout(device_plan, dtype):
    numerics.test_duplicated_columns_tie_to_the_lowest_position_in_every_layout(dtype, "torch")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_duplicated_columns_get_identical_norms_at_every_scale(device_plan, dtype):
    """The power-of-two scale of a column depends on its values only: duplicates of tiny,
    ordinary and huge columns keep identical norms and scores."""
    top = torch.finfo(dtype).max
    for scale in (torch.finfo(dtype).tiny, 1.0, top / 64):
        f = random_features(2, 40, 3, 5, seed=3, dtype=torch.float64, duplicate_columns=7)
        f = (f / f.abs().max() * scale).to(dtype)
        for layout in FEATURE_LAYOUTS:
            x = features_in_layout(f, layout)
            out = bt.brnpa_tokens(x, 3, backend="torch") if layout == "tokens" else bt.brnpa(x, 3, backend="torch")
            norms = out.norms.flatten(1)
            first = {}
            columns = f.flatten(2).transpose(1, 2)
            for b in range(f.shape[0]):
                for n in range(columns.shape[1]):
                    key = (b, columns[b, n].double().numpy().tobytes())
                    first.setdefault(key, n)
                    assert torch.equal(norms[b, n], norms[b, first[key]]), (layout, scale, b, n)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("scale", (1e20, 1e30))
def test_large_finite_inputs_give_finite_outputs_and_gradients(device_plan, dtype, scale):
    numerics.test_large_finite_inputs_give_finite_outputs_and_gradients(dtype, "torch", scale)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16, torch.float64))
def test_values_near_the_largest_finite_value(device_plan, dtype):
    numerics.test_values_near_the_largest_finite_value(dtype, "torch")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_tiny_features_norms_are_exact(device_plan, dtype):
    numerics.test_tiny_features_norms_are_exact(dtype, "torch")
    numerics.test_tiny_norms_tie_in_float32_and_are_resolved_in_float64("torch")


@pytest.mark.parametrize("channels", (4, 64))
@pytest.mark.parametrize("scale", (1e-20, 1e-38, 1e-42))
def test_tiny_features_give_finite_outputs_and_gradients(device_plan, scale, channels):
    numerics.test_tiny_features_give_finite_outputs_and_gradients(scale, channels, "torch")


def test_norm_overflow_gives_inf_and_non_finite_input_stays_non_finite(device_plan):
    x = torch.rand(1, 8, 2, 3, generator=torch.Generator().manual_seed(4))
    x[0, :, 0, 0] = 0.9 * torch.finfo(torch.float32).max  # finite values, ||x_0|| overflows float32
    x[0, 0, 1, 1] = float("inf")
    x[0, 0, 1, 2] = float("nan")
    norms = bt.brnpa(x, 2, backend="torch").norms
    assert norms[0, 0, 0] == float("inf") and norms[0, 1, 1] == float("inf") and norms[0, 1, 2].isnan()
    expected = torch.linalg.vector_norm(x.double(), dim=1)
    torch.testing.assert_close(norms[0, :, 1:2].double(), expected[0, :, 1:2], rtol=1e-6, atol=0)


def test_degenerate_inputs(device_plan):
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        degenerate.test_all_zero_features_give_uniform_maps_zero_vectors(dtype)
    degenerate.test_zero_vectors_among_non_zero_ones_have_finite_gradients()
    degenerate.test_ties_choose_the_lowest_index()
    degenerate.test_cancelling_similarities_give_a_uniform_map()
    degenerate.test_float16_features_with_norms_beyond_float16_range()


# ---- no host synchronisation, and a launch count independent of the input's size ----


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x (B, C, N) as the backend gets it from each API layout."""
    if layout == "channels_last":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "strided":
        return torch.cat([x, x], 2)[:, :, ::2]
    return x


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("refine", [True, False])
@pytest.mark.parametrize("by_activity", [False, True])
def test_device_plan_never_waits_for_the_host(layout, dtype, refine, by_activity):
    """Forward and backward with every output's gradient, on the device plan, dispatch no
    operator that reads a value back to the host (nonzero, item, ...): a CUDA graph can
    capture them. Tiny, zero, huge and non-finite columns included (what the CPU plan finds
    with nonzero)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 6, 10, generator=g, dtype=torch.float64)
    x[0, :, 1] = 0.0
    x[0, :, 2] = 1e-30
    x[1, :, 3] = 0.9 * torch.finfo(torch.float32).max
    x = _layout(x.to(dtype), layout)
    with OpRecorder() as ops:
        out = torch_impl.forward(x, 3, refine, None, by_activity, plan=torch_impl.DEVICE_PLAN)
        outputs = (out.vectors, out.maps, out.activity, out.norms)
        grads = [torch.randn(t.shape, generator=g).to(t.dtype) for t in outputs]
        dx = torch_impl.backward(x, *grads, out.saved(), refine, plan=torch_impl.DEVICE_PLAN)
    assert dx.shape == x.shape
    assert not ops.host_syncs(), f"the device plan waits for the host: {ops.host_syncs()}"
    # The CPU plan does read back (its rescue of out-of-range norms): the recorder sees it.
    with OpRecorder() as cpu_ops:
        torch_impl.forward(x, 3, refine, None, by_activity, plan=torch_impl.CPU_PLAN)
    assert set(cpu_ops.host_syncs()) & HOST_SYNC


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_device_plan_launches_do_not_grow_with_the_input(layout, dtype):
    """On the device plan a pass over X is a fixed handful of blocks, whatever X's size (on
    meta tensors: no data), where the CPU plan's cache-sized blocks grow with X."""
    def launches(B, C, N, plan, device="meta"):
        x = _layout(torch.rand(B, C, N, device=device).to(dtype), layout)
        with OpRecorder() as fwd:
            out = torch_impl.forward(x, 3, True, plan=plan)
        with OpRecorder() as bwd:
            torch_impl.backward(x, torch.ones_like(out.vectors), None, None, None, out.saved(), True, plan=plan)
        return sum(fwd.launches().values()), sum(bwd.launches().values())

    small, large = launches(2, 64, 49, torch_impl.DEVICE_PLAN), launches(16, 2048, 3136, torch_impl.DEVICE_PLAN)
    assert small == large
    forward, backward = large
    assert forward <= 130 and backward <= 130, large  # float16: 4 upcast blocks per pass
    # The CPU plan needs data (its rescue of out-of-range norms reads them): a medium size.
    cpu_small, _ = launches(2, 64, 49, torch_impl.CPU_PLAN, device="cpu")
    cpu_large, _ = launches(8, 1024, 1024, torch_impl.CPU_PLAN, device="cpu")
    assert cpu_large > cpu_small


# ---- a CUDA graph captures forward and backward (GPU only) ----


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA-graph capture)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cuda_graph_captures_forward_and_backward(dtype, layout):
    x = torch.randn(4, 256, 14, 14, device="cuda", dtype=dtype).relu_()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(4, 3, 256, device="cuda", dtype=dtype)

    def step():
        out = bt.brnpa(x, 3, backend="torch")
        loss = (out.vectors * weight).sum() + out.maps.square().sum() + out.activity.sum() + out.norms.sum()
        (grad,) = torch.autograd.grad(loss, x)
        return out.vectors, out.maps, out.indices, out.activity, out.norms, grad

    expected = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        x.mul_(1.5)  # new values in the captured input: the replay must follow them
    expected = step()
    graph.replay()
    torch.cuda.synchronize()
    for name, a, b in zip(("vectors", "maps", "indices", "activity", "norms", "grad"), captured, expected, strict=True):
        torch.testing.assert_close(a, b, msg=name)
