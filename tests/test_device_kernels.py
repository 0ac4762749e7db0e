"""The fused kernels case by case, as a GPU check runs them: ``triton_impl.forward/backward``
against the float64 PyTorch path on the same seeds, with NaN-poisoned outputs and workspaces
(an unwritten element fails), dX in x's strides, and two runs bitwise equal.

The kernels run compiled on CUDA when there is a GPU, under the Triton interpreter on CPU
otherwise (tests/conftest.py decides). Two tiny cases run either way; the rest (every dtype and
layout, realistic shapes up to C = 2048 and 28 x 28 maps, K = 1..9), which the interpreter is far
too slow for, only on CUDA.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from brnpa_triton import testing  # noqa: E402
from brnpa_triton.ops import torch_impl, triton_impl  # noqa: E402
from tests.devices import HAS_CUDA  # noqa: E402
from tests.test_triton_kernels import DEVICE  # noqa: E402  (cuda, or cpu under the interpreter)

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
# The (B, C, N) view of each layout: tokens (B, N, C) are viewed with channels_last's strides.
VIEW_OF = {"nchw": "nchw", "channels_last": "channels_last", "tokens": "channels_last"}


def case(shape, dtype, layout, refine=True, given=False, ranked=False):
    B, C, H, W, K = shape
    name = f"{B}x{C}x{H}x{W}-K{K}-{str(dtype).removeprefix('torch.')}-{layout}" + (
        "-no-refine" * (not refine) + "-given" * given + "-ranked" * ranked
    )
    return pytest.param(shape, dtype, layout, refine, given, ranked, id=name)


# Under the interpreter (seconds per case on a busy 2-core CPU): the paths test_triton_kernels'
# property tests do not reach (K > 6, a strided view ranked by activity), so that this module's
# own checks also run without a GPU.
INTERPRETED = [
    case((2, 6, 2, 3, 3), F32, "strided", ranked=True),
    case((1, 4, 2, 5, 9), F32, "channels_last", given=True, ranked=True),
]
# On CUDA, besides: every dtype and layout at a tiny shape, and one position.
TINY = [case((2, 20, 3, 5, 3), dtype, layout) for dtype, layout in
        ((F32, "nchw"), (BF16, "channels_last"), (F16, "tokens"), (F64, "nchw"))] + [
    case((2, 20, 3, 5, 3), F32, "channels_last", refine=False, given=True),
    case((1, 1, 1, 1, 1), F32, "nchw"),
    case((2, 20, 3, 5, 3), F32, "strided", ranked=True),
]
REALISTIC = []
for _dtype in (F32, BF16, F16):
    for _layout in ("nchw", "channels_last", "tokens"):
        REALISTIC += [case((3, 40, 5, 7, 3), _dtype, _layout, refine=r) for r in (True, False)]
        REALISTIC.append(case((4, 256, 14, 14, 3), _dtype, _layout))
    REALISTIC.append(case((2, 96, 9, 9, 6), _dtype, "nchw"))  # K > 4: two groups of parts
    REALISTIC.append(case((3, 40, 5, 7, 3), _dtype, "channels_last", given=True))
REALISTIC += [
    case((2, 2048, 28, 28, 3), F32, "channels_last"),
    case((2, 2048, 28, 28, 3), F32, "nchw", refine=False, given=True),
    case((2, 7, 3, 3, 9), F64, "tokens"),
    case((4, 256, 14, 14, 3), F64, "nchw"),
]
for _dtype in (F32, BF16):
    REALISTIC += [
        case((3, 40, 5, 7, 3), _dtype, "strided"),
        case((3, 40, 5, 7, 3), _dtype, "nchw", ranked=True),
        case((3, 40, 5, 7, 3), _dtype, "channels_last", refine=False, given=True, ranked=True),
    ]
REALISTIC += [case((2, 64, 7, 7, k), F32, "nchw") for k in range(1, 10)]


def make_x(B, C, H, W, dtype, layout, seed=0):
    """Non-negative (B, C, H * W) features in ``layout``. "strided": every other position of a
    NaN-filled wider buffer, so that neither C nor N is contiguous."""
    values = testing.random_values(B, C, H * W, seed=seed).to(dtype)
    if layout == "strided":
        wide = torch.full((B, H * W, 2 * C), float("nan"), dtype=dtype, device=DEVICE)
        view = wide[:, :, ::2].transpose(1, 2)
        view.copy_(values.to(DEVICE))
        return view
    return testing.view_in_layout(values, VIEW_OF[layout], device=DEVICE)


def check_case(shape, dtype, layout, refine, given, ranked, seed=0):
    B, C, H, W, K = shape
    N = H * W
    x = make_x(B, C, H, W, dtype, layout, seed)
    seeds = None
    if given:
        seeds = torch.randint(0, N, (B, K), generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    with testing.poisoned_allocations(triton_impl):
        picked = triton_impl.forward(x, K, refine, seeds).indices  # in selection order
        out = triton_impl.forward(x, K, refine, seeds, ranked)
        if given:
            assert torch.equal(picked, seeds)
        else:
            testing.assert_greedy_seeds(x, picked, 1e-12 if dtype == F64 else 1e-4)
        ref = torch_impl.forward(x.double(), K, refine, picked, by_activity=ranked)
        assert torch.equal(out.indices, ref.indices)
        cond = testing.conditioning(ref.maps)
        tol = testing.SCALED_TOLERANCE[dtype] * cond
        for name in ("vectors", "maps", "saved_norms", "inv_sums") + (("activity",) if ranked else ()):
            testing.assert_scaled_close(getattr(out, name), getattr(ref, name), tol, name)

        g_vectors, g_maps, g_norms = testing.random_grads(x, K, seed=seed)
        g_activity = None
        if ranked:
            g_activity = torch.randn(B, K, generator=torch.Generator().manual_seed(seed + 3)).to(x)
        dx = triton_impl.backward(x, g_vectors, g_maps, g_activity, g_norms, out.saved(), refine)
        dx_ref = torch_impl.backward(
            x.double(), g_vectors.double(), g_maps.double(), None if g_activity is None else g_activity.double(),
            g_norms.double(), ref.saved(), refine,
        )
        # float16: gradients at zero vectors (rho_n = eps) can pass 65504; they overflow to inf there.
        overflow = dx_ref.abs() > torch.finfo(dtype).max
        assert torch.isinf(dx[overflow]).all()
        testing.assert_scaled_close(dx[~overflow], dx_ref[~overflow], tol * cond, "dx")
        if layout == "strided":  # behind a strided view dX is dense, in x's dimension order
            span = sum((n - 1) * st for n, st in zip(dx.shape, dx.stride(), strict=True)) + 1
            assert dx.stride() == torch.empty_like(x).stride() and span == dx.numel()
        else:
            assert dx.stride() == x.stride()

        again = triton_impl.forward(x, K, refine, seeds, ranked)
        dx_again = triton_impl.backward(x, g_vectors, g_maps, g_activity, g_norms, again.saved(), refine)
    for a, b in zip(out, again, strict=True):
        assert torch.equal(a, b), "two forward runs differ"
    assert torch.equal(dx, dx_again), "two backward runs differ"


CASE = ("shape", "dtype", "layout", "refine", "given", "ranked")


@pytest.mark.parametrize(CASE, INTERPRETED)
def test_case_on_every_device(shape, dtype, layout, refine, given, ranked):
    check_case(shape, dtype, layout, refine, given, ranked)


@pytest.mark.skipif(not HAS_CUDA, reason="compiled kernels on CUDA (too slow for the interpreter); no CUDA device here")
@pytest.mark.parametrize(CASE, TINY + REALISTIC)
def test_case_on_cuda(shape, dtype, layout, refine, given, ranked):
    check_case(shape, dtype, layout, refine, given, ranked)
