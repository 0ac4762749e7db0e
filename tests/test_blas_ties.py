"""The CPU forward's seed dot products as matrix products (``brnpa_triton.ops.blas_ties``).

The product is used only where a check shows that it rounds every column alike; the tie rule
(bitwise-identical columns get bitwise-identical norms, maps and scores, the lowest position
wins) must hold on both paths, at sizes where the BLAS, not PyTorch's small-matrix loop, runs.
"""

from __future__ import annotations

import pytest
import torch

from brnpa_triton.ops import blas_ties, torch_impl
from brnpa_triton.testing import duplicate_groups, features_in_layout, random_features
from tests.helpers import reference
from tests.test_api_numerics import _assert_identical_where_duplicated

LAYOUTS = ("nchw", "channels_last", "tokens")
# (B, C, H, W): C * N well above PyTorch's small-matrix threshold (400), N with odd tails.
SHAPES = [(2, 96, 13, 17), (3, 257, 7, 9), (1, 64, 28, 28)]


@pytest.fixture(autouse=True)
def fresh_checks():
    """Each test starts and ends with no cached check (tests below fake the product)."""
    blas_ties._columns_round_alike.cache_clear()
    yield
    blas_ties._columns_round_alike.cache_clear()


def _with_ties(B, C, H, W, dtype, seed):
    f = random_features(B, C, H, W, seed=seed, dtype=dtype, duplicate_columns=H * W // 3)
    flat = f.view(B, C, H * W)
    flat[:, :, -1] = flat[:, :, 0]  # the last position (a tile's tail) copies the first
    flat[:, :, -2] = flat[:, :, H * W // 2]
    return f


def _forward(f, layout, K=3):
    x = features_in_layout(f, layout)
    x = x.flatten(2) if layout != "tokens" else x.transpose(1, 2)  # (B, C, N) views
    return x, torch_impl.forward(x, K, True)


def _assert_ties_hold(f, out, what):
    groups = duplicate_groups(f)
    for name in ("norms", "maps"):
        _assert_identical_where_duplicated(getattr(out, name), groups, f"{what}: {name}")
    assert torch.equal(out.indices, groups.gather(1, out.indices)), f"{what}: a seed has an identical lower column"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_hold_on_the_path_the_check_picks(dtype, layout):
    for seed, shape in enumerate(SHAPES):
        f = _with_ties(*shape, dtype, seed)
        x, out = _forward(f, layout)
        _assert_ties_hold(f, out, f"{layout} {shape} (BLAS path: {blas_ties.columns_round_alike(x)})")
        if dtype == torch.float64:
            assert torch.equal(out.indices, reference(f, 3).indices)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="the product is known to round alike with MKL")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mkl_takes_the_blas_path(dtype, layout):
    """With MKL (x86 wheels), every shape here passes the check, so the tie test above ran the
    matrix product, not only the fallback."""
    for shape in SHAPES:
        x, _ = _forward(_with_ties(*shape, dtype, 0), layout)
        assert blas_ties.columns_round_alike(x), f"{layout} {shape}"


def test_a_product_that_rounds_by_position_is_refused_and_ties_still_hold(monkeypatch):
    real = blas_ties.rows_times

    def rounds_the_last_column_apart(x, rows):
        out = real(x, rows)
        out[..., -1] = torch.nextafter(out[..., -1], torch.full_like(out[..., -1], float("inf")))
        return out

    monkeypatch.setattr(blas_ties, "rows_times", rounds_the_last_column_apart)
    f = _with_ties(2, 96, 13, 17, torch.float32, 0)
    x, out = _forward(f, "nchw")
    assert not blas_ties.columns_round_alike(x)
    _assert_ties_hold(f, out, "fallback")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blas_and_fixed_order_paths_agree(monkeypatch, dtype, layout):
    f = random_features(2, 96, 13, 17, seed=3, dtype=dtype)
    _, blas = _forward(f, layout)
    monkeypatch.setattr(torch_impl, "columns_round_alike", lambda x: False)
    _, fixed = _forward(f, layout)
    assert torch.equal(blas.indices, fixed.indices)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for name in ("vectors", "maps", "activity", "norms"):
        torch.testing.assert_close(getattr(blas, name), getattr(fixed, name), **tol, msg=name)


def test_only_dense_cpu_float32_and_float64_images_are_checked():
    x = torch.rand(2, 16, 30)
    assert blas_ties.columns_round_alike(x) in (True, False)
    assert not blas_ties.columns_round_alike(x.half())
    assert not blas_ties.columns_round_alike(x.bfloat16())
    assert not blas_ties.columns_round_alike(torch.rand(2, 16, 60)[:, :, ::2])  # strided positions
    assert not blas_ties.columns_round_alike(torch.rand(2, 32, 30)[:, ::2])  # strided channels
    assert not blas_ties.columns_round_alike(x.to("meta"))
