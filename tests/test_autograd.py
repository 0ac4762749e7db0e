"""Autograd and torch integration of the PyTorch backend: gradcheck, torch.func, opcheck, compile."""

from __future__ import annotations

import contextlib

import pytest
import torch

import brnpa_triton as bt
from brnpa_triton.ops.registry import brnpa_backward, brnpa_forward
from brnpa_triton.testing import random_features


def _differentiable_outputs(out):
    return out.vectors, out.maps, out.norms, out.activity


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("refine", [True, False])
@pytest.mark.parametrize("kind", ["relu", "signed"])
def test_gradcheck(layout, refine, kind):
    f = random_features(2, 3, 3, 2, seed=11, kind=kind) + 0.05  # away from the kink of ||x|| at 0
    if layout == "channels_last":
        f = f.contiguous(memory_format=torch.channels_last)
    f.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: _differentiable_outputs(bt.brnpa(x, 3, refine=refine, backend="torch")), (f,)
    )


def test_gradcheck_tokens_random_seeds_activity_order():
    tokens = (random_features(2, 3, 1, 5, seed=12) + 0.05).flatten(2).transpose(1, 2).contiguous().requires_grad_()
    noise = torch.rand(2, 2, 5, generator=torch.Generator().manual_seed(0))
    fn = lambda x: _differentiable_outputs(bt.brnpa_tokens(x, 2, seeds="random", noise=noise, order="activity"))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (tokens,))


def _loss(x):
    out = bt.brnpa(x, 2)
    return out.vectors.pow(2).sum() + out.maps.pow(2).sum() + out.norms.sum()


def test_torch_func_grad_matches_autograd():
    f = random_features(2, 4, 3, 3, seed=13)
    x = f.clone().requires_grad_()
    (expected,) = torch.autograd.grad(_loss(x), x)
    torch.testing.assert_close(torch.func.grad(_loss)(f), expected)


def test_torch_func_vmap_matches_a_loop():
    stack = torch.stack([random_features(2, 4, 3, 3, seed=s) for s in range(3)])
    batched = torch.func.vmap(lambda x: bt.brnpa(x, 2))(stack)
    for i in range(3):
        single = bt.brnpa(stack[i], 2)
        for a, b in zip(batched, single, strict=True):
            torch.testing.assert_close(a[i], b)
    grads = torch.func.vmap(torch.func.grad(_loss))(stack)
    for i in range(3):
        torch.testing.assert_close(grads[i], torch.func.grad(_loss)(stack[i]))


def test_opcheck_forward_and_backward_ops():
    x = random_features(2, 4, 3, 3, seed=14).flatten(2)
    no_seeds = torch.empty(0, dtype=torch.int64)
    for refine, by_activity in ((True, False), (False, True)):
        torch.library.opcheck(brnpa_forward, (x.requires_grad_(), 2, refine, no_seeds, by_activity, "torch"))
        vectors, maps, indices, activity, norms, saved_norms, inv_sums = brnpa_forward(
            x.detach(), 2, refine, no_seeds, by_activity, "torch"
        )
        grads = (torch.randn_like(vectors), torch.randn_like(maps), torch.randn_like(activity), torch.randn_like(norms))
        saved = (vectors, maps, indices, saved_norms, inv_sums)
        torch.library.opcheck(brnpa_backward, (x.detach(), *grads, *saved, refine, "torch"))
        torch.library.opcheck(brnpa_backward, (x.detach(), None, grads[1], None, None, *saved, refine, "torch"))
    seeds = torch.tensor([[1, 4], [8, 8]])
    torch.library.opcheck(brnpa_forward, (x.detach().float(), 2, True, seeds, False, "torch"))


def test_compiled_training_step_has_no_graph_break():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
    head = torch.nn.Linear(2 * 8, 5)
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)

    def loss_fn(images, labels):
        out = bt.brnpa(model(images), 2)
        return torch.nn.functional.cross_entropy(head(out.vectors.flatten(1)), labels)

    images = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])
    eager_loss = loss_fn(images, labels)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in params]
    optimizer.zero_grad()
    # fullgraph=True: any graph break raises. The backward runs AOTAutograd's compiled graph.
    compiled_loss = torch.compile(loss_fn, fullgraph=True)(images, labels)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    for p, g in zip(params, eager_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


FIELDS = ("vectors", "maps", "indices", "activity", "norms")
# Interpreted kernels are slow: the triton backend runs one 32-bit and one 16-bit dtype.
EDIT_DTYPES = {"torch": DTYPES, "triton": (torch.float32, torch.float16)}


def _edit_cases():
    for backend, dtypes in EDIT_DTYPES.items():
        for field in FIELDS:
            for dtype in dtypes:
                for mode in ("no_grad", "grad"):
                    yield pytest.param(backend, field, dtype, mode,
                                       id=f"{backend}-{field}-{str(dtype)[6:]}-{mode}")


@pytest.mark.parametrize("backend, field, dtype, mode", list(_edit_cases()))
def test_every_output_is_the_callers_to_edit_in_place(backend, field, dtype, mode):
    """Editing any returned tensor in place after the forward (under no_grad, or recorded by
    autograd) leaves the gradients as they were: the backward reads its own copies."""
    f = random_features(1, 4, 3, 3, seed=21, dtype=dtype).requires_grad_()
    out = bt.brnpa(f, 2, backend=backend)
    weights = torch.Generator().manual_seed(0)
    loss = sum(
        (getattr(out, name) * torch.randn(getattr(out, name).shape, generator=weights).to(dtype)).sum()
        for name in ("vectors", "maps", "activity", "norms")
    )
    (expected,) = torch.autograd.grad(loss, f, retain_graph=True)
    with torch.no_grad() if mode == "no_grad" else contextlib.nullcontext():
        edited = getattr(out, field)
        edited.add_(1) if field == "indices" else edited.mul_(0.5).add_(7.0)
    (grad,) = torch.autograd.grad(loss, f)
    assert torch.equal(grad, expected)


@pytest.mark.parametrize(
    "transform",
    [
        lambda fn, x: torch.func.jvp(fn, (x,), (torch.ones_like(x),)),
        lambda fn, x: torch.func.jacfwd(fn)(x),
        lambda fn, x: torch.func.hessian(fn)(x),
    ],
    ids=["jvp", "jacfwd", "hessian"],
)
def test_forward_mode_ad_says_it_is_not_supported(transform):
    x = random_features(1, 3, 2, 2, seed=23)
    with pytest.raises(NotImplementedError, match=r"forward-mode AD .* is not supported; use reverse mode"):
        transform(lambda t: bt.brnpa(t, 2).vectors.sum(), x)


def test_forward_ad_dual_tensors_say_it_is_not_supported():
    import torch.autograd.forward_ad as fwAD

    x = random_features(1, 3, 2, 2, seed=24)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        bt.brnpa(fwAD.make_dual(x, torch.ones_like(x)), 2)


def test_check_finite_compiles_into_the_graph():
    torch._dynamo.reset()
    f = torch.rand(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    fn = torch.compile(lambda x: bt.brnpa(x, 2, check_finite=True).vectors, fullgraph=True)
    torch.testing.assert_close(fn(f), bt.brnpa(f, 2).vectors)
    bad = f.clone()
    bad[0, 1, 2, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"features must be finite \(check_finite=True\)"):
        fn(bad)


def test_check_finite_on_noise_compiles_into_the_graph():
    torch._dynamo.reset()
    f = torch.rand(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    noise = torch.rand(2, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    fn = torch.compile(lambda x, u: bt.brnpa(x, 2, seeds="random", noise=u, check_finite=True).indices, fullgraph=True)
    assert torch.equal(fn(f, noise), bt.brnpa(f, 2, seeds="random", noise=noise).indices)
    noise[1, 0, 2, 1] = float("nan")
    with pytest.raises(RuntimeError, match=r"noise must be finite \(check_finite=True\)"):
        fn(f, noise)


def test_random_seeds_under_compile_noise_traces_and_generator_explains_itself():
    torch._dynamo.reset()
    f = torch.rand(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    noise = torch.rand(2, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    pool = bt.BRNPAPool(2, seeds="random", generator=torch.Generator().manual_seed(1))
    expected = bt.brnpa(f, 2, seeds="random", noise=noise)
    # noise= traces with fullgraph=True, functional and module alike.
    fn = torch.compile(lambda x, u: bt.brnpa(x, 2, seeds="random", noise=u).indices, fullgraph=True)
    assert torch.equal(fn(f, noise), expected.indices)
    assert torch.equal(torch.compile(lambda x, u: pool(x, noise=u).indices, fullgraph=True)(f, noise), expected.indices)
    # generator= : one error naming the option and the way out...
    g = torch.Generator()
    for call in (lambda x: bt.brnpa(x, 2, seeds="random", generator=g).indices, lambda x: pool(x).indices):
        with pytest.raises(
            Exception, match=r"seeds='random' with generator=\.\.\. cannot be traced .*pass noise=noise"
        ):
            torch.compile(call, fullgraph=True)(f)
    # ... and without fullgraph the draw runs eagerly, from the generator as in eager mode.
    g.manual_seed(1)
    got = torch.compile(lambda x: bt.brnpa(x, 2, seeds="random", generator=g).indices)(f)
    assert torch.equal(got, expected.indices)
