"""The public custom ops check every tensor argument once, at the op boundary: both backends
take the same inputs (floating tensors of another dtype are cast), and anything refused gets
an error naming the argument, before any kernel runs."""

from __future__ import annotations

import os

import pytest
import torch

from brnpa_triton.ops.registry import brnpa_backward, brnpa_forward
from brnpa_triton.testing import random_features

BACKENDS = ("torch", "triton")
# The triton backend runs on CUDA tensors, or on CPU ones under the interpreter (the tests' default).
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
NO_SEEDS = torch.empty(0, dtype=torch.int64, device=DEVICE)
SAVED = ("vectors", "maps", "indices", "norms", "inv_sums")
GRADS = ("grad_vectors", "grad_maps", "grad_activity", "grad_norms")


def _problem(backend, dtype=torch.float32):
    """x (1, 3, 6), its forward with K = 2 and every output's gradient, as the backward's keywords."""
    x = random_features(1, 3, 2, 3, seed=31, dtype=dtype).flatten(2).to(DEVICE)
    vectors, maps, indices, activity, norms, saved_norms, inv_sums = brnpa_forward(x, 2, True, NO_SEEDS, False, backend)
    g = torch.Generator().manual_seed(0)
    grads = {name: torch.randn(t.shape, generator=g).to(DEVICE, dtype)
             for name, t in zip(GRADS, (vectors, maps, activity, norms), strict=True)}
    saved = dict(zip(SAVED, (vectors, maps, indices, saved_norms, inv_sums), strict=True))
    return x, {**grads, **saved}


def _backward(x, args, backend, refine=True):
    return brnpa_backward(x, *(args[name] for name in GRADS + SAVED), refine, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_casts_floating_arguments_of_another_dtype_on_both_backends(backend):
    # float32 values given in float64 round-trip exactly: the cast must give the same gradient.
    x, args = _problem(backend)
    expected = _backward(x, args, backend)
    for name in [n for n in GRADS + SAVED if n != "indices"]:
        got = _backward(x, {**args, name: args[name].double()}, backend)
        assert got.dtype == x.dtype and torch.equal(got, expected), name
    everything = {n: t if n == "indices" else t.double() for n, t in args.items()}
    assert torch.equal(_backward(x, everything, backend), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_casts_for_half_precision_x(backend):
    # float16 x: its float16 values given in float32, and the float32 saved norms in float64.
    x, args = _problem(backend, torch.float16)
    expected = _backward(x, args, backend)
    wider = {n: t if n == "indices" else t.float() for n, t in args.items()}
    wider["norms"], wider["inv_sums"] = args["norms"].double(), args["inv_sums"].double()
    assert torch.equal(_backward(x, wider, backend), expected)


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "edit, error, message",
    [
        (lambda a: {"grad_vectors": a["grad_vectors"].long()}, TypeError,
         r"grad_vectors must be a floating-point tensor .*; got torch.int64"),
        (lambda a: {"norms": a["norms"].int()}, TypeError,
         r"norms must be a floating-point tensor .*; got torch.int32"),
        (lambda a: {"maps": a["maps"][:, :, :5]}, ValueError, r"maps must have shape \(1, 2, 6\); got \(1, 2, 5\)"),
        (lambda a: {"inv_sums": a["inv_sums"][:, None]}, ValueError, r"inv_sums must have shape \(1, 2\)"),
        (lambda a: {"indices": a["indices"][:, :0]}, ValueError,
         r"indices must have shape \(B=1, K\) with 1 <= K <= N=6, .*; got \(1, 0\)"),
        (lambda a: {"indices": a["indices"][0]}, ValueError, r"indices must have shape \(B=1, K\) .*; got \(2,\)"),
        (lambda a: {"indices": a["indices"].int()}, TypeError, r"indices must be int64; got torch.int32"),
        (lambda a: {"indices": a["indices"] - 1 - a["indices"]}, ValueError,
         r"indices must lie in \[0, N=6\); got values from -1 to -1"),
        (lambda a: {"indices": a["indices"] + 6}, ValueError, r"indices must lie in \[0, N=6\)"),
        (lambda a: {"indices": _meta(a["indices"])}, ValueError, r"indices must be on x's device \(.*\); got meta"),
        (lambda a: {"vectors": _meta(a["vectors"])}, ValueError, r"vectors must be on x's device \(.*\); got meta"),
        (lambda a: {"grad_norms": _meta(a["grad_norms"])}, ValueError, r"grad_norms must be on x's device"),
        (lambda a: {"grad_maps": a["grad_maps"].to_sparse()}, TypeError,
         r"grad_maps must be a dense \(strided\) tensor; got layout torch.sparse_coo"),
    ],
)
def test_backward_refuses_bad_arguments_naming_them(backend, edit, error, message):
    x, args = _problem(backend)
    with pytest.raises(error, match=message):
        _backward(x, {**args, **edit(args)}, backend)


def _seeds(values, **kwargs):
    return lambda x: torch.tensor(values, **{"device": x.device, **kwargs})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "x_of, seeds_of, K, error, message",
    [
        (torch.Tensor.to_sparse, lambda x: NO_SEEDS, 2, TypeError,
         r"x must be a dense \(strided\) tensor; got layout torch.sparse_coo"),
        (None, _seeds([[0, 6]]), 2, ValueError, r"seed_indices must lie in \[0, N=6\); got values from 0 to 6"),
        (None, _seeds([[-1, 0]]), 2, ValueError, r"seed_indices must lie in \[0, N=6\); got values from -1 to 0"),
        (None, _seeds([[0, 1]], device="meta"), 2, ValueError,
         r"seed_indices must be on x's device \(\w+(:\d)?\); got meta"),
        (None, lambda x: _seeds([[0, 1]])(x).to_sparse(), 2, TypeError,
         r"seed_indices must be a dense \(strided\) tensor"),
        (None, _seeds([[0, 1]], dtype=torch.int32), 2, TypeError, r"seed_indices must be int64; got torch.int32"),
        (None, _seeds([0, 1]), 2, ValueError, r"seed_indices must have shape \(1, 2\); got \(2,\)"),
        (None, lambda x: NO_SEEDS, 7, ValueError, r"num_parts must be between 1 and N=6; got 7"),
    ],
)
def test_forward_refuses_bad_arguments_naming_them(backend, x_of, seeds_of, K, error, message):
    x = random_features(1, 3, 2, 3, seed=31, dtype=torch.float32).flatten(2).to(DEVICE)
    seeds = seeds_of(x)
    with pytest.raises(error, match=message):
        brnpa_forward(x if x_of is None else x_of(x), K, True, seeds, False, backend)


def test_ops_name_the_backend_and_what_triton_needs(monkeypatch):
    x, args = _problem("torch")
    x, args = x.cpu(), {n: t.cpu() for n, t in args.items()}
    with pytest.raises(ValueError, match=r"backend must be one of 'torch', 'triton'; got 'auto'"):
        brnpa_forward(x, 2, True, NO_SEEDS.cpu(), False, "auto")
    with pytest.raises(ValueError, match=r"backend must be one of 'torch', 'triton'; got 'cuda'"):
        _backward(x, args, "cuda")
    # CPU tensors and no interpreter: the ops say so before any kernel is launched.
    monkeypatch.setattr("brnpa_triton.dispatch.TRITON_INTERPRETER", False)
    for call in (lambda: brnpa_forward(x, 2, True, NO_SEEDS.cpu(), False, "triton"),
                 lambda: _backward(x, args, "triton")):
        with pytest.raises(RuntimeError, match=r"backend='triton' runs on CUDA tensors.*TRITON_INTERPRET=1"):
            call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_refuse_tensors_on_another_device_than_x(backend):
    x, args = _problem("torch")
    x, args = x.cpu(), {n: t.cpu() for n, t in args.items()}
    x = x.cuda()
    cuda_args = {n: t.cuda() for n, t in args.items()}
    with pytest.raises(ValueError, match=r"indices must be on x's device \(cuda:0\); got cpu"):
        _backward(x, {**cuda_args, "indices": args["indices"]}, backend)
    with pytest.raises(ValueError, match=r"seed_indices must be on x's device \(cuda:0\); got cpu"):
        brnpa_forward(x, 2, True, torch.tensor([[0, 1]]), False, backend)
