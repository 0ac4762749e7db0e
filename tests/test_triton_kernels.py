"""The fused Triton kernels (``brnpa_triton.ops.triton_impl``) against the float64 reference.

On CPU the kernels run under the Triton interpreter (the conftest sets TRITON_INTERPRET=1), so
shapes stay tiny. With TRITON_INTERPRET=0 and a GPU (bash scripts/gpu_check.sh) the same tests run
the compiled kernels on CUDA.

Every launcher allocation (outputs, dX and the workspace) is poisoned with NaN (indices with
-7) by an autouse fixture (``testing.poisoned_allocations``), and the inputs live inside
NaN-padded buffers in the "padded" layouts (``testing.view_in_layout``): a result is finite
only if every element was written and nothing outside the input, nor any unwritten
workspace, was read.

Greedy selection is an argmax over scores that can nearly tie (a fp32 kernel need not pick
the fp64 reference's winner then), so values are compared with the reference run on the
kernel's own seeds, and the seeds are checked separately to be the greedy argmax up to
rounding (exact ties: lowest index).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import brnpa_triton  # noqa: E402
from brnpa_triton import testing  # noqa: E402
from brnpa_triton.ops import torch_impl, triton_impl  # noqa: E402
from brnpa_triton.ops.common import accumulation_dtype  # noqa: E402
from reference.brnpa import brnpa_reference  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if (torch.cuda.is_available() and not INTERPRET) else "cpu"
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

SMALL_FWD = {"BLOCK_C": 8, "BLOCK_N": 4, "tiles_per_chunk": 2}
# More examples for a one-off soak run: BRNPA_KERNEL_EXAMPLES=200 (CI keeps 20, derandomized).
EXAMPLES = int(os.environ.get("BRNPA_KERNEL_EXAMPLES", "20"))
SMALL_BWD = {"BLOCK_C": 8, "BLOCK_N": 4, "tiles_per_chunk": 1}


# ---- poisoning and the oracle ----------------------------------------------------------------

@pytest.fixture(autouse=True)
def poison_allocations():
    with testing.poisoned_allocations(triton_impl):
        yield


def one_hot_noise(indices: torch.Tensor, N: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(indices.cpu(), N).to(torch.float64)


def reference(x: torch.Tensor, K: int, refine: bool, seeds: torch.Tensor, grads=None):
    """float64 reference on x's values with the given seeds; with grads=(gV, gA, gN), also dx."""
    B, C, N = x.shape
    feats = x.detach().cpu().double().reshape(B, C, N, 1).requires_grad_(grads is not None)
    vec, maps, idx, _, norms = brnpa_reference(feats, K, refine, noise=one_hot_noise(seeds, N))
    assert torch.equal(idx, seeds.cpu())
    maps, norms = maps.reshape(B, K, N), norms.reshape(B, N)
    dx = None
    if grads is not None:
        gv, ga, gn = (g.detach().cpu().double() for g in grads)
        loss = (gv * vec).sum() + (ga * maps).sum() + (gn * norms).sum()
        (dx,) = torch.autograd.grad(loss, feats)
        dx = dx.reshape(B, C, N)
    return vec.detach(), maps.detach(), norms.detach(), dx


# ---- the problems --------------------------------------------------------------------------

@st.composite
def problems(draw):
    N = draw(st.integers(1, 30))
    K = N if (N <= 6 and draw(st.booleans())) else draw(st.integers(1, min(N, 5)))
    return dict(
        B=draw(st.integers(1, 2)),
        C=draw(st.one_of(st.integers(1, 24), st.sampled_from([1, 16, 17, 33]))),
        N=N,
        K=K,
        layout=draw(st.sampled_from(testing.VIEW_LAYOUTS)),
        dtype=draw(st.sampled_from(testing.DTYPES)),
        refine=draw(st.booleans()),
        given_seeds=draw(st.booleans()),
        kind=draw(st.sampled_from(["relu", "relu", "signed"])),
        small_blocks=draw(st.booleans()),
        duplicates=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def setup_problem(p):
    """The input x and the seeds to force (or None); signed data is made well-conditioned."""
    B, C, N, K = p["B"], p["C"], p["N"], p["K"]
    values = testing.random_values(B, C, N, seed=p["seed"], kind=p["kind"])
    if p.get("duplicates") and N >= 3:
        # bitwise-identical columns in different tiles and chunks: exact ties, lowest index wins
        values[:, :, N - 1] = values[:, :, 0]
        values[:, :, N // 2] = values[:, :, 1]
    seeds = None
    if p["given_seeds"]:
        g = torch.Generator().manual_seed(p["seed"] + 1)
        seeds = torch.randint(0, N, (B, K), generator=g)
    if p["kind"] == "signed":
        # Shift until no part cancels badly (cond <= 30): keeps tolerances meaningful.
        for _ in range(40):
            maps = torch_impl.forward(values.to(p["dtype"]).double(), K, True, seeds).maps
            if testing.conditioning(maps) <= 30:
                break
            values = values + 0.25
    x = testing.view_in_layout(values.to(p["dtype"]), p["layout"], device=DEVICE)
    return x, (None if seeds is None else seeds.to(DEVICE))


def forward_and_check(p):
    x, seeds = setup_problem(p)
    K, dtype = p["K"], p["dtype"]
    cfg = SMALL_FWD if p["small_blocks"] else None
    out = triton_impl.forward(x, K, p["refine"], seeds, config=cfg)
    B, C, N = x.shape
    assert out.vectors.shape == (B, K, C) and out.vectors.dtype == dtype
    assert out.maps.shape == (B, K, N) and out.maps.dtype == dtype
    assert out.indices.shape == (B, K) and out.indices.dtype == torch.int64
    # Norms stay in the compute dtype: the backward rebuilds rho from them.
    assert out.saved_norms.shape == (B, N) and out.saved_norms.dtype == accumulation_dtype(dtype)
    assert out.inv_sums.shape == (B, K) and out.inv_sums.dtype == accumulation_dtype(dtype)
    assert bool(((out.indices >= 0) & (out.indices < N)).all()), out.indices
    if seeds is not None:
        assert torch.equal(out.indices, seeds)
    else:
        testing.assert_greedy_seeds(x, out.indices, rel=1e-12 if dtype == torch.float64 else 1e-4)

    vec, maps, norms, _ = reference(x, K, p["refine"], out.indices)
    cond = testing.conditioning(maps)
    tol = testing.SCALED_TOLERANCE[dtype] * cond
    testing.assert_scaled_close(out.saved_norms, norms, testing.SCALED_TOLERANCE[accumulation_dtype(dtype)], "norms")
    testing.assert_scaled_close(out.maps, maps, tol, "maps")
    testing.assert_scaled_close(out.vectors, vec, tol, "vectors")
    # inv_sums: 1/S_k, 0 exactly for degenerate parts, as torch_impl computes it in float64.
    ref64 = torch_impl.forward(x.double(), K, p["refine"], out.indices)
    assert torch.equal(out.inv_sums == 0, ref64.inv_sums == 0)
    testing.assert_scaled_close(out.inv_sums, ref64.inv_sums, tol, "inv_sums")
    return x, out


@settings(max_examples=EXAMPLES)
@given(problems())
@example(dict(B=2, C=1, N=1, K=1, layout="nchw", dtype=torch.float32, refine=True, given_seeds=False,
              kind="relu", small_blocks=False, seed=0))
@example(dict(B=1, C=3, N=5, K=5, layout="padded", dtype=torch.float64, refine=True, given_seeds=False,
              kind="signed", small_blocks=True, seed=1))
@example(dict(B=2, C=17, N=33, K=3, layout="padded_channels_last", dtype=torch.bfloat16, refine=True,
              given_seeds=False, kind="relu", small_blocks=True, seed=2))
def test_forward_matches_reference(p):
    forward_and_check(p)


def no_activity(grads):
    """Backend backward arguments: (gV, gA, gActivity, gNorms), without an activity gradient."""
    grad_vectors, grad_maps, grad_norms = grads
    return grad_vectors, grad_maps, None, grad_norms


@settings(max_examples=EXAMPLES)
@given(problems())
@example(dict(B=1, C=1, N=1, K=1, layout="channels_last", dtype=torch.float64, refine=False, given_seeds=False,
              kind="relu", small_blocks=False, seed=0))
@example(dict(B=2, C=5, N=6, K=6, layout="padded", dtype=torch.float32, refine=True, given_seeds=True,
              kind="relu", small_blocks=True, seed=3))
@example(dict(B=2, C=33, N=30, K=5, layout="padded_channels_last", dtype=torch.float16, refine=True,
              given_seeds=True, kind="signed", small_blocks=True, seed=4))
def test_backward_matches_reference(p):
    x, out = forward_and_check(p)
    K, dtype = p["K"], p["dtype"]
    grads = testing.random_grads(x, K, seed=p["seed"])
    cfg = SMALL_BWD if p["small_blocks"] else None
    dx = triton_impl.backward(x, *no_activity(grads), out.saved(), p["refine"], config=cfg)
    assert dx.shape == x.shape and dx.dtype == dtype
    if x.is_contiguous() or x.transpose(1, 2).is_contiguous():
        assert dx.stride() == x.stride(), (dx.stride(), x.stride())
    _, maps, _, dx_ref = reference(x, K, p["refine"], out.indices, grads)
    dx_torch = torch_impl.backward(x, *no_activity(grads), out.saved(), p["refine"])
    # float16: d sim / d x_n is r / (rho_n rho_i), ~1e5 at zero positions (rho_n = eps), can
    # exceed float16's range; both backends then overflow to inf, as PyTorch's gradients do.
    limit = torch.finfo(dtype).max
    overflow = dx_ref.abs() > limit
    assert torch.isinf(dx[overflow]).all() and torch.isinf(dx_torch[overflow]).all()
    keep = ~overflow
    assert torch.isfinite(dx[keep]).all() and torch.isfinite(dx_torch[keep]).all()
    cond = testing.conditioning(maps)
    testing.assert_scaled_close(dx[keep], dx_ref[keep], testing.SCALED_TOLERANCE[dtype] * cond**2, "dx vs reference")
    # Against the vectorised PyTorch backward on the very same saved tensors: the same fp32
    # math up to summation order, then one rounding to the output dtype.
    tight = 4 * testing.UNIT_ROUNDOFF[dtype] + (1e-12 if dtype == torch.float64 else 1e-5) * cond**2
    testing.assert_scaled_close(dx[keep], dx_torch[keep], tight, "dx vs torch_impl")


# ---- special cases -------------------------------------------------------------------------

@pytest.mark.parametrize("refine", [True, False])
def test_all_zero_input(refine):
    x = torch.zeros(2, 4, 6, device=DEVICE)
    out = triton_impl.forward(x, 3, refine)
    assert out.indices.tolist() == [[0, 0, 0], [0, 0, 0]]
    assert torch.all(out.inv_sums == 0)
    assert torch.all(out.maps == 1 / 6)
    assert torch.all(out.vectors == 0) and torch.all(out.norms == 0)
    grads = testing.random_grads(x, 3, seed=0)
    dx = triton_impl.backward(x, *no_activity(grads), out.saved(), refine)
    assert torch.isfinite(dx).all()
    _, _, _, dx_ref = reference(x, 3, refine, out.indices, grads)
    testing.assert_scaled_close(dx, dx_ref, 1e-6, "dx")


@pytest.mark.parametrize("refine", [True, False])
@pytest.mark.parametrize("seeds", [[[3, 3, 3], [0, 2, 0]], [[1, 4, 1], [5, 5, 2]]])
def test_repeated_seeds_accumulate(refine, seeds):
    values = testing.random_values(2, 7, 6, seed=11) + 0.1
    x = testing.view_in_layout(values, "padded", device=DEVICE)
    seeds = torch.tensor(seeds, device=DEVICE)
    out = triton_impl.forward(x, 3, refine, seeds, config=SMALL_FWD)
    grads = testing.random_grads(x, 3, seed=5)
    vec, maps, _, dx_ref = reference(x, 3, refine, seeds, grads)
    testing.assert_scaled_close(out.vectors, vec, 1e-12, "vectors")
    for cfg in (None, SMALL_BWD):
        dx = triton_impl.backward(x, *no_activity(grads), out.saved(), refine, config=cfg)
        testing.assert_scaled_close(dx, dx_ref, 1e-12, f"dx {cfg}")


def test_greedy_repeats_a_lone_position():
    """One non-zero position: part 1 is seeded there again (its score, rho (1 - sim) with
    sim = ||x||^2 / (||x|| + eps)^2, is still above the eps of the zero positions)."""
    x = torch.zeros(1, 3, 5, dtype=torch.float64, device=DEVICE)
    x[0, :, 2] = torch.tensor([1.0, 2.0, 2.0])
    out = triton_impl.forward(x, 3, True)
    assert out.indices.tolist() == torch_impl.forward(x, 3, True).indices.tolist() == [[2, 2, 0]]
    grads = testing.random_grads(x, 3, seed=1)
    dx = triton_impl.backward(x, *no_activity(grads), out.saved(), True)
    _, _, _, dx_ref = reference(x, 3, True, out.indices, grads)
    testing.assert_scaled_close(dx, dx_ref, 1e-9, "dx")


def test_signed_cancellation_degenerate_part():
    """S_k cancels exactly: the part is degenerate (uniform map, inv_sums 0), no NaN anywhere."""
    x = torch.tensor([[[1.0, -1.0, 0.5, -0.5]]], dtype=torch.float64, device=DEVICE)
    out = triton_impl.forward(x, 2, True)
    ref = torch_impl.forward(x, 2, True)
    assert torch.equal(out.indices, ref.indices)
    assert torch.equal(out.inv_sums == 0, ref.inv_sums == 0) and bool((out.inv_sums == 0).any())
    testing.assert_scaled_close(out.maps, ref.maps, 1e-12, "maps")
    grads = testing.random_grads(x, 2, seed=2)
    dx = triton_impl.backward(x, *no_activity(grads), out.saved(), True)
    testing.assert_scaled_close(dx, torch_impl.backward(x, *no_activity(grads), ref.saved(), True), 1e-12, "dx")


def test_unsupported_dtype_raises():
    with pytest.raises(TypeError, match="float16, bfloat16, float32 and float64"):
        triton_impl.forward(torch.zeros(1, 2, 3, dtype=torch.int32, device=DEVICE), 1, True)


# ---- through the public API ----------------------------------------------------------------

def test_gradcheck_through_api():
    g = torch.Generator().manual_seed(0)
    feats = (torch.rand(1, 3, 2, 3, generator=g, dtype=torch.float64) + 0.1).to(DEVICE).requires_grad_()

    def fn(f):
        out = brnpa_triton.brnpa(f, 2, backend="triton")
        return out.vectors, out.maps, out.norms

    assert torch.autograd.gradcheck(fn, (feats,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_api_channels_last_gradient_layout():
    feats = torch.rand(2, 5, 3, 4, dtype=torch.float64, device=DEVICE).contiguous(memory_format=torch.channels_last)
    feats.requires_grad_()
    out = brnpa_triton.brnpa(feats, 3, backend="triton")
    (out.vectors.sum() + (out.maps * torch.arange(12.0, device=DEVICE).reshape(3, 4)).sum()).backward()
    assert feats.grad.is_contiguous(memory_format=torch.channels_last)
    ref = feats.detach().clone().requires_grad_()
    o2 = brnpa_triton.brnpa(ref, 3, backend="torch")
    (o2.vectors.sum() + (o2.maps * torch.arange(12.0, device=DEVICE).reshape(3, 4)).sum()).backward()
    testing.assert_scaled_close(feats.grad, ref.grad, 1e-10, "grad")


def test_func_grad_and_vmap():
    feats = torch.rand(3, 2, 4, 2, 3, dtype=torch.float64, device=DEVICE) + 0.05  # (V, B, C, H, W)

    def loss(f, backend):
        out = brnpa_triton.brnpa(f, 2, backend=backend)
        return (out.vectors**2).sum() + (out.maps * out.maps).sum() + out.norms.sum()

    g_tr = torch.func.grad(loss)(feats[0], "triton")
    g_pt = torch.func.grad(loss)(feats[0], "torch")
    testing.assert_scaled_close(g_tr, g_pt, 1e-10, "func.grad")

    vm = torch.func.vmap(lambda f: brnpa_triton.brnpa(f, 2, backend="triton").vectors)(feats)
    loop = torch.stack([brnpa_triton.brnpa(f, 2, backend="torch").vectors for f in feats])
    testing.assert_scaled_close(vm, loop, 1e-10, "vmap")

    vg = torch.func.vmap(torch.func.grad(lambda f: loss(f, "triton")))(feats)
    lg = torch.stack([torch.func.grad(loss)(f, "torch") for f in feats])
    testing.assert_scaled_close(vg, lg, 1e-10, "vmap(grad)")


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors only")
def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr("brnpa_triton.dispatch.TRITON_INTERPRETER", False)  # read once, at import
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        brnpa_triton.brnpa(torch.rand(1, 2, 3, 3), 2, backend="triton")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_degenerate_part_vector_is_the_mean_across_blocks(layout):
    """S_0 = sim(seed) + sim(opposite) + 0 * rest = 0 exactly: parts 0 and 1 are degenerate, so
    their vectors are the mean feature, accumulated over several N- and C-blocks."""
    C, N = 20, 40
    x = torch.zeros(1, C, N, dtype=torch.float64)
    x[0, 0, 0], x[0, 0, 1] = 2.0, -2.0  # the seed and its opposite: sims +1 and -1
    x[0, 1, 2:] = torch.linspace(0.1, 1.9, N - 2, dtype=torch.float64)  # orthogonal: sim 0
    x = testing.view_in_layout(x, layout, device=DEVICE)
    out = triton_impl.forward(x, 3, True, config=SMALL_FWD)
    ref = torch_impl.forward(x, 3, True)
    assert torch.equal(out.indices, ref.indices)
    assert torch.equal(out.inv_sums[0, :2], torch.zeros(2, dtype=torch.float64, device=DEVICE))
    mean = x.double().mean(2)[0]
    assert mean.abs().sum() > 0
    testing.assert_scaled_close(out.vectors[0, :2], mean.expand(2, C), 1e-12, "degenerate vectors")
    testing.assert_scaled_close(out.vectors, ref.vectors, 1e-12, "vectors")
    testing.assert_scaled_close(out.maps, ref.maps, 1e-12, "maps")


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU run covers the op registration; on CUDA the same code runs")
def test_opcheck_and_compile_through_the_triton_backend():
    """The custom ops with backend="triton" pass opcheck (fake tensors, autograd registration,
    schema), and a compiled training step runs the kernels without a graph break."""
    from brnpa_triton.ops.registry import brnpa_backward, brnpa_forward

    x = testing.random_values(2, 5, 7, seed=21)
    no_seeds = torch.empty(0, dtype=torch.int64)
    for refine in (True, False):
        torch.library.opcheck(brnpa_forward, (x.clone().requires_grad_(), 3, refine, no_seeds, False, "triton"))
        vectors, maps, indices, _, _, saved_norms, inv_sums = brnpa_forward(x, 3, refine, no_seeds, False, "triton")
        grads = no_activity(testing.random_grads(x, 3, seed=22))
        saved = (vectors, maps, indices, saved_norms, inv_sums)
        torch.library.opcheck(brnpa_backward, (x, *grads, *saved, refine, "triton"))

    torch._dynamo.reset()
    weight = torch.randn(3 * 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(23))

    def loss_fn(features):
        out = brnpa_triton.brnpa_tokens(features.transpose(1, 2), 3, backend="triton")
        return (out.vectors.flatten(1) @ weight).square().sum()

    features = x.clone().requires_grad_()
    eager = loss_fn(features)
    (eager_grad,) = torch.autograd.grad(eager, features)
    compiled = torch.compile(loss_fn, fullgraph=True)(features)
    (compiled_grad,) = torch.autograd.grad(compiled, features)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)
