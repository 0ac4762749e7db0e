"""The split of each image's positions across programs: forced small chunks and tiles (so that
cross-chunk reductions, ties across chunk boundaries and chunks of a single position all run),
the launch plans, the launch count of a call, determinism, seeds outside [0, N) and the range
of finite inputs.

Every launcher allocation is NaN-poisoned (``testing.poisoned_allocations``; the autouse
fixture comes from test_triton_kernels), so an unwritten output or workspace element shows up
as a non-finite result.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from brnpa_triton import testing  # noqa: E402
from brnpa_triton.ops import torch_impl, triton_impl  # noqa: E402
from brnpa_triton.ops.kernels import backward as backward_kernels  # noqa: E402
from brnpa_triton.ops.kernels import forward as forward_kernels  # noqa: E402
from tests.test_triton_kernels import (  # noqa: E402,F401  (poison_allocations: autouse fixture)
    DEVICE,
    INTERPRET,
    no_activity,
    poison_allocations,
    reference,
)

BENCHMARK_SHAPES = [(32, 2048, 196), (16, 2048, 3136), (64, 512, 784)]
LAYOUT_STRIDES = {"nchw": lambda C, N: (C * N, N, 1), "channels_last": lambda C, N: (N * C, 1, C)}
# Chunks of one position (BLOCK_N=1, one tile each), of two tiles of 2, and one chunk (S=1).
CHUNKINGS = [
    dict(BLOCK_C=4, BLOCK_N=1, tiles_per_chunk=1),
    dict(BLOCK_C=8, BLOCK_N=2, tiles_per_chunk=2),
    dict(BLOCK_C=16, BLOCK_N=4, tiles_per_chunk=1000),
]


def grid_of(x, K, config, refine=True):
    plan = triton_impl.forward_plan(*x.shape, K, x.dtype, x.stride(), refine=refine, config=config)
    return plan[0].grid


@pytest.mark.parametrize("config", CHUNKINGS, ids=["one-position-chunks", "two-tile-chunks", "one-chunk"])
@pytest.mark.parametrize("layout", ["nchw", "padded_channels_last"])
def test_forced_chunks_match_the_reference(config, layout):
    """Forward and backward with chunk sums reduced across programs, against float64."""
    values = testing.random_values(2, 5, 7, seed=5) + 0.05
    x = testing.view_in_layout(values, layout, device=DEVICE)
    B, C, N = x.shape
    S = grid_of(x, 3, config)[1]
    assert S == {1: N, 2: 2, 4: 1}[config["BLOCK_N"]]
    out = triton_impl.forward(x, 3, True, config=config)
    testing.assert_greedy_seeds(x, out.indices, rel=1e-12)
    grads = testing.random_grads(x, 3, seed=1)
    vec, maps, norms, dx_ref = reference(x, 3, True, out.indices, grads)
    testing.assert_scaled_close(out.vectors, vec, 1e-12, "vectors")
    testing.assert_scaled_close(out.maps, maps, 1e-12, "maps")
    testing.assert_scaled_close(out.saved_norms, norms, 1e-12, "norms")
    dx = triton_impl.backward(x, *no_activity(grads), out.saved(), True, config=config)
    testing.assert_scaled_close(dx, dx_ref, 1e-11, "dx")


@pytest.mark.parametrize("refine", [True, False])
def test_forced_chunks_with_every_gradient_and_ranking(refine):
    """Activity gradient, missing gradients (None), ranking and given seeds, in many chunks."""
    values = testing.random_values(2, 6, 10, seed=8, kind="signed") + 0.4
    x = testing.view_in_layout(values, "channels_last", device=DEVICE)
    config = CHUNKINGS[1]
    seeds = torch.tensor([[7, 2, 7], [0, 9, 4]], device=DEVICE)
    out = triton_impl.forward(x, 3, refine, seeds, by_activity=True, config=config)
    ref = torch_impl.forward(x, 3, refine, seeds, by_activity=True)
    for name, got, want in zip(out._fields, out, ref, strict=True):
        testing.assert_scaled_close(got, want, 1e-11, name) if got.is_floating_point() else None
    assert torch.equal(out.indices, ref.indices)
    g = torch.Generator().manual_seed(3)
    grad_activity = torch.randn(2, 3, generator=g, dtype=torch.float64).to(DEVICE)
    grad_vectors = torch.randn(2, 3, 6, generator=g, dtype=torch.float64).to(DEVICE)
    for grads in ((None, None, grad_activity, None), (grad_vectors, None, grad_activity, None)):
        dx = triton_impl.backward(x, *grads, out.saved(), refine, config=config)
        dx_ref = torch_impl.backward(x, *grads, ref.saved(), refine)
        testing.assert_scaled_close(dx, dx_ref, 1e-11, "dx")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_across_chunk_boundaries_pick_the_lowest_index(layout, dtype):
    """Duplicated columns in different chunks get bitwise-identical norms and similarities, so
    every exact tie goes to the lowest position, whatever the chunking."""
    values = testing.random_values(1, 5, 12, seed=4)
    values[:, :, 3] = 2 * values.abs().max() + 1.0  # the biggest column: the first seed ...
    values[:, :, 10] = values[:, :, 3]  # ... tied in a later chunk
    values[:, :, 8] = values[:, :, 1]
    values[:, :, 11] = values[:, :, 1]
    x = testing.view_in_layout(values.to(dtype), layout, device=DEVICE)
    for config in (CHUNKINGS[0], None):
        out = triton_impl.forward(x, 4, True, config=config)
        assert out.indices[0, 0].item() == 3
        testing.assert_greedy_seeds(x, out.indices, rel=1e-4)
        for twins in ((3, 10), (1, 8, 11)):
            norms = out.saved_norms[0, list(twins)]
            maps = out.maps[0][:, list(twins)]
            assert torch.all(norms == norms[0]), (config, norms)
            assert torch.all(maps == maps[:, :1]), (config, maps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic(dtype):
    x = testing.view_in_layout(testing.random_values(2, 7, 9, seed=9).to(dtype), "channels_last", device=DEVICE)
    config = CHUNKINGS[1]
    a = triton_impl.forward(x, 3, True, by_activity=True, config=config)
    b = triton_impl.forward(x, 3, True, by_activity=True, config=config)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    grads = no_activity(testing.random_grads(x, 3, seed=9))
    assert torch.equal(triton_impl.backward(x, *grads, a.saved(), True, config=config),
                       triton_impl.backward(x, *grads, b.saved(), True, config=config))


def test_seeds_outside_the_positions_are_never_dereferenced(monkeypatch):
    """The custom op rejects them; the kernels still mask every seed-indexed load and store, so
    given straight to the launchers they read and write nothing outside x and dx (both live in
    NaN-padded buffers here: a stray read would make outputs NaN, a stray write would show)."""
    values = testing.random_values(2, 6, 7, seed=2) + 0.1
    x = testing.view_in_layout(values, "padded", device=DEVICE)
    seeds = torch.tensor([[-3, 2, 7], [100, -1, 6]], device=DEVICE)
    out = triton_impl.forward(x, 3, True, seeds, config=CHUNKINGS[1])
    assert torch.equal(out.indices, seeds)
    for name in ("vectors", "maps", "activity", "inv_sums"):
        assert torch.isfinite(getattr(out, name)).all(), name
    # Parts seeded outside are degenerate (no similarity): uniform maps, the mean vector.
    assert torch.all(out.inv_sums[0, 0] == 0) and torch.all(out.maps[0, 0] == 1 / 7)

    padded = {}

    def dx_in_padding(x_like):
        big = torch.full((x_like.shape[0] + 2, x_like.shape[1] + 2, x_like.shape[2] + 2), float("nan"),
                         dtype=x_like.dtype, device=x_like.device)
        padded["buffer"] = big
        return big[1:-1, 1:-1, 1:-1]

    monkeypatch.setattr(triton_impl, "_empty_like", dx_in_padding)
    grads = no_activity(testing.random_grads(x, 3, seed=4))
    dx = triton_impl.backward(x, *grads, out.saved(), True, config=CHUNKINGS[1])
    assert torch.isfinite(dx).all()
    frame = padded["buffer"].clone()
    frame[1:-1, 1:-1, 1:-1] = float("nan")
    assert torch.isnan(frame).all(), "the backward wrote outside dx"


# ---- launches ------------------------------------------------------------------------------

class _Recorder(TorchDispatchMode):
    """Records the aten ops a call runs outside kernel launches."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


ALLOCATIONS_AND_VIEWS = {"empty", "empty_strided", "empty_like", "slice", "view", "alias", "as_strided", "narrow",
                         "detach", "lift_fresh"}


@pytest.fixture
def launches(monkeypatch):
    """Counts launches per kernel; the recorder (if any) is paused inside them (the interpreter
    copies arguments with torch ops of its own)."""
    counts = {}
    state = {"recorder": None}
    kernels = {
        "forward.norms": forward_kernels.forward_norms_kernel, "forward.part": forward_kernels.forward_part_kernel,
        "forward.final": forward_kernels.forward_final_kernel, "backward.dx": backward_kernels.backward_dx_kernel,
        "backward.seeds": backward_kernels.backward_seeds_kernel,
    }
    for name, kernel in kernels.items():
        original = kernel.run

        def run(*args, _name=name, _original=original, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            recorder = state["recorder"]
            if recorder is not None:
                recorder.paused += 1
            try:
                return _original(*args, **kwargs)
            finally:
                if recorder is not None:
                    recorder.paused -= 1

        monkeypatch.setattr(kernel, "run", run, raising=False)
    return counts, state


@pytest.mark.parametrize("given", [False, True])
def test_one_call_is_only_its_launches_and_allocations(launches, monkeypatch, given):
    """A forward is K + 2 launches, a backward 2; nothing else runs but allocations and views
    (no casts, gathers, sorts or zero fills: missing gradients are simply not read)."""
    counts, state = launches
    monkeypatch.setattr(triton_impl, "_empty", lambda shape, dtype, device: torch.empty(shape, dtype=dtype,
                                                                                         device=device))
    monkeypatch.setattr(triton_impl, "_empty_like", torch.empty_like)
    monkeypatch.setattr(triton_impl, "_workspace", lambda numel, dtype, device: torch.empty(numel, dtype=dtype,
                                                                                             device=device))
    x = testing.view_in_layout(testing.random_values(2, 6, 9, seed=1) + 0.1, "channels_last", device=DEVICE)
    K = 3
    seeds = torch.tensor([[1, 4, 4], [0, 8, 2]], device=DEVICE) if given else None
    grad_vectors, _, _, grad_norms = no_activity(testing.random_grads(x, K, seed=2))
    grad_activity = torch.ones(2, K, dtype=x.dtype, device=DEVICE)
    recorder = _Recorder()
    state["recorder"] = recorder
    with recorder:
        out = triton_impl.forward(x, K, True, seeds, by_activity=True)
        forward_ops = list(recorder.ops)
        dx = triton_impl.backward(x, grad_vectors, None, grad_activity, grad_norms, out.saved(), True)
    backward_ops = recorder.ops[len(forward_ops):]
    assert counts == {"forward.norms": 1, "forward.part": K, "forward.final": 1, "backward.dx": 1,
                      "backward.seeds": 1}, counts
    assert set(forward_ops) <= ALLOCATIONS_AND_VIEWS, forward_ops
    assert set(backward_ops) <= ALLOCATIONS_AND_VIEWS, backward_ops
    ref = torch_impl.forward(x, K, True, seeds, by_activity=True)
    testing.assert_scaled_close(out.vectors, ref.vectors, 1e-12, "vectors")
    dx_ref = torch_impl.backward(x, grad_vectors, None, grad_activity, grad_norms, ref.saved(), True)
    testing.assert_scaled_close(dx, dx_ref, 1e-11, "dx")


# ---- plans ---------------------------------------------------------------------------------

@pytest.mark.parametrize("B,C,N", BENCHMARK_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_benchmark_plans_fill_an_h100(B, C, N, dtype, layout):
    strides = LAYOUT_STRIDES[layout](C, N)
    forward = triton_impl.forward_plan(B, C, N, 3, dtype, strides, sm_count=132)
    backward = triton_impl.backward_plan(B, C, N, 3, dtype, strides, sm_count=132)
    assert [launch.name for launch in forward] == ["forward.norms", "forward.part", "forward.final"]
    assert sum(launch.repeats for launch in forward) == 3 + 2
    assert [launch.name for launch in backward] == ["backward.dx", "backward.seeds"]
    for launch in forward + backward:
        programs = launch.grid[0] * launch.grid[1]
        warps = programs * launch.options["num_warps"]
        # every SM gets a program, and at least two warps' worth of loads in flight
        assert launch.grid[0] == B and programs >= 132 and warps >= 2 * 132, (launch.name, launch.grid, warps)
        assert launch.options["num_warps"] in (1, 4)
    # 128-bit loads are possible: rows start 16-byte aligned and the masks are uniform per vector.
    norms = forward[0].constexprs
    assert norms["ALIGN"] * dtype.itemsize == 16 or (layout == "nchw" and N == 196 and dtype.itemsize == 2)


def test_block_sizes_do_not_depend_on_the_batch():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for strides in (LAYOUT_STRIDES["nchw"](512, 784), LAYOUT_STRIDES["channels_last"](512, 784)):
            plans = [triton_impl.forward_plan(B, 512, 784, 3, dtype, strides, sm_count=132)
                     + triton_impl.backward_plan(B, 512, 784, 3, dtype, strides, sm_count=132) for B in (1, 7, 256)]
            for launches in zip(*plans, strict=True):
                keys = {tuple(sorted((k, str(v)) for k, v in launch.constexprs.items())) for launch in launches}
                assert len(keys) == 1
    # a small batch gets more chunks, a big one fewer (down to the positions' tiles)
    small, big = (triton_impl.forward_plan(B, 512, 784, 3, torch.float32, LAYOUT_STRIDES["nchw"](512, 784),
                                           sm_count=132)[0].grid[1] for B in (1, 256))
    assert small > big >= 1


def test_plan_variants_are_distinct_and_named():
    variants = triton_impl.plan_variants()
    names = [name for name, _ in variants]
    assert len(names) == len(set(names))
    kinds = {launch.name for _, plan in variants for launch in plan}
    assert kinds == {"forward.norms", "forward.part", "forward.final", "backward.dx", "backward.seeds"}
    for _, plan in variants:
        for launch in plan:
            assert set(launch.signature) == set(launch.kernel.arg_names)
            assert all(launch.signature[name] == "constexpr" for name in launch.constexprs)


# ---- range of finite inputs -------------------------------------------------------------

@pytest.mark.parametrize("scale", [1e20, 1e30, 1e-25, 1e-40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_of_huge_and_tiny_features(scale, dtype):
    """Sums of squares that overflow or underflow float32 are recomputed rescaled, so norms match
    float64 whenever they are representable. Huge features also keep finite maps, vectors and
    activities. (Tiny ones: rho = ||x|| + eps rounds to eps, and similarities of order
    ||x||^2 / eps^2 leave float32's range; the norms are still exact.)"""
    values = (testing.random_values(2, 8, 9, seed=6) + 0.2) * scale
    x = testing.view_in_layout(values.to(dtype), "nchw", device=DEVICE)
    if not torch.isfinite(x).all() or not (x != 0).any():
        pytest.skip("not representable in this dtype")
    if INTERPRET and dtype == torch.bfloat16 and (x.abs() < torch.finfo(dtype).tiny).any():
        pytest.skip("the Triton interpreter converts bfloat16 subnormals wrongly (README, 'Development')")
    out = triton_impl.forward(x, 2, True, config=CHUNKINGS[1])
    exact = torch.linalg.vector_norm(x.double(), dim=1)
    # Exact to rounding; a norm below float32's smallest normal is itself subnormal, so its
    # rounding is absolute: half the subnormal spacing.
    torch.testing.assert_close(out.saved_norms.double(), exact, rtol=1e-6, atol=2.0**-150)
    if scale > 1:
        ref = torch_impl.forward(x.double(), 2, True, out.indices)
        testing.assert_scaled_close(out.maps, ref.maps, 1e-5 if dtype == torch.float32 else 3e-2, "maps")
        testing.assert_scaled_close(out.activity, ref.activity, 1e-5 if dtype == torch.float32 else 3e-2, "activity")
        assert torch.isfinite(out.vectors).all()


# Scales at which every similarity of the features below, ~||x||^2 / eps^2, is a normal number of
# the dtype (float32 down to ~1e-22, float64 to ~1e-150): the float64 reference applies there.
TINY_SCALES = {
    torch.float32: [1e-5, 1e-10, 1e-15, 1e-17, 1e-18, 1e-20, 1e-22],
    torch.float64: [1e-50, 1e-100, 1e-110, 1e-120, 1e-140, 1e-150],
}


def _tiny_features(scale, dtype):
    return testing.view_in_layout(((testing.random_values(1, 4, 7, seed=1) + 0.5) * scale).to(dtype), "nchw",
                                  device=DEVICE)


@pytest.mark.parametrize("given", [False, True], ids=["greedy", "given-seeds"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_refined_vectors_of_tiny_features_match_the_reference(dtype, given):
    """sim_kn x_n ~ ||x||^3 / eps^2 underflows long before the vectors do: the weighted sums scale
    each part's similarities by an exact power of two (``kernels.common.sims_scale``), so vectors
    and activity stay as accurate as the maps, on both backends, across chunks (the scale comes
    from the largest norm over all of them), for greedy and given seeds."""
    tol = testing.SCALED_TOLERANCE[dtype]
    seeds = torch.tensor([[3, 0, 6]], device=DEVICE) if given else None
    for scale in TINY_SCALES[dtype]:
        x = _tiny_features(scale, dtype)
        out = triton_impl.forward(x, 3, True, seeds, config=CHUNKINGS[1])
        vec, maps, _, _ = reference(x, 3, True, out.indices)
        activity = torch.linalg.vector_norm(vec, dim=-1)
        for backend, got in (("triton", out), ("torch", torch_impl.forward(x, 3, True, out.indices))):
            what = f"{backend} at scale {scale:g}"
            testing.assert_scaled_close(got.maps, maps, tol, f"{what}: maps")
            testing.assert_scaled_close(got.vectors, vec, tol, f"{what}: vectors")
            testing.assert_scaled_close(got.activity, activity, tol, f"{what}: activity")


@pytest.mark.parametrize("scale", [1e-24, 1e-26, 1e-30])
def test_vectors_of_features_whose_similarities_underflow_float32_follow_their_maps(scale):
    """Below ~1e-22 float32 similarities are subnormal, then zero (a degenerate part: uniform
    map, mean vector), so the float64 reference no longer applies; the vectors are still the
    returned maps' weighted sums of the features, and both backends agree."""
    x = _tiny_features(scale, torch.float32)
    out = triton_impl.forward(x, 3, True, config=CHUNKINGS[1])
    weighted = torch.einsum("bkn,bcn->bkc", out.maps.double(), x.double())
    testing.assert_scaled_close(out.vectors, weighted, testing.SCALED_TOLERANCE[torch.float32], "vectors")
    ref = torch_impl.forward(x, 3, True, out.indices)
    testing.assert_scaled_close(out.vectors, ref.vectors.double(), 1e-5, "vectors against the torch backend")
    testing.assert_scaled_close(out.activity, ref.activity.double(), 1e-5, "activity against the torch backend")


def test_plans_are_cached_and_rebuilt_after_the_tiling_tables_change():
    args = (8, 512, 784, 3, torch.float32, LAYOUT_STRIDES["nchw"](512, 784))
    first = triton_impl.forward_plan(*args, sm_count=132)
    again = triton_impl.forward_plan(*args, sm_count=132)
    assert again == first and again[0] is first[0]  # built once
    assert triton_impl.backward_plan(*args, sm_count=132)[0] is triton_impl.backward_plan(*args, sm_count=132)[0]
    key = (triton_impl.N_CONTIGUOUS, 4)
    table = triton_impl._FORWARD_TILES
    saved = table[key]
    try:
        table[key] = triton_impl.Tiling(16, 16, 1, 16)
        triton_impl.clear_plan_caches()
        edited = triton_impl.forward_plan(*args, sm_count=132)
        assert edited[0].constexprs["BLOCK_C"] == 16 and edited[0].options["num_warps"] == 1
    finally:
        table[key] = saved
        triton_impl.clear_plan_caches()
    assert triton_impl.forward_plan(*args, sm_count=132) == first


@pytest.mark.parametrize("backward", [False, True])
def test_workspace_views_are_disjoint_and_64_byte_aligned(backward):
    sizes = (3, 100, 77, 5, 7) if backward else (3, 100, 77, 5, 7, True)
    layout = (triton_impl.backward_workspace if backward else triton_impl.forward_workspace)(*sizes)
    views = triton_impl._allocate_workspace(backward, sizes, torch.float32, torch.device("cpu"))
    assert set(views) == set(layout)
    spans = {False: [], True: []}
    for name, (shape, is_int) in layout.items():
        view = views[name]
        assert tuple(view.shape) == tuple(shape) and view.is_contiguous()
        assert view.dtype == (torch.int32 if is_int else torch.float32)
        assert view.data_ptr() % 64 == 0
        spans[is_int].append((view.data_ptr(), view.data_ptr() + view.numel() * view.element_size()))
    for intervals in spans.values():
        intervals.sort()
        assert all(end <= start for (_, end), (start, _) in zip(intervals, intervals[1:], strict=False))
