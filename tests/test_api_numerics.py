"""Exact ties, the range of finite inputs, and tiny features: what the operator guarantees there.

* Bitwise-identical feature columns get bitwise-identical norms, similarities and scores, in
  every layout, so among them the lowest flat position is picked.
* Norms and similarities are computed scaled: every finite input whose per-position norms are
  representable in the accumulation dtype gives finite outputs and gradients.
* Tiny features: norms stay exact, but rho = ||x|| + eps rounds in the accumulation dtype.
"""

from __future__ import annotations

import os

import pytest
import torch

import brnpa_triton as bt
from brnpa_triton.testing import FEATURE_LAYOUTS, duplicate_groups, features_in_layout, random_features, run_in_layout
from tests.helpers import reference

# These cases hand CPU tensors to both backends: backend="triton" runs them under the Triton
# interpreter. With a GPU (kernels compiled) tests/test_triton_chunks.py runs the range cases on CUDA.
ON_INTERPRETER = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="backend='triton' on CPU tensors needs the Triton interpreter; on CUDA the kernels' range "
    "cases run in tests/test_triton_chunks.py",
)
BACKENDS = ("torch", pytest.param("triton", marks=ON_INTERPRETER))
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _assert_identical_where_duplicated(values: torch.Tensor, groups: torch.Tensor, what: str):
    """values (B, ..., N): every position equals (bitwise) the first position of its group."""
    expected = values.gather(-1, groups.view(groups.shape[0], *([1] * (values.dim() - 2)), -1).expand_as(values))
    assert torch.equal(values, expected), f"{what} differ between bitwise-identical columns"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_duplicated_columns_tie_to_the_lowest_position_in_every_layout(dtype, backend):
    for seed, (B, C, H, W) in enumerate([(2, 33, 4, 17), (1, 7, 5, 5), (2, 70, 3, 9), (1, 1, 4, 6)]):
        f = random_features(B, C, H, W, seed=seed, dtype=dtype, duplicate_columns=H * W // 2)
        # Whole rows repeated too: position h*W + w copies w.
        f[:, :, 1:] = f[:, :, :1]
        groups = duplicate_groups(f)
        K = 3
        picks = {}
        for layout in FEATURE_LAYOUTS:
            out = run_in_layout(features_in_layout(f, layout), layout, H, W, K, backend=backend)
            _assert_identical_where_duplicated(out.norms.flatten(1), groups, f"{layout} norms")
            _assert_identical_where_duplicated(out.maps.flatten(2), groups, f"{layout} maps")
            lowest = groups.gather(1, out.indices)
            assert torch.equal(out.indices, lowest), f"{layout}: a seed has an identical column at a lower position"
            picks[layout] = out.indices
        for layout in FEATURE_LAYOUTS:
            assert torch.equal(picks[layout], picks["nchw"]), f"{layout} picks {picks[layout]}, nchw {picks['nchw']}"
        if dtype == torch.float64:
            assert torch.equal(picks["nchw"], reference(f, K).indices)


def test_reference_breaks_exact_ties_by_lowest_position():
    f = torch.rand(1, 33, 1, 17, dtype=torch.float64).expand(1, 33, 4, 17).contiguous()
    out = reference(f, 4)
    assert (out.indices < 17).all()
    norms = out.norms.flatten(1)
    assert torch.equal(norms, norms[:, torch.arange(68) % 17])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("scale", (1e20, 1e30))
def test_large_finite_inputs_give_finite_outputs_and_gradients(dtype, backend, scale):
    f = (torch.rand(2, 8, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * scale).to(dtype)
    expected = reference(f.double(), 2)
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    for layout in FEATURE_LAYOUTS:
        x = features_in_layout(f, layout).requires_grad_()
        out = run_in_layout(x, layout, 3, 3, 2, check_finite=True, backend=backend)
        for name, t in zip(out._fields, out, strict=True):
            assert torch.isfinite(t).all(), f"{layout}: {name} is not finite"
        assert torch.equal(out.indices, expected.indices)
        torch.testing.assert_close(out.maps.double(), expected.maps, rtol=rtol, atol=rtol)
        torch.testing.assert_close(out.norms.double(), expected.norms, rtol=rtol, atol=0)
        torch.testing.assert_close(out.activity.double(), expected.activity, rtol=rtol, atol=0)
        (grad,) = torch.autograd.grad(out.vectors.sum() + out.maps.pow(2).sum() + out.activity.sum(), x)
        assert torch.isfinite(grad).all(), layout


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16, torch.float64))
def test_values_near_the_largest_finite_value(dtype, backend):
    """One dominant channel near the dtype's max: the norms are representable, so is every output."""
    big = torch.finfo(dtype).max * 0.75
    f = torch.rand(1, 6, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    f[:, 0] = big * (0.5 + 0.5 * f[:, 0])
    f[:, 1:] *= big * 1e-3
    x = f.to(dtype)
    out = bt.brnpa(x, 3, check_finite=True, backend=backend)
    for name, t in zip(out._fields, out, strict=True):
        assert torch.isfinite(t).all(), f"{name} is not finite"
    torch.testing.assert_close(out.maps.sum((2, 3)), torch.ones(1, 3, dtype=dtype), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_check_finite_rejects_inputs_whose_norms_overflow(dtype):
    """Every value finite, but ||x_n|| = sqrt(8) * 0.9 * max overflows float32, the accumulation
    dtype. (float16 values cannot get there.)"""
    value = 0.9 * torch.finfo(torch.float32).max
    x = torch.full((1, 8, 2, 2), value).to(dtype)
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match=r"features have positions whose norm overflows float32.*check_finite"):
        bt.brnpa(x, 2, check_finite=True)
    with pytest.raises(ValueError, match=r"tokens have positions whose norm overflows float32"):
        bt.brnpa_tokens(x.flatten(2).transpose(1, 2), 2, check_finite=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_tiny_features_norms_are_exact(dtype, backend):
    """Squares of 1e-30 underflow in float32; the norms are computed scaled, so they stay exact."""
    f = torch.rand(2, 16, 3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1e-30
    expected = torch.linalg.vector_norm(f, dim=1)
    for layout in FEATURE_LAYOUTS:
        out = run_in_layout(features_in_layout(f.to(dtype), layout), layout, 3, 4, 3, backend=backend)
        torch.testing.assert_close(out.norms.double(), expected, rtol=1e-6, atol=0, msg=layout)
        assert all(torch.isfinite(t).all() for t in out), layout
        torch.testing.assert_close(out.maps.sum((2, 3)).double(), torch.ones(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_norms_tie_in_float32_and_are_resolved_in_float64(backend):
    """rho = ||x|| + eps: in float32, norms below ~eps * 2^-24 = 6e-13 leave rho = eps exactly,
    so the positions tie and the lowest wins; float64 still tells them apart."""
    f = torch.zeros(1, 4, 1, 3, dtype=torch.float64)
    f[0, :, 0, 0] = 1e-14  # ||x_0|| = 2e-14
    f[0, :, 0, 2] = 1e-13  # ||x_2|| = 2e-13, the largest
    f[0, 0, 0, 1] = 5e-14
    assert bt.brnpa(f, 1, backend=backend).indices.item() == 2
    out32 = bt.brnpa(f.float(), 1, backend=backend)
    assert out32.indices.item() == 0
    torch.testing.assert_close(out32.norms.double(), torch.linalg.vector_norm(f, dim=1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", (4, 64))
@pytest.mark.parametrize("scale", (1e-20, 1e-25, 1e-30, 1e-38, 1e-42))
def test_tiny_features_give_finite_outputs_and_gradients(scale, channels, backend):
    """float32 similarities of such features are subnormal or 0: a part whose S_k cannot be
    inverted is degenerate (uniform map), never inf or NaN, and so is its gradient."""
    g = torch.Generator().manual_seed(channels)
    x = (torch.rand(2, channels, 3, 3, generator=g) * scale).requires_grad_()
    out = bt.brnpa(x, 3, backend=backend)
    for name, t in zip(out._fields, out, strict=True):
        assert torch.isfinite(t.float()).all(), f"{name} is not finite"
    torch.testing.assert_close(out.maps.sum((2, 3)), torch.ones(2, 3), rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(out.maps.sum() + out.vectors.sum(), x)
    assert torch.isfinite(grad).all()
