"""Every decision the API takes from the device before dispatch traces under torch.compile(fullgraph=True).

A training step compiled on CUDA traces ``resolve_backend`` with a CUDA device. No GPU is needed
to trace that branch: the device is a plain ``torch.device`` object, and the backend "eager"
runs the graph without compiling kernels. What the choice depends on besides the device
(triton installed, interpreter on) must be traceable on every supported torch, not only on
the one CI installs first (``importlib.util.find_spec`` broke fullgraph=True on torch 2.11).
"""

from __future__ import annotations

import pytest
import torch

import brnpa_triton as bt
from brnpa_triton import dispatch

DEVICES = ("cuda", "cpu")


def _traced(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="eager")


@pytest.mark.parametrize("device", DEVICES)
def test_backend_choice_traces_for_every_request(device):
    requests = ["auto", "torch"]
    if dispatch.available_backends(device).count("triton"):
        requests.append("triton")  # reachable without an error, so inside a graph too

    def choose(x):
        d = torch.device(device)
        chosen = [dispatch.resolve_backend(r, d) for r in requests]
        available = dispatch.available_backends(d) + dispatch.available_backends(device)  # a device or its name
        # Encode the decisions in the graph's output, so that they are compared, not just traced.
        return x + sum(c == "triton" for c in chosen) + 10 * len(available)

    x = torch.zeros(2)
    torch.testing.assert_close(_traced(choose)(x), choose(x), rtol=0, atol=0)


def test_cuda_auto_picks_triton_exactly_when_triton_is_installed():
    def choose(x):
        return x + (dispatch.resolve_backend("auto", torch.device("cuda")) == "triton")

    expected = 1.0 if dispatch.TRITON_INSTALLED else 0.0
    assert _traced(choose)(torch.zeros(1)).item() == expected


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(order="activity", check_finite=True),
    dict(refine=False, backend="torch"),
])
def test_brnpa_traces_every_check_before_dispatch(kwargs):
    """The whole of bt.brnpa up to the op (argument checks, option checks, the in-graph finite
    check, the backend choice, the choice of autograd.Function), on CPU tensors."""
    f = torch.rand(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    noise = torch.rand(2, 2, 3, 3, generator=torch.Generator().manual_seed(1))

    def call(x, u):
        a = bt.brnpa(x, 2, **kwargs)
        b = bt.brnpa(x, 2, seeds="random", noise=u, **kwargs)
        t = bt.brnpa_tokens(x.flatten(2).transpose(1, 2), 2, **kwargs)
        return a.vectors, b.indices, t.maps

    got = _traced(call)(f, noise)
    for g, e in zip(got, call(f, noise), strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
