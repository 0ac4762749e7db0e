"""Autograd and torch integration of the PyTorch backend: gradcheck, torch.func, opcheck, compile."""

from __future__ import annotations

import pytest
import torch

import brnpa_triton as bt
from brnpa_triton.ops.registry import brnpa_backward, brnpa_forward
from tests.helpers import random_features


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
    assert torch.autograd.gradcheck(lambda x: _differentiable_outputs(bt.brnpa(x, 3, refine=refine, backend="torch")), (f,))


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
        for a, b in zip(batched, single):
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
    for p, g in zip(params, eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
