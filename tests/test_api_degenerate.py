"""Degenerate but valid inputs: finite, documented results (README, "Semantics")."""

from __future__ import annotations

import pytest
import torch

import brnpa_triton as bt
from brnpa_triton.ops import common as constants
from brnpa_triton.testing import assert_close, random_features
from reference import DEGENERATE_SUM_RATIO, EPS, brnpa_reference
from tests.helpers import reference


def _grad(f, K, **kw):
    x = f.clone().requires_grad_()
    out = bt.brnpa(x, K, **kw)
    (g,) = torch.autograd.grad(out.vectors.sum() + (out.maps**2).sum() + out.norms.sum(), x)
    return out, g


def test_library_and_reference_share_constants():
    assert constants.EPS == EPS and constants.DEGENERATE_SUM_RATIO == DEGENERATE_SUM_RATIO


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_all_zero_features_give_uniform_maps_zero_vectors(dtype):
    f = torch.zeros(2, 3, 4, 5, dtype=dtype)
    out, g = _grad(f, 3)
    assert torch.equal(out.maps, torch.full_like(out.maps, 1 / 20))
    assert torch.equal(out.vectors, torch.zeros_like(out.vectors))
    assert torch.equal(out.indices, torch.zeros_like(out.indices))  # lowest index on ties, repeated
    assert torch.equal(out.activity, torch.zeros_like(out.activity))
    # d(mean of x)/dx = 1/N per position for the vectors; the uniform maps and the norms at 0 add nothing
    torch.testing.assert_close(g, torch.full_like(g, 3 / 20), rtol=1e-2, atol=0)


def test_zero_vectors_among_non_zero_ones_have_finite_gradients():
    f = random_features(2, 4, 4, 4, seed=5, zero_positions=5)
    out, g = _grad(f, 3)
    assert torch.isfinite(g).all()
    x = f.clone().requires_grad_()
    ref = reference(x, 3)
    (expected,) = torch.autograd.grad(ref.vectors.sum() + (ref.maps**2).sum() + ref.norms.sum(), x)
    torch.testing.assert_close(g, expected, rtol=1e-7, atol=1e-9)


def test_ties_choose_the_lowest_index():
    f = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    f[0, :, 1, 1] = torch.tensor([1.0, 2.0])
    f[0, :, 0, 2] = torch.tensor([1.0, 2.0])  # same vector, lower flat index (2 < 4)
    f[0, :, 2, 0] = torch.tensor([2.0, -1.0])
    out = bt.brnpa(f, 2)
    assert out.indices[0, 0] == 2
    assert torch.equal(out.indices, reference(f, 2).indices)


def test_num_parts_equal_to_positions():
    f = random_features(2, 3, 2, 3, seed=6)
    out, g = _grad(f, 6)
    expected = reference(f, 6)
    assert torch.equal(out.indices, expected.indices)
    assert_close(out.maps, expected.maps, torch.float64, "maps")
    assert torch.isfinite(g).all()


def test_single_position():
    f = random_features(3, 5, 1, 1, seed=7, kind="signed")
    out, g = _grad(f, 1)
    assert torch.equal(out.maps, torch.ones_like(out.maps))
    torch.testing.assert_close(out.vectors[:, 0], f[:, :, 0, 0])
    assert torch.equal(out.indices, torch.zeros_like(out.indices))
    assert torch.isfinite(g).all()


def test_single_channel():
    f = random_features(2, 1, 4, 4, seed=8, kind="signed")
    out, g = _grad(f, 3)
    expected = reference(f, 3)
    assert torch.equal(out.indices, expected.indices)
    assert_close(out.vectors, expected.vectors, torch.float64, "vectors")
    assert torch.isfinite(g).all()


def test_cancelling_similarities_give_a_uniform_map():
    """Two opposite vectors: S_0 = sim(x0, x0) + sim(x1, x0) = 0 exactly, a degenerate part."""
    f = torch.tensor([[1.0, -1.0], [2.0, -2.0]], dtype=torch.float64).reshape(1, 2, 1, 2)
    out, g = _grad(f, 1)
    assert torch.equal(out.maps, torch.full_like(out.maps, 0.5))
    assert torch.equal(out.vectors, torch.zeros_like(out.vectors))
    assert torch.isfinite(g).all()
    ref = brnpa_reference(f, 1)
    assert torch.equal(ref[1], out.maps)


def test_negative_features_stay_finite_and_normalised():
    f = random_features(4, 6, 5, 5, seed=9, kind="signed")
    out, g = _grad(f, 4)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(out.maps.sum((2, 3)), torch.ones(4, 4, dtype=torch.float64))
    # |S_k| > DEGENERATE_SUM_RATIO * sum|sim| bounds every map value by 1 / DEGENERATE_SUM_RATIO.
    assert out.maps.abs().max() <= 1 / DEGENERATE_SUM_RATIO


def test_non_finite_input_is_rejected_only_when_asked():
    f = random_features(1, 2, 3, 3, seed=10)
    f[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="features must be finite"):
        bt.brnpa(f, 2, check_finite=True)
    bt.brnpa(f, 2)  # unchecked: no error, no device sync


def test_float16_gradients_overflow_to_inf_like_pytorch():
    """At an all-zero position rho = eps, so d sim / d x is ~1e5 times the seed direction: beyond
    float16's range. Like PyTorch's own gradients, it overflows to inf (a gradient scaler then
    skips the step); the float32 gradient is finite and agrees wherever float16 can hold it."""
    f = random_features(1, 3, 3, 3, seed=15, zero_positions=2)
    weights = 30 * torch.arange(9.0).view(1, 1, 3, 3)
    grads = {}
    for dtype in (torch.float16, torch.float32):
        x = f.to(dtype).requires_grad_()
        (grads[dtype],) = torch.autograd.grad((bt.brnpa(x, 2).maps * weights.to(dtype)).sum(), x)
    g16, g32 = grads[torch.float16].float(), grads[torch.float32]
    assert torch.isfinite(g32).all()
    too_big = g32.abs() > 65504
    assert too_big.any() and torch.isinf(g16[too_big]).all()
    assert not torch.isnan(g16).any()
    torch.testing.assert_close(g16[~too_big], g32[~too_big], rtol=2e-2, atol=2e-2 * g32[~too_big].abs().max().item())


def test_float16_features_with_norms_beyond_float16_range():
    """||x|| of large float16 features exceeds 65504: the public norms and activity saturate
    (no inf), and the backward works from the float32 norms, so gradients match float32's."""
    g = torch.Generator().manual_seed(16)
    f = (torch.rand(1, 64, 3, 3, generator=g) * 1000 + 9000).half()
    out = bt.brnpa(f, 2)
    assert torch.isfinite(out.norms).all() and torch.isfinite(out.activity).all()
    assert torch.equal(out.norms, torch.full_like(out.norms, 65504.0))
    # Map gradients here are ~1/||x|| ~ 1e-8 per unit: scale them into float16's normal range.
    weights = 3e4 * torch.rand(1, 2, 3, 3, generator=g)
    grads = []
    for dtype in (torch.float16, torch.float32):
        x = f.to(dtype).requires_grad_()
        (grad,) = torch.autograd.grad((bt.brnpa(x, 2).maps.float() * weights).sum(), x)
        grads.append(grad.float())
    assert grads[1].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-2, atol=2e-2 * grads[1].abs().max().item())
